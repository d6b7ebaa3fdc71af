"""Tenant partitions follow the `tenants` table; new data triggers retraining."""

import json
import time

import dagster as dg

from maestro_pipelines.jobs.ml import train_and_deploy_job
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import PlatformDatabase
from maestro_pipelines.resources.sources import SOURCE_URL_VARIABLE, DataSource

# Sensor evaluations must finish well under Dagster's 60 s limit.
FINGERPRINT_BUDGET_SECONDS = 40


@dg.sensor(
    name="tenant_partitions_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new active tenant and requests its first training once the data "
    "source has rows for it (until then its skip reason says how to load them); removes partitions of "
    "tenants no longer active.",
)
def tenant_partitions_sensor(context: dg.SensorEvaluationContext, platform_db: PlatformDatabase, source: DataSource):
    from maestro_pipelines.platform_db.tenants import list_tenants, tenant_models

    with platform_db.get_connection() as conn:
        active = list_tenants(conn)
        models = tenant_models(conn)
    existing = set(context.instance.get_dynamic_partitions(tenant_partitions.name))
    active_names = {t.name for t in active}
    handled_up_to, waiting = first_training_cursor(context.cursor)
    to_add = sorted(t.name for t in active if t.name not in existing)
    to_remove = sorted(existing - active_names)
    # A tenant newer than the cursor gets its first training, once the source has rows for it;
    # one without rows yet waits in the cursor and is looked at again every tick (unless it was
    # trained by hand while it waited). A partition removed by hand only comes back. With the
    # cursor gone (a re-created Dagster instance) every tenant is new again: one training each.
    candidates = [
        t for t in active
        if (t.name in to_add and t.id > handled_up_to) or (t.name in waiting and never_trained(models.get(t.name)))
    ]
    ready, still_waiting = tenants_with_rows(source, [t.name for t in candidates], context.log)
    first_trainings = [
        dg.RunRequest(partition_key=t.name, run_key=f"first-training-{t.name}-{t.id}", tags={"maestro/trigger": "new-tenant"})
        for t in candidates
        if t.name in ready
    ]
    cursor = json.dumps({"handled_up_to": max([handled_up_to, *(t.id for t in active)]), "waiting": still_waiting})
    requests = []
    if to_add:
        requests.append(tenant_partitions.build_add_request(to_add))
    if to_remove:
        requests.append(tenant_partitions.build_delete_request(to_remove))
    waiting_note = "; ".join(no_rows_yet(name, source) for name in still_waiting)
    if waiting_note and first_trainings:
        context.log.info(waiting_note)
    skip = None if first_trainings else (waiting_note or f"{len(active)} active tenants, all with partitions")
    return dg.SensorResult(run_requests=first_trainings, dynamic_partitions_requests=requests, cursor=cursor,
                           skip_reason=skip)


def never_trained(models) -> bool:
    return models is None or models.last_training_status is None


def first_training_cursor(cursor: str | None) -> tuple[int, list[str]]:
    """(highest tenant id handled, tenants waiting for rows). Older cursors were the id alone."""
    if not cursor:
        return 0, []
    if cursor.strip().isdigit():
        return int(cursor), []
    state = json.loads(cursor)
    return int(state.get("handled_up_to", 0)), list(state.get("waiting", []))


def tenants_with_rows(source: DataSource, names: list[str], log) -> tuple[set[str], list[str]]:
    """(tenants the source has rows for, tenants without rows yet). A tenant whose rows cannot
    be counted now (the source is down) waits too: the next tick asks again."""
    ready, waiting = set(), []
    deadline = time.monotonic() + FINGERPRINT_BUDGET_SECONDS
    for name in names:
        if time.monotonic() > deadline:
            waiting.append(name)
            continue
        try:
            rows = source.tenant_fingerprint(name).row_count
        except MaestroError as exc:
            log.warning(f"could not count tenant {name}'s rows, asking again next tick: {exc}")
            rows = 0
        (ready.add(name) if rows else waiting.append(name))
    return ready, sorted(waiting)


def no_rows_yet(tenant: str, source: DataSource) -> str:
    if source.url_variable == SOURCE_URL_VARIABLE:  # the user's own database
        return (f"tenant {tenant} has no training rows yet: add them to table {source.table} of "
                f"{SOURCE_URL_VARIABLE} (column {source.tenant_column} = '{tenant}')")
    return f"tenant {tenant} has no training rows yet: load them with `maestro tenants load {tenant} FILE`"


@dg.sensor(
    name="retraining_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=300,
    description="Requests a tenant's training when its source data changes (row count or newest timestamp).",
)
def retraining_sensor(context: dg.SensorEvaluationContext, source: DataSource):
    state = json.loads(context.cursor) if context.cursor else {}
    seen: dict = state.get("seen", {})
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name))
    if not tenants:
        return dg.SkipReason("no tenant partitions yet")
    # Resume where the last evaluation stopped, so many tenants are covered over several ticks.
    start = state.get("next", 0) % len(tenants)
    order = tenants[start:] + tenants[:start]
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
        if previous is None or previous == current or not previous[0]:
            # First sight only records a baseline, and rows appearing for a tenant that had
            # none are its first training: the tenant sensor requests that one.
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
