"""Tenant partitions follow the `tenants` table; new data triggers retraining.

A tick asks each store a fixed number of times, at 10 tenants or 10,000: the tenants and their
models (the tick's one platform-database connection), every tenant's fingerprint (one grouped
source query, `DataSource.tenant_fingerprints`; tenant by tenant only for a connector that cannot
group, within FINGERPRINT_BUDGET_SECONDS), the runs of the tenants it looks at (one instance query
per RUNS_PER_QUERY tenants), whether rows can train (one query) and training_data's data versions
(one event-log query). The cursors keep no fingerprint per tenant: the rows a training was
requested for are its run's ROWS_TAG, the rows it read are its training_data's data version
(assets/ml.py), both recorded where the training is. A cursor keeps only the requests whose run
is not visible yet, and at most REQUESTS_PER_TICK runs are requested a tick.
"""

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import dagster as dg

from maestro_pipelines.jobs.ml import train_and_deploy_job
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import PlatformDatabase
from maestro_pipelines.resources.sources import SOURCE_URL_VARIABLE, DataFingerprint, DataSource

# Sensor evaluations must finish well under Dagster's 60 s limit.
FINGERPRINT_BUDGET_SECONDS = 40
REQUESTS_PER_TICK = 100
"""Runs a sensor requests in one tick at most. 1,000 tenants added at once queue their first
trainings over ten ticks (five minutes), not in one: the queue, the daemon's tick and the
cursor stay small, and the queued run coordinator starts 4 trainings at a time either way
(maestro/kind: training in deploy/dagster.yaml)."""
RUNS_PER_QUERY = 500  # tenants per instance query (an IN list SQLite and PostgreSQL take easily)
SHOWN_NOTES = 5  # a skip reason names this many tenants' waits, then counts the rest
NO_ROWS = DataFingerprint(0, None)
TRIGGER_TAG, FIRST_TRAINING, DATA_CHANGE = "maestro/trigger", "new-tenant", "data-change"
ROWS_TAG = "maestro/rows"  # the rows a training was requested for: DataFingerprint.tag, "<count>@<newest timestamp>"
PARTITION_TAG = "dagster/partition"
DATA_VERSION_TAG = "dagster/data_version"  # Dagster's tag of a materialization's data version
ROWS_TAG_FORM = re.compile(r"\d+@\S+")
TRAINING_DATA = dg.AssetKey("training_data")
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
CURSOR_VERSION = 2

# training_data records the fingerprint of the rows it read as its data version (the baseline
# read here); Dagster 1.13 marks Output's data_version beta and would warn in every training.
warnings.filterwarnings("ignore", message=r"Parameter `data_version` of initializer `Output.__init__`",
                        category=dg.BetaWarning)


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

    with platform_db.get_connection() as conn:  # the tick's one platform-database connection
        active = list_tenants(conn)
        models = tenant_models(conn)
        existing = set(context.instance.get_dynamic_partitions(tenant_partitions.name))
        state = read_watch_state(context.cursor, context.instance, active, models)
        to_add = sorted(t.name for t in active if t.name not in existing)
        to_remove = sorted(existing - {t.name for t in active})
        # A tenant is watched from the tick it is new (an id above the cursor's, no partition yet)
        # until it has a model version: its first training waits for rows, and one that produced
        # no model is requested again when the rows change. A partition removed by hand only
        # comes back. With the cursor gone (a re-created Dagster instance) every tenant is new
        # again: those without a model are watched, those with one keep it.
        adding = set(to_add)
        watched = [t for t in active if not has_model(models.get(t.name)) and state.watches(t, adding)]
        requests, notes, requested = first_trainings(context, source, watched, models, state.requested,
                                                     untrainable_check(conn, source))
    cursor = state.next_cursor(active, models, watched, requested)
    partition_requests = []
    if to_add:
        partition_requests.append(tenant_partitions.build_add_request(to_add))
    if to_remove:
        partition_requests.append(tenant_partitions.build_delete_request(to_remove))
    note = shown_notes(notes)
    if note and requests:
        context.log.info(note)
    skip = None if requests else (note or f"{len(active)} active tenants, all with partitions")
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=cursor,
                           skip_reason=skip)


