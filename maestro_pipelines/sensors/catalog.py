"""`store_catalog_sensor`: what was done outside Dagster, in Dagster's history.

`maestro backup run`, `maestro backup archive` and `maestro drill` work on the object store
without Dagster (that is the point: they work when Dagster is what was lost). Their results
are in the store, so this sensor reads the store and reports each one Dagster has not
recorded as an asset event, with the metadata Dagster's own runs record (the same builders):

- a committed backup -> a materialization of `database_backup` (`taken_by` says it was taken
  outside Dagster), and, once the store has its verification record, an evaluation of the
  check `verified` (passed, or failed with the problems);
- a monthly archive -> a materialization of `monthly_archive` with its month;
- a drill run elsewhere (source `cli` or `library`) -> a materialization of `dr_drill` and
  evaluations of its RTO and RPO checks, or an observation for a drill that did not restore
  (as `dr_drill` records a failed drill).

So each asset's page is the whole history and its Plots tab has a point per backup or drill,
whoever took it. Dagster stamps a reported event with the tick's time, not the backup's:
events go oldest first, and the real moment is in the metadata (`snapshot_at`, `started_at`).

Nothing is recorded twice: a backup, archive or drill whose id is in the metadata of one of
the asset's events is skipped (Dagster's own backups carry `backup_id`), and while a Dagster
run that takes a backup or archive is in progress, the backups (archives) started since it
was created wait for the next tick (its materialization comes when it ends). The cursor holds,
per kind, a horizon id and the ids reported above it (`_Stream`); ids sort by start time,
and what was started more than `SETTLED_AFTER` ago and is not in the store yet is taken as
never coming. Each tick stops building events after `TICK_BUDGET_S`; the rest come next tick.

It only reads the store and writes Dagster's event log (no pg_dump, no deletion, no run), so
it is RUNNING by default, on the embedded default too. A store it cannot read skips the tick
with the error's line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.assets.backups import BACKUP_ASSET, VERIFIED_CHECK
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import ObjectStoreResource
from maestro_pipelines.sensors.backups import load_state

ARCHIVE_ASSET = dg.AssetKey("monthly_archive")
DRILL_ASSET = dg.AssetKey("dr_drill")
CATALOG_INTERVAL_S = 60
TICK_BUDGET_S = 20.0
"""Seconds a tick spends building events before leaving the rest for the next one (a sensor
evaluation times out after 60 s)."""
SETTLED_AFTER = timedelta(days=3)
"""A backup or drill is in the store once it ends, under an id of its start: one started
longer ago than this and not in the store yet is taken as never coming."""
CLOCK_SKEW = timedelta(minutes=1)
"""Margin for the clocks of the hosts that took a backup and that run Dagster."""
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
MAX_AWAITING_VERIFICATION = 100
OUTSIDE_DAGSTER = {
    "backup": "outside Dagster: `maestro backup run` (the CLI) or a program calling create_backup",
    "archive": "outside Dagster: `maestro backup archive` (the CLI) or a program calling archive_month",
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Stream:
    """One kind's cursor: ids sort by start time; every id above `after` not in `seen` is new."""

    after: str = ""
    seen: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, state: object) -> "_Stream":
        if not isinstance(state, dict):
            return cls()
        return cls(str(state.get("after") or ""), {str(i) for i in state.get("seen") or []})

    def is_new(self, ident: str) -> bool:
        return ident > self.after and ident not in self.seen

    def settle(self, horizon: str, pending: list[str]) -> dict:
        """The cursor after a tick: the horizon moves up to `horizon`, never past an id left
        pending (busy, or beyond the budget) nor down; `seen` keeps only the ids above it."""
        floor = min([horizon] + [ident[:-1] for ident in pending])
        after = max(self.after, floor)
        return {"after": after, "seen": sorted(i for i in self.seen if i > after)}


@dataclass
class _Budget:
    deadline: float
    left_over: int = 0

    def spent(self) -> bool:
        return time.monotonic() > self.deadline


