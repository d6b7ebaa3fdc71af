"""`wal_rpo_sensor`: the RPO of the physical tier, every minute.

For each server Maestro backs up it reads the archiving status (`pitr.wal.archiver_status`:
pg_stat_archiver and the settings) and the newest WAL segment in the store, and
- records them as an observation of `wal_archive` (on a change of state, and at least every
  `OBSERVE_EVERY`): the newest archived segment and its time, failures, the WAL written since;
- alerts once per incident when WAL written on the server has waited longer than the target
  (`PITR_RPO_TARGET` plus one archive_timeout of grace) without reaching the store, or when
  archiving fails (a refused segment, an unreachable store), and logs the recovery.

An idle server writes no WAL, so an old newest segment is no risk by itself: only WAL written
after the newest archived segment counts. Servers whose archiving is off are reported in the
observation (the RPO there is the nightly dumps'), not alerted every minute: `maestro backup
info` and `base_backup` say so too.
"""

import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.assets.pitr import WAL_ARCHIVE
from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_HINT
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.formatting import human_duration
from maestro_pipelines.objectives import PITR_RPO_TARGET
from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.sensors.backups import DEFAULT_STATUS, load_state, store_url

ALERT_GRACE = timedelta(seconds=60)
"""One archive_timeout: a segment is switched that long after its first write at the latest."""
OBSERVE_EVERY = timedelta(minutes=10)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def server_wal_state(server, object_store, now: datetime) -> dict:
    """What the sensor knows of one server: whether it archives, the newest segment in the
    store and its age, and `alert` with the `problem` when its WAL is at risk."""
    from maestro_pipelines.backup.pitr.wal import archiver_status, newest_segment

    status = archiver_status(server.url, server.source)
    state = {"server": status.where, "archiving": status.archiving or status.failing, "problem": status.problem,
             "alert": status.failing, "failed_count": status.failed_count, "last_failed_wal": status.last_failed_wal,
             "last_archived_wal": status.last_archived_wal, "lag_segments": status.lag_segments}
    if not state["archiving"]:
        return state  # off, or a managed service's own PITR: said, not alerted every minute
    newest = newest_segment(object_store, status.system_id)
    state["newest_wal"] = newest.name if newest else None
    if newest is not None and newest.last_modified is not None:
        state["newest_at"] = newest.last_modified.isoformat()
        state["age_s"] = round((now - newest.last_modified).total_seconds(), 1)
    problem = _wal_at_risk(status, newest, now)
    if problem and not state["alert"]:
        state.update(alert=True, problem=problem)
    return state


def _wal_at_risk(status, newest, now: datetime) -> str | None:
    """Why WAL written on the server may wait longer than the target, or None. Judged by what
    the server's own archiver reports (pg_stat_archiver) and what the store holds, never by the
    newest segment's age alone: an idle server switches no segment (PostgreSQL writes nothing
    that counts), so an old newest segment is no risk by itself."""
    target = PITR_RPO_TARGET.total_seconds()
    if not status.archive_timeout_s or status.archive_timeout_s > target:
        setting = f"{status.archive_timeout_s} s" if status.archive_timeout_s else "0 (off)"
        return (f"archive_timeout is {setting} on {status.where}: WAL waits until a 16 MB segment fills, longer than "
                f"the {target:.0f} s target. Set archive_timeout = 60 and reload")
    waited = (now - status.last_archived_time) if status.last_archived_time else None
    if waited is None or waited <= PITR_RPO_TARGET + ALERT_GRACE:
        return None
    if status.last_archived_wal and (newest is None or newest.name < status.last_archived_wal):
        return (f"{status.where} archived {status.last_archived_wal} {human_duration(waited.total_seconds())} ago but "
                f"the store's newest is {newest.name if newest else 'none'}: the pusher is not running or the store "
                "refuses it (`maestro wal status`)")
    if status.lag_segments:
        return (f"{status.lag_segments} complete WAL segments of {status.where} wait to be archived, the last one "
                f"archived {human_duration(waited.total_seconds())} ago: archive_command is slow or stuck")
    return None


def _observation(states: list[dict]) -> dg.AssetObservation:
    metadata = {
        "servers": dg.MetadataValue.json(states),
        "archiving": dg.MetadataValue.text(
            ", ".join(f"{s['server']}: {'on' if s['archiving'] else 'OFF'}" for s in states)),
        "problems": dg.MetadataValue.md("\n".join(f"- {s['server']}: {s['problem']}" for s in states if s["problem"])
                                        or "none"),
    }
    ages = [s["age_s"] for s in states if s.get("age_s") is not None]
    if ages:
        metadata["newest_wal_age_s"] = dg.MetadataValue.float(max(ages))
    return dg.AssetObservation(asset_key=WAL_ARCHIVE, metadata=metadata)


@dg.sensor(
    name="wal_rpo_sensor",
    minimum_interval_seconds=60,
    default_status=DEFAULT_STATUS,
    description=(
        "Every minute: observes wal_archive (newest archived WAL per server, failures, age) and alerts once per "
        f"incident when WAL has waited longer than the PITR RPO target ({PITR_RPO_TARGET.seconds} s) or archiving "
        "fails. " + STOPPED_ON_EMBEDDED_HINT
    ),
)
def wal_rpo_sensor(context: dg.SensorEvaluationContext, platform_db: PlatformDatabase, mlflow: MLflowRegistry,
                   store: ObjectStoreResource, alerts: AlertResource):
    from maestro_pipelines.assets.drills import live_destinations
    from maestro_pipelines.backup.pitr.base import backup_servers

    previous, now = load_state(context.cursor), _now()
    try:
        object_store = store.get_store()
        targets, _ = live_destinations(platform_db, mlflow)
        states = [server_wal_state(server, object_store, now) for server in backup_servers(targets)]
    except MaestroError as exc:
        states = [{"server": "the WAL archive", "archiving": False, "problem": f"cannot be read: {exc}"}]
    failing = [s for s in states if s.get("alert") or "cannot be read" in (s["problem"] or "")]
    status = "breach" if failing else "ok"
    events = []
    observed_at = previous.get("observed_at")
    if status != previous.get("status") or not observed_at or now - datetime.fromisoformat(observed_at) > OBSERVE_EVERY:
        events.append(_observation(states))
        observed_at = now.isoformat()
    state = {"status": status, "observed_at": observed_at, "since": previous.get("since")}
    if status == "ok":
        if previous.get("status") == "breach":
            context.log.info(f"WAL archiving recovered (the breach since {previous.get('since')} is over)")
        return dg.SensorResult(asset_events=events, cursor=json.dumps({**state, "since": None}),
                               skip_reason="WAL archived within the target on every server that archives")
    detail = "; ".join(f"{s['server']}: {s['problem']}" for s in failing)
    if previous.get("status") != "breach":
        if not alerts.send("WAL archiving behind: the point-in-time RPO is missed", f"{detail}. Store: "
                           f"{store_url(store)}. Run `maestro wal status`.", "critical", log=context.log):
            return dg.SensorResult(asset_events=events, cursor=context.cursor,
                                   skip_reason=f"{detail} (the alert webhook failed: retried next time)")
        state["since"] = now.isoformat(timespec="seconds")
    return dg.SensorResult(asset_events=events, cursor=json.dumps(state), skip_reason=f"WAL RPO breached: {detail}")


wal_sensors = [wal_rpo_sensor]
