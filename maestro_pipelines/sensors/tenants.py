"""Tenant partitions follow the `tenants` table; new data triggers retraining."""

import json
import time
from dataclasses import dataclass
from datetime import datetime

import dagster as dg

from maestro_pipelines.jobs.ml import train_and_deploy_job
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import PlatformDatabase
from maestro_pipelines.resources.sources import SOURCE_URL_VARIABLE, DataFingerprint, DataSource

# Sensor evaluations must finish well under Dagster's 60 s limit.
FINGERPRINT_BUDGET_SECONDS = 40


@dg.sensor(
    name="tenant_partitions_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new active tenant and requests its first training once the data "
    "source has rows for it (until then its skip reason says how to load them); a first training that "
    "produced no model is requested again when the tenant's rows change; removes partitions of tenants "
    "no longer active.",
)
def tenant_partitions_sensor(context: dg.SensorEvaluationContext, platform_db: PlatformDatabase, source: DataSource):
    from maestro_pipelines.platform_db.tenants import list_tenants, tenant_models

    with platform_db.get_connection() as conn:
        active = list_tenants(conn)
        models = tenant_models(conn)
    existing = set(context.instance.get_dynamic_partitions(tenant_partitions.name))
    handled_up_to, watching = first_training_cursor(context.cursor, context.instance)
    to_add = sorted(t.name for t in active if t.name not in existing)
    to_remove = sorted(existing - {t.name for t in active})
    # A tenant is watched from the tick it is new (an id above the cursor's) until it has a
    # model version: its first training waits for rows, and one that produced no model is
    # requested again when the rows change. A partition removed by hand only comes back.
    # With the cursor gone (a re-created Dagster instance) every tenant is new again: those
    # without a model are watched, those with one keep it (no training on a lost cursor).
    watched = [
        t for t in active
        if ((t.name in to_add and t.id > handled_up_to) or t.name in watching) and not has_model(models.get(t.name))
    ]
    requests, notes, still_watched = first_trainings(context, source, watched, models, watching,
                                                     untrainable_rows(platform_db, source))
    cursor = json.dumps({"handled_up_to": max([handled_up_to, *(t.id for t in active)]), "watching": still_watched})
    partition_requests = []
    if to_add:
        partition_requests.append(tenant_partitions.build_add_request(to_add))
    if to_remove:
        partition_requests.append(tenant_partitions.build_delete_request(to_remove))
    note = "; ".join(notes)
    if note and requests:
        context.log.info(note)
    skip = None if requests else (note or f"{len(active)} active tenants, all with partitions")
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=cursor,
                           skip_reason=skip)


def has_model(models) -> bool:
    return models is not None and models.model_versions > 0


def first_training_cursor(cursor: str | None, instance: dg.DagsterInstance) -> tuple[int, dict[str, str | None]]:
    """(highest tenant id handled, {tenant watched until it has a model: the rows (ROWS_TAG) of
    its last first training requested, or None}). Older cursors were the id alone, then
    {handled_up_to, waiting}: their watch list is the tenants waiting for rows and those whose
    first training this sensor requested (read once from the instance's runs)."""
    if not cursor:
        return 0, {}
    if cursor.strip().isdigit():
        return int(cursor), dict.fromkeys(sorted(requested_first_trainings(instance)))
    state = json.loads(cursor)
    if "watching" in state:
        return int(state.get("handled_up_to", 0)), dict(state["watching"])
    watching = set(state.get("waiting", [])) | requested_first_trainings(instance)
    return int(state.get("handled_up_to", 0)), dict.fromkeys(sorted(watching))


def requested_first_trainings(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={TRIGGER_TAG: FIRST_TRAINING}))
    return {run.tags[PARTITION_TAG] for run in runs if PARTITION_TAG in run.tags}


TRIGGER_TAG, FIRST_TRAINING = "maestro/trigger", "new-tenant"
ROWS_TAG = "maestro/rows"  # the rows a first training was requested for: "<count>@<newest timestamp>"
PARTITION_TAG = "dagster/partition"
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class LastTraining:
    """A watched tenant's newest training: its Dagster run, or an `experiments` row when the
    instance has no run for it (trained elsewhere, or by hand)."""

    run_id: str | None
    finished: bool
    outcome: str  # for the skip reason: "failed", "was canceled", "registered no model", "running"
    rows: str | None  # the ROWS_TAG it was requested for, when known
    created_at: datetime | None


def last_training(instance: dg.DagsterInstance, tenant: str, models) -> LastTraining | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=train_and_deploy_job.name, tags={PARTITION_TAG: tenant}), limit=1)
    if records:
        run = records[0].dagster_run
        outcome = {dg.DagsterRunStatus.SUCCESS: "registered no model", dg.DagsterRunStatus.FAILURE: "failed",
                   dg.DagsterRunStatus.CANCELED: "was canceled"}.get(run.status, "running")
        return LastTraining(run.run_id, run.status in FINISHED, outcome, run.tags.get(ROWS_TAG),
                            records[0].create_timestamp)
    if models is None or models.last_training_status is None:
        return None
    running = models.last_training_status == "running"
    return LastTraining(models.last_training_run_id, not running,
                        "running" if running else models.last_training_status.replace("succeeded", "registered no model"),
                        None, models.last_training_at)


def rows_tag(fingerprint) -> str:
    return f"{fingerprint.row_count}@{fingerprint.newest.isoformat() if fingerprint.newest else '-'}"


def rows_changed_since(last: LastTraining, fingerprint) -> bool:
    """Whether the rows are not those `last` trained on: its ROWS_TAG, or (a run requested before
    runs carried it) a row written after it started."""
    if last.rows is not None:
        return last.rows != rows_tag(fingerprint)
    return bool(fingerprint.newest and last.created_at and fingerprint.newest > last.created_at)


