"""store_catalog_sensor against a real store (local), the embedded PostgreSQL and a real
Dagster instance: what was done outside Dagster (`maestro backup run`, `maestro backup
archive`, `maestro drill`) becomes the assets' history, once each; a backup Dagster took is
not recorded twice. Each tick's events are reported to the instance as the daemon does
(`report_runless_asset_event`), so the assertions read what the asset pages show."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from maestro_pipelines.backup import list_backups, verify_backup
from maestro_pipelines.backup.drill_history import DrillRecord, new_drill_id, record_drill
from maestro_pipelines.resources import ObjectStoreResource
from maestro_pipelines.sensors.catalog import store_catalog_sensor

from ..test_cli import run_maestro
from .test_assets import checks_of

BACKUP, ARCHIVE, DRILL = dg.AssetKey("database_backup"), dg.AssetKey("monthly_archive"), dg.AssetKey("dr_drill")


def tick(env, cursor: str | None = None, store: ObjectStoreResource | None = None):
    context = dg.build_sensor_context(instance=env.instance, cursor=cursor,
                                      resources={"store": store or env.resources["store"]})
    result = store_catalog_sensor(context)
    for event in getattr(result, "asset_events", None) or []:
        env.instance.report_runless_asset_event(event)  # what the daemon does with a tick's events
    return result


def history(instance, key: dg.AssetKey) -> list:
    """The asset's materializations, oldest first (the order of its Plots tab)."""
    records = instance.fetch_materializations(key, limit=100, ascending=True).records
    return [record.asset_materialization for record in records]


def cli_env(env, tmp_path) -> dict[str, str]:
    return {"MAESTRO_HOME": str(tmp_path / "cli-home"), "MAESTRO_DATABASE_URL": env.databases.platform_url,
            "MAESTRO_STORE_URL": env.store_dir.as_uri()}


def test_a_cli_backup_becomes_one_materialization_with_its_verified_check(backup_env, tmp_path):
    taken = run_maestro("backup", "run", env=cli_env(backup_env, tmp_path))
    assert taken.returncode == 0, taken.stderr
    (entry,) = list_backups(backup_env.store())

    first = tick(backup_env)
    assert first.skip_reason.skip_message == "Recorded from the store: 1 backup"
    (materialization,) = history(backup_env.instance, BACKUP)
    metadata = materialization.metadata
    assert metadata["backup_id"].value == entry.backup_id
    assert metadata["taken_by"].value.startswith("outside Dagster: `maestro backup run`")
    assert metadata["snapshot_at"].value == pytest.approx(entry.manifest.snapshot_at.timestamp())
    assert metadata["stored_mib"].value == pytest.approx(entry.stored_bytes / 2**20, abs=0.001)
    assert metadata["verified"].value is True and metadata["verification"].value.startswith("ok: ")
    assert metadata["databases"].value == "platform, mlflow" and "dagster/row_count" in metadata
    assert f"| `{entry.backup_id}` |" in metadata["store_history"].value
    (check,) = checks_of(backup_env.instance)
    assert check.passed and check.metadata["backup_id"].value == entry.backup_id
    assert check.description == f"Backup {entry.backup_id} verified"

    again = tick(backup_env, first.cursor)
    assert again.skip_reason.skip_message == "Nothing new in the store" and not again.asset_events
    lost_cursor = tick(backup_env)  # a reset sensor: Dagster's history says what it has
    assert not lost_cursor.asset_events and len(history(backup_env.instance, BACKUP)) == 1


def test_backups_are_recorded_oldest_first_and_a_later_failed_verification_too(backup_env):
    start = datetime.now(timezone.utc) - timedelta(hours=3)
    older = backup_env.take_backup(at=start)
    newer = backup_env.take_backup(at=start + timedelta(hours=1), verify=False)  # `maestro backup run --no-verify`
    first = tick(backup_env)
    recorded = history(backup_env.instance, BACKUP)
    assert [m.metadata["backup_id"].value for m in recorded] == [older.backup_id, newer.backup_id]
    assert "rpo_closed_h" not in recorded[0].metadata
    assert recorded[1].metadata["rpo_closed_h"].value == pytest.approx(
        (newer.snapshot_at - older.snapshot_at).total_seconds() / 3600, abs=1e-4)
    assert "verified" not in recorded[1].metadata
    assert [c.metadata["backup_id"].value for c in checks_of(backup_env.instance)] == [older.backup_id]

    dump = backup_env.store_dir / "backups" / newer.backup_id / "platform.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-10])  # truncated
    assert not verify_backup(backup_env.store(), newer.backup_id).ok  # `maestro backup verify` later
    later = tick(backup_env, first.cursor)
    latest_check = checks_of(backup_env.instance)[0]
    assert not latest_check.passed and latest_check.metadata["backup_id"].value == newer.backup_id
    assert latest_check.description.startswith(f"Backup {newer.backup_id} failed verification: ")
    assert "platform.dump.zst" in latest_check.description
    assert len(history(backup_env.instance, BACKUP)) == 2, "a verification is a check, not another backup"
    assert not tick(backup_env, later.cursor).asset_events


