"""`backup_info` judges the RPO by a clock: the latest restorable backup's snapshot against the
target, as the RPO sensor does. A real backup in a real store, judged at chosen moments
(the `now` parameter) instead of waiting a day; the CLI's output of the other states is
tested in tests/test_cli_backup_info.py."""

from __future__ import annotations

from datetime import timedelta

from maestro_pipelines.backup import DatabaseTarget, create_backup, verify_backup
from maestro_pipelines.backup.info import ERROR, OK, WARNING, backup_info
from maestro_pipelines.objectives import RPO_TARGET
from maestro_pipelines.sensors import backups as sensors


def test_the_rpo_is_ok_then_close_then_missed_as_the_latest_backup_ages(pg18_databases, local_case):
    dbs = pg18_databases
    database = dbs.create()
    dbs.execute(database, "CREATE TABLE tenants (id int PRIMARY KEY)", "INSERT INTO tenants VALUES (1)")
    manifest = create_backup(local_case.store, [DatabaseTarget("platform", dbs.url(database))])
    assert verify_backup(local_case.store, manifest.backup_id).ok
    taken = manifest.snapshot_at
    assert sensors.RPO_TARGET is RPO_TARGET == timedelta(hours=26), "the sensor alerts on the same target"

    fresh = backup_info(local_case.store, now=taken + timedelta(hours=3))
    assert (fresh.status, fresh.findings, fresh.exit_code) == (OK, [], 0)
    assert fresh.as_dict()["rpo"] == {"target_s": 93600.0, "age_s": 3 * 3600.0, "ok": True}

    close = backup_info(local_case.store, now=taken + timedelta(hours=25, minutes=30))
    assert (close.status, close.exit_code) == (WARNING, 1)
    [finding] = close.findings
    assert finding.message == "RPO close to its target: 30 min left before it is missed"
    assert "maestro backup run" in finding.hint

    missed = backup_info(local_case.store, now=taken + timedelta(hours=27))
    assert (missed.status, missed.exit_code, missed.status_line()) == (ERROR, 2, "error (RPO missed)")
    [finding] = missed.findings
    assert finding.message.startswith(f"RPO missed: the latest restorable backup, {manifest.backup_id}, holds the data as of ")
    assert finding.message.endswith(", 27 h ago (target 26 h)")
    assert missed.as_dict()["rpo"] == {"target_s": 93600.0, "age_s": 27 * 3600.0, "ok": False}
    assert missed.latest.backup_id == manifest.backup_id, "still the restore point, only too old"
