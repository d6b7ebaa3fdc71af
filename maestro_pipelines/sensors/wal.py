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

from maestro_pipelines.assets.pitr import WAL_ARCHIVE, servers_of
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
    """What the sensor knows of one server: archiving on, newest segment in the store, age of
    the WAL waiting, and the problem (None when none)."""
    from maestro_pipelines.backup.pitr.base import server_system_id
    from maestro_pipelines.backup.pitr.wal import archiver_status, list_wal

    status = archiver_status(server.url, server.source)
    state = {"server": server.source, "archiving": status.archiving, "problem": status.problem}
    if not status.archiving:
        return state
    system_id = server_system_id(server.url, server.source)
    segments = [w for w in list_wal(object_store, system_id) if len(w.name) == 24]
    newest = max(segments, key=lambda w: w.name, default=None)
    state.update(system_id=system_id, newest_wal=newest.name if newest else None,
                 newest_at=newest.last_modified.isoformat() if newest and newest.last_modified else None,
                 failed_count=status.failed_count, last_failed_wal=status.last_failed_wal)
    waiting = getattr(status, "unarchived_bytes", None)
    state["waiting_bytes"] = waiting
    if newest is None or newest.last_modified is None:
        state["problem"] = state["problem"] or "no WAL segment in the store yet"
        return state
    age = now - newest.last_modified
    state["age_s"] = round(age.total_seconds(), 1)
    if (waiting is None or waiting > 0) and age > PITR_RPO_TARGET + ALERT_GRACE:
        state["problem"] = state["problem"] or (
            f"WAL written on the server has not reached the store for {human_duration(age.total_seconds())} "
            f"(newest archived: {newest.name}); target {human_duration(PITR_RPO_TARGET.total_seconds())}")
    return state


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

    previous, now = load_state(context.cursor), _now()
    try:
        object_store = store.get_store()
        targets, _ = live_destinations(platform_db, mlflow)
        states = [server_wal_state(server, object_store, now) for server in servers_of(targets)]
    except MaestroError as exc:
        states = [{"server": "the WAL archive", "archiving": False, "problem": f"cannot be read: {exc}"}]
    failing = [s for s in states if s["archiving"] and s["problem"]] or [s for s in states if "cannot be read" in (s["problem"] or "")]
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