def _busy_since(instance: dg.DagsterInstance) -> dict[str, datetime]:
    """kind -> creation time of the oldest in-progress Dagster run that will record it:
    `backup` (a run materializing database_backup, whose backup is in the store before its
    materialization), `archive` (monthly_archive), `verify` (a run recording the check)."""
    from maestro_pipelines.dagster_support import KIND_TAG

    busy: dict[str, datetime] = {}
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS), limit=500):
        run = record.dagster_run
        touched = {key.to_user_string() for key in (run.asset_selection or ())} | set(run.step_keys_to_execute or ())
        kinds = set()
        if "database_backup" in touched or run.tags.get(KIND_TAG) == "backup":
            kinds |= {"backup", "verify"}
        if run.tags.get(KIND_TAG) == "verify":
            kinds.add("verify")
        if "monthly_archive" in touched or run.tags.get(KIND_TAG) == "archive":
            kinds.add("archive")
        created = record.create_timestamp.astimezone(timezone.utc) - CLOCK_SKEW
        for kind in kinds:
            busy[kind] = min(busy.get(kind, created), created)
    return busy


def _recorded(instance: dg.DagsterInstance, asset_key: dg.AssetKey, key_of, since: datetime,
              observations: bool = False) -> set[str]:
    """The ids (`key_of(metadata)`) in the metadata of the asset's events since `since`:
    what Dagster already has. Every event of a backup or drill is later than its start."""
    found: set[str] = set()
    fetches = [instance.fetch_materializations] + ([instance.fetch_observations] if observations else [])
    records_filter = dg.AssetRecordsFilter(asset_key=asset_key, after_timestamp=(since - CLOCK_SKEW).timestamp())
    for fetch in fetches:
        cursor = None
        while True:
            result = fetch(records_filter, limit=1000, cursor=cursor, ascending=True)
            for record in result.records:
                event = record.asset_event
                ident = key_of(event.metadata) if event is not None else None
                if ident:
                    found.add(ident)
            if not result.has_more:
                break
            cursor = result.cursor
    return found


def _metadata_text(metadata, *names: str) -> str | None:
    values = [metadata.get(name) for name in names]
    if any(value is None for value in values):
        return None
    return "/".join(str(value.value) for value in values)


def _checked_backups(instance: dg.DagsterInstance) -> set[str]:
    """Backup ids with an evaluation of the check `verified` among its latest ones."""
    check_key = dg.AssetCheckKey(BACKUP_ASSET, VERIFIED_CHECK)
    found = set()
    for record in instance.event_log_storage.get_asset_check_execution_history(check_key, limit=500):
        evaluation = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        value = getattr(evaluation, "metadata", {}).get("backup_id") if evaluation is not None else None
        if value is not None:
            found.add(str(value.value))
    return found


def _backup_id_at(moment: datetime) -> str:
    return f"{moment.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def _drill_id_at(moment: datetime) -> str:
    return f"{moment.astimezone(timezone.utc):%Y%m%dT%H%M%S%fZ}"


def verified_evaluation(entry) -> dg.AssetCheckEvaluation:
    """The check `verified` for a backup from its verification record in the store."""
    from maestro_pipelines.assets.backups import verified_check_result

    record = entry.verification
    fields = verified_check_result(record)
    if record.ok and not entry.verified:  # verified, then its manifest changed: the record is for other bytes
        fields["passed"] = False
        fields["description"] = (f"Backup {entry.backup_id} failed verification: its manifest changed since it was "
                                 f"verified ({entry.bad or 'the verification names other manifest bytes'})")
    fields["metadata"]["verified_at"] = dg.MetadataValue.timestamp(record.verified_at)
    return dg.AssetCheckEvaluation(asset_key=BACKUP_ASSET, check_name=VERIFIED_CHECK, blocking=True, **fields)


def backup_events(entry, object_store, entries, now: datetime) -> list:
    """A backup taken outside Dagster as database_backup's events: its materialization (the
    metadata database_backup records), then its check `verified` if it was verified."""
    from maestro_pipelines.assets.backups import backup_history_metadata

    metadata = backup_history_metadata(entry.manifest, object_store, entries, now, entry.verification,
                                       taken_by=OUTSIDE_DAGSTER["backup"])
    if entry.verification is not None:  # a record for other manifest bytes does not make it verified
        metadata["verified"] = dg.MetadataValue.bool(entry.verified)
    events = [dg.AssetMaterialization(
        asset_key=BACKUP_ASSET, metadata=metadata,
        description=f"Backup {entry.backup_id}, taken outside Dagster, recorded from the store by store_catalog_sensor",
    )]
    if entry.verification is not None:
        events.append(verified_evaluation(entry))
    return events