def has_model(models) -> bool:
    return models is not None and models.model_versions > 0


def digest(tag: str) -> str:
    """8 characters standing for a ROWS_TAG in a cursor: a few bytes per pending request."""
    return hashlib.blake2b(tag.encode(), digest_size=4).hexdigest()


# ---- the tenant sensor's cursor ----------------------------------------------------------------


@dataclass
class WatchState:
    """The tenant sensor's cursor: the highest tenant id handled; the ids of tenants without a
    model it does not watch (they had a partition before it watched them: usually none); and
    the first trainings requested whose run is not visible yet ({tenant: digest of ROWS_TAG}).
    Its size does not grow with the tenants: a few bytes per excluded id range or pending request."""

    handled_up_to: int = 0
    excluded: set[int] = field(default_factory=set)
    requested: dict[str, str] = field(default_factory=dict)

    def watches(self, tenant, adding: set[str]) -> bool:
        if tenant.id > self.handled_up_to:
            return tenant.name in adding
        return tenant.id not in self.excluded

    def next_cursor(self, active, models, watched, requested: dict[str, str]) -> str:
        watched_ids = {t.id for t in watched}
        excluded = [t.id for t in active if t.id not in watched_ids and not has_model(models.get(t.name))]
        return json.dumps({"version": CURSOR_VERSION, "handled_up_to": max([self.handled_up_to, *(t.id for t in active)]),
                           "excluded": id_ranges(excluded), "watching": dict(sorted(requested.items()))})


def read_watch_state(cursor: str | None, instance: dg.DagsterInstance, active, models) -> WatchState:
    """The cursor, whichever form wrote it. Older forms listed the watched tenants: the id alone,
    then {handled_up_to, waiting} (watched: those waiting for rows and those whose first training
    this sensor requested, read once from the instance's runs), then {handled_up_to, watching:
    {tenant: ROWS_TAG or None}}. A tenant they did not list (handled, no model) is excluded."""
    if not cursor:
        return WatchState()
    if cursor.strip().isdigit():
        return listed_watch_state(int(cursor), requested_first_trainings(instance), {}, active, models)
    state = json.loads(cursor)
    handled = int(state.get("handled_up_to", 0))
    if state.get("version") == CURSOR_VERSION:
        return WatchState(handled, parse_id_ranges(state.get("excluded", "")), dict(state.get("watching", {})))
    if "watching" in state:
        listed = dict(state["watching"])
        return listed_watch_state(handled, set(listed), {t: digest(tag) for t, tag in listed.items() if tag},
                                  active, models)
    watching = set(state.get("waiting", [])) | requested_first_trainings(instance)
    return listed_watch_state(handled, watching, {}, active, models)


def listed_watch_state(handled: int, watching: set[str], requested: dict[str, str], active, models) -> WatchState:
    excluded = {t.id for t in active
                if t.id <= handled and t.name not in watching and not has_model(models.get(t.name))}
    return WatchState(handled, excluded, requested)


def requested_first_trainings(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={TRIGGER_TAG: FIRST_TRAINING}))
    return {run.tags[PARTITION_TAG] for run in runs if PARTITION_TAG in run.tags}


def id_ranges(ids) -> str:
    """Tenant ids as ranges, "1-5,9": ids added together are consecutive."""
    ranges: list[list[int]] = []
    for tenant_id in sorted(set(ids)):
        if ranges and tenant_id == ranges[-1][1] + 1:
            ranges[-1][1] = tenant_id
        else:
            ranges.append([tenant_id, tenant_id])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def parse_id_ranges(text: str) -> set[int]:
    ids: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


# ---- a watched tenant's trainings --------------------------------------------------------------


@dataclass(frozen=True)
class LastTraining:
    """A watched tenant's newest training: its Dagster run, or an `experiments` row when the
    instance has no run for it (trained elsewhere, or by hand)."""

    run_id: str | None
    finished: bool
    outcome: str  # for the skip reason: "failed", "was canceled", "registered no model", "running"
    rows: str | None  # the ROWS_TAG it was requested for, when known
    created_at: datetime | None