def first_trainings(context, source: DataSource, watched, models, requested: dict[str, str | None], why_untrainable):
    """(run requests, what the others wait for, the cursor's watch list). One request per state
    of a tenant's rows (the run_key and the cursor hold it), none while a training of it runs."""
    requests, notes = [], []
    watching = {t.name: requested.get(t.name) for t in watched}
    deadline = time.monotonic() + FINGERPRINT_BUDGET_SECONDS
    for tenant in watched:
        if time.monotonic() > deadline:
            continue  # still watched: the next tick looks at it
        fingerprint = rows_of(source, tenant.name, context.log)
        if not fingerprint.row_count:
            notes.append(no_rows_yet(tenant.name, source))
            continue
        last = last_training(context.instance, tenant.name, models.get(tenant.name))
        if last is not None and not last.finished:
            notes.append(f"{tenant.name}: first training running ({run_named(last)})")
        elif watching[tenant.name] == rows_tag(fingerprint) or (last is not None and not rows_changed_since(last, fingerprint)):
            outcome = f"{last.outcome} ({run_named(last)})" if last is not None else "requested"
            notes.append(f"{tenant.name}: first training {outcome}; {new_rows_hint(tenant.name, source)}")
        elif (untrainable := why_untrainable(tenant.name)) is not None:
            notes.append(f"{untrainable}; add rows with `maestro tenants load {tenant.name} FILE`")
        else:
            watching[tenant.name] = tag = rows_tag(fingerprint)
            requests.append(dg.RunRequest(
                partition_key=tenant.name, run_key=f"first-training-{tenant.name}-{tenant.id}-{tag}",
                tags={TRIGGER_TAG: FIRST_TRAINING, ROWS_TAG: tag}))
    return requests, notes, dict(sorted(watching.items()))


def untrainable_rows(platform_db: PlatformDatabase, source: DataSource):
    """tenant -> why its rows cannot train a model yet, or None. Known on the embedded default
    (training_rows in the platform database), where a run that would fail is not requested;
    a source of your own is not read twice: the training says it."""
    if source.url_variable == SOURCE_URL_VARIABLE:
        return lambda tenant: None

    def why(tenant: str) -> str | None:
        from maestro_pipelines.platform_db.training_rows import why_untrainable

        with platform_db.get_connection() as conn:
            return why_untrainable(conn, tenant)

    return why


def rows_of(source: DataSource, tenant: str, log):
    """The tenant's fingerprint; none when its rows cannot be counted now (the source is down):
    the next tick asks again."""
    try:
        return source.tenant_fingerprint(tenant)
    except MaestroError as exc:
        log.warning(f"could not count tenant {tenant}'s rows, asking again next tick: {exc}")
        return DataFingerprint(0, None)


def run_named(last: LastTraining) -> str:
    return f"run {last.run_id[:8]}" if last.run_id else "no Dagster run"


def new_rows_hint(tenant: str, source: DataSource) -> str:
    if source.url_variable == SOURCE_URL_VARIABLE:
        return f"waiting for its rows in table {source.table} of {SOURCE_URL_VARIABLE} to change"
    return f"waiting for new rows: `maestro tenants load {tenant} FILE --replace`"


def no_rows_yet(tenant: str, source: DataSource) -> str:
    if source.url_variable == SOURCE_URL_VARIABLE:  # the user's own database
        return (f"tenant {tenant} has no training rows yet: add them to table {source.table} of "
                f"{SOURCE_URL_VARIABLE} (column {source.tenant_column} = '{tenant}')")
    return f"tenant {tenant} has no training rows yet: load them with `maestro tenants load {tenant} FILE`"


@dg.sensor(
    name="retraining_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=300,
    description="Requests a tenant's training when its source data changes (row count or newest timestamp); "
    "a tenant without a model yet is the tenant sensor's to train.",
)
def retraining_sensor(context: dg.SensorEvaluationContext, source: DataSource, platform_db: PlatformDatabase):
    from maestro_pipelines.platform_db.tenants import tenant_models

    state = json.loads(context.cursor) if context.cursor else {}
    seen: dict = state.get("seen", {})
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name))
    if not tenants:
        return dg.SkipReason("no tenant partitions yet")
    # Resume where the last evaluation stopped, so many tenants are covered over several ticks.
    start = state.get("next", 0) % len(tenants)
    order = tenants[start:] + tenants[:start]
    with platform_db.get_connection() as conn:
        models = tenant_models(conn)
    deadline = time.monotonic() + FINGERPRINT_BUDGET_SECONDS
    requests, checked = [], 0
    for tenant in order:
        if time.monotonic() > deadline:
            break
        fingerprint = source.tenant_fingerprint(tenant)
        current = [fingerprint.row_count, fingerprint.newest.isoformat() if fingerprint.newest else None]
        checked += 1
        previous = seen.get(tenant)
        seen[tenant] = current
        if previous is None or previous == current or not previous[0] or not has_model(models.get(tenant)):
            # First sight only records a baseline; a tenant without a model version (rows
            # appearing, or changing after a first training that failed) is watched by the
            # tenant sensor, which requests its first training: one run, not two.
            continue
        requests.append(
            dg.RunRequest(
                partition_key=tenant,
                run_key=f"retrain-{tenant}-{current[0]}-{current[1]}",
                tags={"maestro/trigger": "data-change"},
            )
        )
    cursor = json.dumps({"seen": {t: seen[t] for t in tenants if t in seen}, "next": (start + checked) % len(tenants)})
    if not requests:
        return dg.SensorResult(skip_reason=f"no data change in {checked} tenants", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
