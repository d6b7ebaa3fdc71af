"""Backup sensors: RPO breach alerts, alerts on failed backup runs, verification of backups
taken outside Dagster.

- `rpo_breach_sensor` reads the store (the latest verified backup, through the library) and
  alerts once when that backup's snapshot gets older than `RPO_TARGET`, or when there is no
  verified backup, or the store cannot be read. It also alerts once per live restore that stopped
  half way (a swap journal whose restore is gone: `maestro restore status|finish|undo`). Its cursor holds the state (ok, breach,
  unreadable): one alert per incident, none while it lasts, none on recovery (logged), and
  one again for the next incident. An alert the webhook did not take is tried again on the
  next evaluation. A new production deployment alerts once, until its first backup is
  verified (`maestro backup run`, or Materialize `database_backup`).
- `backup_failure_alert_sensor` alerts on every failed run of a backup-family job: runs
  tagged `maestro/kind` in `ALERTED_KINDS` (backup, archive, retention, verify, restore,
  drill, and the platform upkeep) and runs that materialize a backup asset from the UI
  (those carry no job tags).
- `verify_new_backup_sensor` requests `verify_backup_job` (run_key = backup id) for each
  committed, unverified backup it has not seen: `database_backup` verifies its own backup,
  so in practice these are backups taken by `maestro backup run`.

Default status: the alert sensor is RUNNING everywhere (it only reads the event log and
posts alerts, logged only without a webhook); the other two follow the schedules (RUNNING
in production, STOPPED on the embedded default: see `maestro_pipelines.schedules.backups`).
"""

import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.environment import AUTOMATION_ON_BY_DEFAULT
from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_HINT
from maestro_pipelines.dagster_support import KIND_TAG
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.jobs.backups import verify_backup_job
from maestro_pipelines.objectives import RPO_TARGET, RPO_TARGET_HOURS
from maestro_pipelines.resources import AlertResource, ObjectStoreResource

ALERTED_KINDS = frozenset({"backup", "archive", "retention", "verify", "restore", "drill", "pitr-drill", "upkeep"})
BACKUP_ASSETS = frozenset({"database_backup", "monthly_archive", "base_backup"})
MAX_VERIFY_REQUESTS = 20
"""Verification runs one evaluation requests at most; the rest come on the next ones."""

DEFAULT_STATUS = dg.DefaultSensorStatus.RUNNING if AUTOMATION_ON_BY_DEFAULT else dg.DefaultSensorStatus.STOPPED


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 72 else f"{hours / 24:.1f} days"