def last_trainings(instance: dg.DagsterInstance, tenants: list[str], models) -> dict[str, LastTraining]:
    """{tenant: its newest training} for those of `tenants` that had one: their runs in one
    query per RUNS_PER_QUERY tenants (newest first), else their experiments rows."""
    newest: dict[str, dg.RunRecord] = {}
    for start in range(0, len(tenants), RUNS_PER_QUERY):
        chunk = tenants[start:start + RUNS_PER_QUERY]
        records = instance.get_run_records(
            filters=dg.RunsFilter(job_name=train_and_deploy_job.name, tags={PARTITION_TAG: chunk}))
        for record in records:
            newest.setdefault(record.dagster_run.tags.get(PARTITION_TAG), record)
    found = {}
    for tenant in tenants:
        last = training_of_run(newest[tenant]) if tenant in newest else training_of_records(models.get(tenant))
        if last is not None:
            found[tenant] = last
    return found


def training_of_run(record: dg.RunRecord) -> LastTraining:
    run = record.dagster_run
    outcome = {dg.DagsterRunStatus.SUCCESS: "registered no model", dg.DagsterRunStatus.FAILURE: "failed",
               dg.DagsterRunStatus.CANCELED: "was canceled"}.get(run.status, "running")
    return LastTraining(run.run_id, run.status in FINISHED, outcome, run.tags.get(ROWS_TAG), record.create_timestamp)


def training_of_records(models) -> LastTraining | None:
    if models is None or models.last_training_status is None:
        return None
    running = models.last_training_status == "running"
    return LastTraining(models.last_training_run_id, not running,
                        "running" if running else models.last_training_status.replace("succeeded", "registered no model"),
                        None, models.last_training_at)


def rows_changed_since(last: LastTraining, fingerprint) -> bool:
    """Whether the rows are not those `last` trained on: its ROWS_TAG, or (a run requested before
    runs carried it) a row written after it started."""
    if last.rows is not None:
        return last.rows != fingerprint.tag
    return bool(fingerprint.newest and last.created_at and fingerprint.newest > last.created_at)


def fingerprints_of(source: DataSource, tenants: list[str], log) -> tuple[dict[str, DataFingerprint], str | None]:
    """(every tenant's fingerprint, from one grouped query where the source allows; a problem).
    The source down: no fingerprint and the problem, and the next tick asks again."""
    if not tenants:
        return {}, None
    try:
        return source.tenant_fingerprints(tenants, deadline=time.monotonic() + FINGERPRINT_BUDGET_SECONDS), None
    except MaestroError as exc:
        log.warning(f"could not count the tenants' rows, asking again next tick: {exc}")
        return {}, f"could not count the rows of {len(tenants):,} waiting tenants, asking again next tick: {exc}"


def first_trainings(context, source: DataSource, watched, models, requested: dict[str, str], untrainable_of):
    """(run requests, what the others wait for, the requests whose run is not visible yet). One
    request per state of a tenant's rows (the run_key and ROWS_TAG hold it), none while a
    training of it runs."""
    fingerprints, problem = fingerprints_of(source, [t.name for t in watched], context.log)
    if problem is not None:
        return [], [problem], {t.name: requested[t.name] for t in watched if t.name in requested}
    with_rows = [t.name for t in watched if fingerprints.get(t.name, NO_ROWS).row_count]
    lasts = last_trainings(context.instance, with_rows, models)
    notes, candidates, pending = [], [], {}
    for tenant in watched:
        fingerprint = fingerprints.get(tenant.name)
        if fingerprint is None:  # not reached this tick (a source asked tenant by tenant)
            pending.update({tenant.name: requested[tenant.name]} if tenant.name in requested else {})
            continue
        if not fingerprint.row_count:
            notes.append(no_rows_yet(tenant.name, source))
            continue
        last, mark = lasts.get(tenant.name), digest(fingerprint.tag)
        asked = requested.get(tenant.name) == mark
        if asked and (last is None or last.rows != fingerprint.tag):
            pending[tenant.name] = mark  # requested, its run not seen yet
        if last is not None and not last.finished:
            notes.append(f"{tenant.name}: first training running ({run_named(last)})")
        elif asked or (last is not None and not rows_changed_since(last, fingerprint)):
            outcome = f"{last.outcome} ({run_named(last)})" if last is not None else "requested"
            notes.append(f"{tenant.name}: first training {outcome}; {new_rows_hint(tenant.name, source)}")
        else:
            candidates.append((tenant, fingerprint))
    return request_first_trainings(candidates, untrainable_of, notes, pending), notes, pending