def _backup_stream(instance, object_store, state: dict, busy: dict, budget: _Budget, now: datetime):
    """(events, cursor part, backups reported) for database_backup."""
    from maestro_pipelines.backup import list_backups

    stream = _Stream.load(state.get("backups"))
    entries = list_backups(object_store)
    by_id = {entry.backup_id: entry for entry in entries}
    awaiting = {i for i in state.get("unverified") or [] if i in by_id}
    candidates = [e for e in entries if e.manifest is not None and stream.is_new(e.backup_id)]
    recorded = (_recorded(instance, BACKUP_ASSET, lambda md: _metadata_text(md, "backup_id"),
                          min(e.started_at for e in candidates)) if candidates else set())
    events, pending, reported = [], [], 0
    for entry in candidates:
        if entry.backup_id in recorded:
            stream.seen.add(entry.backup_id)
        elif ("backup" in busy and entry.started_at >= busy["backup"]) or budget.spent():
            pending.append(entry.backup_id)
        else:
            events += backup_events(entry, object_store, entries, now)
            stream.seen.add(entry.backup_id)
            reported += 1
            if entry.verification is None:
                awaiting.add(entry.backup_id)
    events += _later_verifications(instance, by_id, awaiting, busy)
    part = {"backups": stream.settle(_backup_id_at(now - SETTLED_AFTER), pending),
            "unverified": sorted(awaiting)[-MAX_AWAITING_VERIFICATION:]}
    budget.left_over += len(pending)
    return events, part, reported


def _later_verifications(instance, by_id: dict, awaiting: set[str], busy: dict) -> list:
    """The check `verified` of backups recorded before they were verified (`maestro backup run`
    verifies after committing; `maestro backup verify` later), unless Dagster recorded it
    (verify_backup_job does). `awaiting` loses the ids settled."""
    ready = sorted(i for i in awaiting if by_id[i].verification is not None)
    if not ready or "verify" in busy:
        return []
    checked = _checked_backups(instance)
    events = [verified_evaluation(by_id[i]) for i in ready if i not in checked]
    awaiting.difference_update(ready)
    return events


def _archive_stream(instance, object_store, state: dict, busy: dict, budget: _Budget):
    """(events, cursor part, archives reported) for monthly_archive: archives are few (one a
    month, retention keeps a year), so the cursor is the archives seen that are still in the store."""
    from maestro_pipelines.assets.backups import archive_metadata
    from maestro_pipelines.backup import list_backups

    archives = sorted((e for e in list_backups(object_store, monthly=True) if e.manifest is not None),
                      key=lambda e: (e.month, e.backup_id))
    seen = {root for root in state.get("archives") or [] if isinstance(root, str)}
    new = [e for e in archives if e.root not in seen]
    recorded = (_recorded(instance, ARCHIVE_ASSET, lambda md: _metadata_text(md, "month", "backup_id"),
                          min(e.started_at for e in new)) if new else set())
    events, reported = [], 0
    for entry in new:
        if f"{entry.month}/{entry.backup_id}" in recorded:
            seen.add(entry.root)
        elif "archive" in busy or budget.spent():
            budget.left_over += 1
        else:
            events.append(dg.AssetMaterialization(
                asset_key=ARCHIVE_ASSET, metadata=archive_metadata(entry, object_store, OUTSIDE_DAGSTER["archive"]),
                description=f"Archive of {entry.month} (backup {entry.backup_id}), made outside Dagster, "
                            "recorded from the store by store_catalog_sensor",
            ))
            seen.add(entry.root)
            reported += 1
    return events, {"archives": sorted(seen & {e.root for e in archives})}, reported