def test_a_backup_dagster_took_is_not_recorded_twice(backup_env):
    own = backup_env.run("nightly_backup")
    assert own.success
    assert not tick(backup_env).asset_events and len(history(backup_env.instance, BACKUP)) == 1
    assert history(backup_env.instance, BACKUP)[0].metadata["taken_by"].value == f"Dagster run {own.run_id}"

    # A backup run in progress: a backup committed since its start is its own until it ends.
    run = backup_env.instance.add_run(dg.DagsterRun(
        job_name="nightly_backup", status=dg.DagsterRunStatus.STARTED, tags={"maestro/kind": "backup"}))
    committed = backup_env.take_backup()
    waiting = tick(backup_env)
    assert not waiting.asset_events and "1 left for a later tick" in waiting.skip_reason.skip_message
    backup_env.instance.report_run_failed(run)  # it ended without recording that backup
    ended = tick(backup_env, waiting.cursor)
    assert [m.metadata["backup_id"].value for m in history(backup_env.instance, BACKUP)][-1] == committed.backup_id
    assert not tick(backup_env, ended.cursor).asset_events


def _drill(source: str, started: datetime, rto_s: float | None, backup_id: str, ok: bool = True) -> DrillRecord:
    """A drill as `maestro drill` (source cli) or dr_drill (dagster) records it in the store."""
    restored = rto_s is not None
    return DrillRecord(new_drill_id(started), source, started, ok, 900.0, 93600.0, backup_id=backup_id,
                       restored=restored, rto_s=rto_s, rpo_s=120.0 if restored else None,
                       problems=[] if ok else ["counts differ in public.tenants"], steps={"pg_restore platform": 1.5})


def test_a_cli_archive_and_cli_drills_are_recorded(backup_env, tmp_path):
    backup = backup_env.take_backup()
    month = datetime.now(timezone.utc).strftime("%Y-%m")
    archived = run_maestro("backup", "archive", "--month", month, env=cli_env(backup_env, tmp_path))
    assert archived.returncode == 0, archived.stderr
    store = backup_env.store()
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    ok = _drill("cli", start, 8.25, backup.backup_id)
    failed = _drill("cli", start + timedelta(minutes=30), None, backup.backup_id, ok=False)
    dagster_own = _drill("dagster", start + timedelta(minutes=40), 9.0, backup.backup_id)
    slow = _drill("cli", start + timedelta(hours=1), 1000.0, backup.backup_id, ok=False)
    slow.problems = ["RTO 1000.0 s is over the target of 900 s"]  # a missed target: restored all the same
    for record in (ok, failed, dagster_own, slow):
        record_drill(store, record)

    first = tick(backup_env)
    assert first.skip_reason.skip_message == "Recorded from the store: 1 backup, 1 archive, 3 drills"
    (archive,) = history(backup_env.instance, ARCHIVE)
    assert archive.metadata["month"].value == month and archive.metadata["backup_id"].value == backup.backup_id
    assert archive.metadata["taken_by"].value.startswith("outside Dagster: `maestro backup archive`")
    drills = history(backup_env.instance, DRILL)
    assert [m.metadata["drill_id"].value for m in drills] == [ok.drill_id, slow.drill_id], "oldest first, CLI only"
    assert [m.metadata["rto_s"].value for m in drills] == [8.25, 1000.0]
    assert drills[0].metadata["started_at"].value == pytest.approx(ok.started_at.timestamp())
    assert drills[0].metadata["ran_from"].value == "cli" and drills[0].metadata["rto_target"].value == "15 min"
    plotted = {k for k, v in drills[0].metadata.items() if isinstance(v, (dg.FloatMetadataValue, dg.IntMetadataValue))}
    assert plotted == {"rto_s", "rpo_h"}, plotted
    assert "rto_history" in drills[1].metadata and "| cli | ok |" in drills[1].metadata["drill_history"].value
    observed = backup_env.instance.fetch_observations(DRILL, limit=10).records
    assert [r.asset_observation.metadata["drill_id"].value for r in observed] == [failed.drill_id]
    rto_checks = backup_env.instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(DRILL, "rto_within_target"), limit=10)
    assert [r.event.dagster_event.event_specific_data.passed for r in rto_checks] == [False, True]  # latest first

    assert not tick(backup_env, first.cursor).asset_events
    assert not tick(backup_env).asset_events, "nothing twice, even without the cursor"


def test_an_unreachable_store_skips_the_tick_with_the_error(backup_env, tmp_path):
    missing = ObjectStoreResource(url=(tmp_path / "no-such-store").as_uri())
    result = tick(backup_env, store=missing)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith("The store cannot be read: ") and "no-such-store" in result.skip_message
    assert "\n" not in result.skip_message