def request_first_trainings(candidates, untrainable_of, notes: list[str], pending: dict[str, str]):
    """Run requests for the candidates whose rows can train, at most REQUESTS_PER_TICK of them
    (the rest wait for the next ticks); whether rows can train is one query per batch."""
    requests, waiting = [], 0
    for start in range(0, len(candidates), REQUESTS_PER_TICK):
        batch = candidates[start:start + REQUESTS_PER_TICK]
        if len(requests) >= REQUESTS_PER_TICK:
            waiting += len(batch)
            continue
        untrainable = untrainable_of([tenant.name for tenant, _ in batch])
        for tenant, fingerprint in batch:
            if tenant.name in untrainable:
                notes.append(f"{untrainable[tenant.name]}; add rows with `maestro tenants load {tenant.name} FILE`")
            elif len(requests) >= REQUESTS_PER_TICK:
                waiting += 1
            else:
                pending[tenant.name] = digest(fingerprint.tag)
                requests.append(dg.RunRequest(
                    partition_key=tenant.name, run_key=f"first-training-{tenant.name}-{tenant.id}-{fingerprint.tag}",
                    tags={TRIGGER_TAG: FIRST_TRAINING, ROWS_TAG: fingerprint.tag}))
    if waiting:
        notes.insert(0, f"{waiting:,} more first trainings wait for the next ticks "
                        f"(at most {REQUESTS_PER_TICK} are requested a tick)")
    return requests


def untrainable_check(conn, source: DataSource):
    """[tenant] -> {tenant: why its rows cannot train a model yet}. Known on the embedded default
    (training_rows in the platform database, one query on the tick's connection), where a run
    that would fail is not requested; a source of your own is not read twice: the training says it."""
    if source.url_variable == SOURCE_URL_VARIABLE:
        return lambda tenants: {}
    from maestro_pipelines.platform_db.training_rows import untrainable_tenants

    return lambda tenants: untrainable_tenants(conn, tenants)


def shown_notes(notes: list[str]) -> str:
    """The first SHOWN_NOTES waits, then how many more: a skip reason stays readable at 10,000 tenants."""
    shown = "; ".join(notes[:SHOWN_NOTES])
    return shown + (f"; and {len(notes) - SHOWN_NOTES:,} more tenants waiting" if len(notes) > SHOWN_NOTES else "")


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


# ---- retraining ----------------------------------------------------------------------------------


@dg.sensor(
    name="retraining_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=300,
    description="Requests a tenant's training when its source data changes (row count or newest timestamp); "
    "a tenant without a model yet is the tenant sensor's to train.",
)
def retraining_sensor(context: dg.SensorEvaluationContext, source: DataSource, platform_db: PlatformDatabase):
    from maestro_pipelines.platform_db.tenants import tenant_models

    state = read_retraining_state(context.cursor, datetime.now(timezone.utc))
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name))
    if not tenants:
        return dg.SkipReason("no tenant partitions yet")
    with platform_db.get_connection() as conn:
        models = tenant_models(conn)
    # A tenant without a model version (rows appearing, or changing after a first training
    # that failed) is watched by the tenant sensor, which requests its first training: one run, not two.
    trained = [t for t in tenants if has_model(models.get(t))]
    start = state.next % len(trained) if trained else 0
    order = trained[start:] + trained[:start]  # a source asked tenant by tenant resumes where it stopped
    fingerprints = source.tenant_fingerprints(order, deadline=time.monotonic() + FINGERPRINT_BUDGET_SECONDS)
    baselines = training_baselines(context.instance)
    requests, requested, waiting = retraining_requests(order, fingerprints, baselines, state)
    cursor = json.dumps({"since": state.since.isoformat(), "requested": dict(sorted(requested.items())),
                         "next": (start + len(fingerprints)) % len(trained) if trained else 0})
    if not requests:
        return dg.SensorResult(skip_reason=f"no data change in {len(fingerprints)} tenants with a model", cursor=cursor)
    if waiting:
        context.log.info(f"{waiting:,} more retrainings wait for the next ticks (at most {REQUESTS_PER_TICK} a tick)")
    return dg.SensorResult(run_requests=requests, cursor=cursor)