def drill_events(record, store_url: str, history: list, log) -> list:
    """A drill run outside Dagster as dr_drill's events: a materialization and its RTO and RPO
    checks when it restored its backup, an observation when it did not (as dr_drill records
    them), with the drill history and RTO chart of the drills up to it (`history`: records)."""
    from maestro_pipelines.assets.drills import (
        CHART_DRILLS, drill_history_metadata, drill_record_metadata, restore_worked, target_check_fields,
    )

    upto = [r for r in history if (r.started_at, r.drill_id) <= (record.started_at, record.drill_id)][-CHART_DRILLS:]
    metadata = {
        **drill_record_metadata(record, store_url),
        "drill_id": dg.MetadataValue.text(record.drill_id),
        **drill_history_metadata(upto, record.rto_target_s, log),
    }
    description = f"Drill {record.drill_id}, run by {record.where} outside Dagster, recorded from the store"
    if not restore_worked(record):
        return [dg.AssetObservation(asset_key=DRILL_ASSET, metadata=metadata, description=description)]
    return [dg.AssetMaterialization(asset_key=DRILL_ASSET, metadata=metadata, description=description)] + [
        dg.AssetCheckEvaluation(asset_key=DRILL_ASSET, **fields) for fields in target_check_fields(record)
    ]


def _drill_stream(instance, object_store, state: dict, budget: _Budget, now: datetime, log):
    """(events, cursor part, drills reported) for dr_drill: drills Dagster ran are its own."""
    from maestro_pipelines.assets.drills import CHART_DRILLS
    from maestro_pipelines.backup.drill_history import list_drills

    stream = _Stream.load(state.get("drills"))
    new = list_drills(object_store, after=stream.after or None, log=log.warning).records
    candidates = [r for r in new if r.source != "dagster" and stream.is_new(r.drill_id)]
    if not candidates:
        return [], {"drills": stream.settle(_drill_id_at(now - SETTLED_AFTER), [])}, 0
    recorded = _recorded(instance, DRILL_ASSET, lambda md: _metadata_text(md, "drill_id"),
                         min(r.started_at for r in candidates), observations=True)
    history = list_drills(object_store, limit=CHART_DRILLS + len(new)).records  # each one's last drills
    events, pending, reported = [], [], 0
    for record in candidates:
        if record.drill_id in recorded:
            stream.seen.add(record.drill_id)
        elif budget.spent():
            pending.append(record.drill_id)
        else:
            events += drill_events(record, object_store.url, history, log)
            stream.seen.add(record.drill_id)
            reported += 1
    budget.left_over += len(pending)
    return events, {"drills": stream.settle(_drill_id_at(now - SETTLED_AFTER), pending)}, reported


def _count(number: int, what: str) -> str:
    return f"{number} {what}{'' if number == 1 else 's'}"


@dg.sensor(
    name="store_catalog_sensor",
    minimum_interval_seconds=CATALOG_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Records in Dagster what was done outside it: backups (`maestro backup run`), monthly archives "
        "(`maestro backup archive`) and drills (`maestro drill`) found in the object store become "
        "materializations of database_backup (with the check `verified`), monthly_archive and dr_drill, so "
        "each asset's page is the whole history. It only reads the store and writes Dagster's event log "
        "(no pg_dump, no deletion, no run): running by default, on the embedded default too."
    ),
)
def store_catalog_sensor(context: dg.SensorEvaluationContext, store: ObjectStoreResource):
    state = load_state(context.cursor)
    budget = _Budget(time.monotonic() + TICK_BUDGET_S)
    now = _now()
    busy = _busy_since(context.instance)  # before reading the store: see the module's docstring
    try:
        object_store = store.get_store()
        backups, backup_part, n_backups = _backup_stream(context.instance, object_store, state, busy, budget, now)
        archives, archive_part, n_archives = _archive_stream(context.instance, object_store, state, busy, budget)
        drills, drill_part, n_drills = _drill_stream(context.instance, object_store, state, budget, now, context.log)
    except MaestroError as exc:
        return dg.SkipReason(f"The store cannot be read: {str(exc).splitlines()[0]}")
    cursor = json.dumps({**backup_part, **archive_part, **drill_part}, sort_keys=True)
    later = (f"; {budget.left_over} left for a later tick (a Dagster backup or archive run is in progress, "
             "or this tick's time was up)") if budget.left_over else ""
    if not (backups or archives or drills):
        return dg.SensorResult(skip_reason=f"Nothing new in the store{later}", cursor=cursor)
    done = ", ".join(_count(n, what) for n, what in ((n_backups, "backup"), (n_archives, "archive"),
                                                     (n_drills, "drill")) if n)
    summary = f"Recorded from the store: {done or 'verifications of backups recorded before'}{later}"
    return dg.SensorResult(asset_events=backups + archives + drills, skip_reason=summary, cursor=cursor)


catalog_sensors = [store_catalog_sensor]