def load_state(cursor: str | None) -> dict:
    """A sensor's JSON cursor as a dict; an empty, unreadable or non-object cursor is a fresh start."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        state = {}
    return state if isinstance(state, dict) else {}


@dg.sensor(
    name="rpo_breach_sensor",
    minimum_interval_seconds=300,
    default_status=DEFAULT_STATUS,
    description=(
        "Alerts (AlertResource, MAESTRO_ALERT_WEBHOOK) once per breach when the latest verified backup "
        f"is older than the RPO target ({RPO_TARGET_HOURS:g} h), when there is none, or when the store cannot be read. "
        + STOPPED_ON_EMBEDDED_HINT
    ),
)
def rpo_breach_sensor(context: dg.SensorEvaluationContext, store: ObjectStoreResource, alerts: AlertResource):
    return _with_half_done_restores(context, store, alerts, _rpo_evaluation(context, store, alerts))


def _with_half_done_restores(context, store: ObjectStoreResource, alerts: AlertResource,
                             result: dg.SensorResult) -> dg.SensorResult:
    """Alert once per live restore that stopped half way (its swap journal in the store, its
    process gone): the live databases are then from two moments, and an RPO that looks ok
    says nothing about them. The alerted journals are kept in the cursor (`half_done`)."""
    from maestro_pipelines.backup.journal import interrupted_swaps

    state = load_state(result.cursor)
    try:
        found = interrupted_swaps(store.get_store())
    except MaestroError:
        return result  # the store cannot be read: _rpo_evaluation alerted on that
    alerted = set(load_state(context.cursor).get("half_done") or [])
    if not found and not alerted:
        return result
    for journal in found:
        if journal.stamp in alerted:
            continue
        detail = (f"{journal.summary()}. Run `maestro restore status`, then `maestro restore finish` or "
                  f"`maestro restore undo` (with --confirm). Store: {store_url(store)}.")
        if alerts.send("Live restore stopped half way: the databases are from two moments", detail, "critical",
                       log=context.log):
            alerted.add(journal.stamp)
    state["half_done"] = sorted(alerted & {journal.stamp for journal in found})
    reason = result.skip_reason.skip_message if result.skip_reason else ""
    if found:
        reason = f"HALF-DONE RESTORE: {found[0].summary()}; " + reason
    return dg.SensorResult(skip_reason=reason, cursor=json.dumps(state))


def _rpo_evaluation(context: dg.SensorEvaluationContext, store: ObjectStoreResource, alerts: AlertResource):
    from maestro_pipelines.backup import newest_verified

    previous = load_state(context.cursor)
    now = _now()
    try:
        object_store = store.get_store()
        newest = newest_verified(object_store, check=True)  # a damaged newest one does not count
    except MaestroError as exc:
        status, title, detail, newest_id = (
            "unreadable",
            "Backup store unreadable: the RPO cannot be checked",
            f"Reading the backup store failed: {exc}",
            previous.get("newest"),
        )
    else:
        newest_id = newest.backup_id if newest else None
        if newest is None:
            status, title = "breach", "RPO breached: no verified backup"
            detail = "There is no verified backup in the store."
        else:
            snapshot = newest.manifest.snapshot_at
            age = now - snapshot
            if age <= RPO_TARGET:
                if previous.get("status") in ("breach", "unreadable"):
                    context.log.info(
                        f"RPO recovered: backup {newest_id} is {_age(age)} old (the {previous['status']} "
                        f"since {previous.get('since')} is over)"
                    )
                state = {"status": "ok", "newest": newest_id}
                return dg.SensorResult(
                    skip_reason=f"Latest verified backup {newest_id} is {_age(age)} old (target {_age(RPO_TARGET)})",
                    cursor=json.dumps(state),
                )
            status, title = "breach", f"RPO breached: latest verified backup is {_age(age)} old"
            detail = (
                f"The latest verified backup, {newest_id}, holds the data as of "
                f"{snapshot.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC, {_age(age)} ago; the target is "
                f"{_age(RPO_TARGET)}. Check the nightly_backup runs and the verify runs."
            )
    if previous.get("status") == status:
        return dg.SensorResult(
            skip_reason=f"{title} (alerted at {previous.get('since')}; no new alert until it recovers)",
            cursor=json.dumps({**previous, "newest": newest_id}),
        )
    delivered = alerts.send(title, f"{detail} Store: {store_url(store)}.", "critical", log=context.log)
    if not delivered:
        # Keep the previous state: the next evaluation tries the alert again.
        return dg.SensorResult(skip_reason=f"{title} (the alert webhook failed: retried next time)", cursor=context.cursor)
    state = {"status": status, "since": now.isoformat(timespec="seconds"), "newest": newest_id}
    return dg.SensorResult(skip_reason=f"{title}: alert sent", cursor=json.dumps(state))


def store_url(store: ObjectStoreResource) -> str:
    """The store's URL for humans: a URL names a bucket and prefix, never credentials."""
    return store.url or "the local store under MAESTRO_HOME"


def _step_errors(failures) -> list[str]:
    errors = []
    for event in failures:
        data = event.step_failure_data
        error = data.error if data else None
        # A dg.Failure's message is its description; anything else starts with the exception's class.
        message = (error.message if error else event.message or "failed").strip()
        message = message.removeprefix("dagster._core.definitions.events.Failure: ")
        errors.append(f"{event.step_key}: {message.splitlines()[0] if message else 'failed'}"[:600])
    return errors