@dataclass(frozen=True)
class RetrainingState:
    """The retraining sensor's cursor. `since`: when it began (a lost cursor begins again: no
    training on a lost cursor); a tenant whose trainings recorded no fingerprint (trained before
    they did) has changed when a row is newer. `requested`: {tenant: digest of the ROWS_TAG asked}
    until its run shows. `seen`: an older cursor's fingerprints per tenant, read once."""

    since: datetime
    requested: dict[str, str]
    next: int = 0
    seen: dict[str, str] = field(default_factory=dict)


def read_retraining_state(cursor: str | None, now: datetime) -> RetrainingState:
    state = json.loads(cursor) if cursor else {}
    seen = {tenant: DataFingerprint(int(count), datetime.fromisoformat(newest) if newest else None).tag
            for tenant, (count, newest) in state.get("seen", {}).items() if count}
    since = datetime.fromisoformat(state["since"]) if "since" in state else now
    return RetrainingState(since, dict(state.get("requested", {})), int(state.get("next", 0)), seen)


def training_baselines(instance: dg.DagsterInstance) -> dict[str, str]:
    """{tenant: the rows its newest training was requested for or read}: a run in flight's
    ROWS_TAG, else the data version of its newest training_data (the fingerprint it read).
    Two queries, whatever the number of tenants."""
    versions = instance.event_log_storage.get_latest_tags_by_partition(
        TRAINING_DATA, dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG])
    baselines = {tenant: tags[DATA_VERSION_TAG] for tenant, tags in versions.items()
                 if ROWS_TAG_FORM.fullmatch(tags.get(DATA_VERSION_TAG, ""))}
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=train_and_deploy_job.name, statuses=IN_FLIGHT))
    for record in reversed(records):  # oldest first: the newest run's rows win
        tags = record.dagster_run.tags
        if PARTITION_TAG in tags and ROWS_TAG in tags:
            baselines[tags[PARTITION_TAG]] = tags[ROWS_TAG]
    return baselines


def retraining_requests(tenants, fingerprints, baselines, state: RetrainingState):
    """(run requests, {tenant: digest} requested and not yet seen, how many wait for the next ticks)."""
    requests, requested, waiting = [], {}, 0
    for tenant in tenants:
        fingerprint = fingerprints.get(tenant)
        if fingerprint is None:  # not reached this tick
            requested.update({tenant: state.requested[tenant]} if tenant in state.requested else {})
            continue
        baseline = baselines.get(tenant) or state.seen.get(tenant)
        if not fingerprint.row_count or not data_changed(fingerprint, baseline, state.since):
            continue
        mark = digest(fingerprint.tag)
        if state.requested.get(tenant) == mark:
            requested[tenant] = mark  # asked already; its run is not visible yet
        elif len(requests) >= REQUESTS_PER_TICK:
            waiting += 1
        else:
            requested[tenant] = mark
            newest = fingerprint.newest.isoformat() if fingerprint.newest else None
            requests.append(dg.RunRequest(partition_key=tenant, run_key=f"retrain-{tenant}-{fingerprint.row_count}-{newest}",
                                          tags={TRIGGER_TAG: DATA_CHANGE, ROWS_TAG: fingerprint.tag}))
    return requests, requested, waiting


def data_changed(fingerprint: DataFingerprint, baseline: str | None, since: datetime) -> bool:
    """The rows are not those of the baseline; without one, a row is newer than `since`."""
    if baseline is not None:
        return baseline != fingerprint.tag
    return fingerprint.newest is not None and fingerprint.newest > since