def is_backup_run(run: dg.DagsterRun, failed_steps=()) -> bool:
    """Tagged as a backup-family job, or running a backup asset (an ad hoc materialization
    from the UI carries no job tags; its steps are named after the assets)."""
    if run.tags.get(KIND_TAG) in ALERTED_KINDS:
        return True
    touched = {key.to_user_string() for key in (run.asset_selection or ())}
    touched |= set(run.step_keys_to_execute or ()) | set(failed_steps)
    return bool(touched & BACKUP_ASSETS)


@dg.run_failure_sensor(
    name="backup_failure_alert_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Alerts (AlertResource) when a backup, archive, retention or verification run fails, "
        "with the run id, job and error (runs tagged maestro/kind, or materializing a backup asset)."
    ),
)
def backup_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertResource):
    run = context.dagster_run
    failures = context.get_step_failure_events()
    if not is_backup_run(run, [event.step_key for event in failures]):
        return dg.SkipReason(f"run {run.run_id} of {run.job_name} is not a backup run")
    kind = run.tags.get(KIND_TAG) or "backup"
    partition = run.tags.get("dagster/partition")
    errors = _step_errors(failures) or [context.failure_event.message or "the run failed"]
    lines = [
        f"Job: {run.job_name}" + (f" (partition {partition})" if partition else ""),
        f"Run id: {run.run_id}",
    ]
    if run.tags.get("dagster/schedule_name") or run.tags.get("dagster/sensor_name"):
        lines.append(f"Launched by: {run.tags.get('dagster/schedule_name') or run.tags.get('dagster/sensor_name')}")
    lines.append("Error: " + " | ".join(errors))
    alerts.send(f"Maestro {kind} run failed: {run.job_name}", "\n".join(lines), "error", log=context.log)


@dg.sensor(
    name="verify_new_backup_sensor",
    job=verify_backup_job,
    minimum_interval_seconds=120,
    default_status=DEFAULT_STATUS,
    description=(
        "Requests verify_backup_job for each new committed backup that is not verified (e.g. taken by the CLI); "
        "the result is an evaluation of database_backup's check `verified`. " + STOPPED_ON_EMBEDDED_HINT
    ),
)
def verify_new_backup_sensor(context: dg.SensorEvaluationContext, store: ObjectStoreResource):
    from maestro_pipelines.backup import list_backups, running_activities

    try:
        seen = set(json.loads(context.cursor)) if context.cursor else set()
    except (ValueError, TypeError):
        seen = set()
    object_store = store.get_store()
    entries = list_backups(object_store)
    busy = {a.ident for a in running_activities(object_store) if a.kind in ("backup", "verify")}
    requests = []
    for entry in entries:
        if entry.backup_id in seen:
            continue
        if entry.verified or entry.verification_failed:
            seen.add(entry.backup_id)  # verified (or failed) by whoever took it (database_backup does)
            continue
        if entry.backup_id in busy:
            continue  # being verified right now: look again next time
        if len(requests) >= MAX_VERIFY_REQUESTS:
            break
        requests.append(
            dg.RunRequest(
                run_key=entry.backup_id,
                run_config={"ops": {"verify_stored_backup": {"config": {"backup_id": entry.backup_id}}}},
                tags={"maestro/trigger": "new-backup", "maestro/backup_id": entry.backup_id},
            )
        )
        seen.add(entry.backup_id)
    # Only ids still in the store: the cursor stays as small as retention keeps the store.
    cursor = json.dumps(sorted(seen & {e.backup_id for e in entries}))
    if not requests:
        return dg.SensorResult(skip_reason=f"No new unverified backup among {len(entries)}", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


backup_sensors = [rpo_breach_sensor, backup_failure_alert_sensor, verify_new_backup_sensor]
