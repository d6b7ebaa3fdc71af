"""database_backup and monthly_archive materialized in process, retention and verification
as op jobs: real pg_dumps of the embedded PostgreSQL into a local store."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from maestro_pipelines.assets.backups import (
    BACKUP_ASSET,
    BACKUP_POOL,
    VERIFIED_CHECK,
    backup_step,
    database_backup,
    monthly_archive,
)
from maestro_pipelines.backup import list_backups, newest_verified
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.jobs.backups import apply_backup_retention, verify_stored_backup
from maestro_pipelines.storage import StoreUnavailable


VERIFIED = dg.AssetCheckKey(BACKUP_ASSET, VERIFIED_CHECK)


def step_failures(result) -> list[str]:
    return [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


def checks_of(instance, limit: int = 10):
    """The `verified` check's evaluations in the instance, latest first, as the asset page lists them."""
    records = instance.event_log_storage.get_asset_check_execution_history(VERIFIED, limit=limit)
    return [record.event.dagster_event.event_specific_data for record in records if record.event]


def test_nightly_backup_materializes_a_verified_backup_with_metadata(backup_env):
    result = backup_env.run("nightly_backup")
    assert result.success, step_failures(result)
    (materialization,) = result.asset_materializations_for_node("database_backup")
    assert materialization.partition is None  # one backup, one materialization: no day partitions
    metadata = materialization.metadata

    newest = newest_verified(backup_env.store())
    assert newest is not None and newest.backup_id == metadata["backup_id"].value
    assert metadata["verified"].value is True and metadata["verification"].value.startswith("ok")
    assert metadata["databases"].value == "platform, mlflow"
    # The session's server archives no WAL (MAESTRO_WAL_ARCHIVING=off): the RPO there is the dumps'.
    assert "RPO is this backup's age" in metadata["point_in_time"].value and "archive_mode is off" in metadata["point_in_time"].value
    assert newest.manifest.dump_bytes > 0 and newest.stored_bytes > 0
    assert metadata["stored_mib"].value == pytest.approx(newest.stored_bytes / 2**20, abs=0.001)
    assert metadata["dump_mib"].value == pytest.approx(newest.manifest.dump_bytes / 2**20, abs=0.001)
    assert "rpo_closed_h" not in metadata, "the first backup closed no gap: left out, not plotted as 0"
    assert metadata["encryption"].value.startswith("not encrypted (no backup key configured")
    # The verification is the asset check `verified`, recorded with the materialization.
    (check,) = checks_of(backup_env.instance)
    assert check.passed and check.asset_check_key == VERIFIED
    assert check.metadata["backup_id"].value == newest.backup_id
    assert check.description == f"Backup {newest.backup_id} verified"
    assert metadata["compression_ratio"].value > 1
    assert metadata["throughput_mib_per_s"].value > 0 and metadata["duration_s"].value > 0
    assert metadata["snapshot_at"].value == pytest.approx(newest.manifest.snapshot_at.timestamp())
    per_database = {row.data["role"]: row.data for row in metadata["per_database"].value.records}
    assert set(per_database) == {"platform", "mlflow"}
    tenants = next(t for t in newest.manifest.database("platform").tables if t.name == "tenants")
    assert tenants.rows == 3 and per_database["platform"]["rows"] >= 3
    assert "| platform | public.tenants | 3 |" in metadata["largest_tables"].value
    # Progress went to the run's log, database by database, ending at 100%.
    logs = [e.user_message for e in backup_env.instance.all_logs(result.run_id) if e.user_message]
    assert any(m.startswith("dump platform") and "~100%" in m for m in logs)
    assert not any("has no limit" in m for m in logs), "the instance limits the pool"


def test_with_a_backup_key_in_the_run_environment_the_asset_seals_verifies_and_says_so(backup_env, monkeypatch):
    """The key reaches the run as users give it, an environment variable the store resource reads
    (never config a Launchpad would store): the backup is sealed, verified with the key, and its
    metadata names the key by id only."""
    from maestro_pipelines.crypto import generate_key
    from maestro_pipelines.crypto.config import keyring_from_values

    key = generate_key()
    monkeypatch.setenv("MAESTRO_BACKUP_KEY", key)
    result = backup_env.run("nightly_backup")
    assert result.success, step_failures(result)
    (materialization,) = result.asset_materializations_for_node("database_backup")
    metadata = materialization.metadata
    key_id = keyring_from_values(key, None, None, None).current.id
    assert metadata["encryption"].value.startswith(f"encrypted (AES-256-GCM, its own data key wrapped by backup key {key_id})")
    assert metadata["verified"].value is True
    assert key not in json.dumps({name: str(value.value) for name, value in metadata.items()})
    newest = newest_verified(backup_env.store())
    assert newest.manifest.encrypted and newest.backup_id == metadata["backup_id"].value


def test_every_step_that_writes_the_store_shares_one_limited_pool(backup_env):
    """Two backups never run at once: the pool is on each step and the instance limits it."""
    assert database_backup.op.pool == BACKUP_POOL
    assert monthly_archive.op.pool == BACKUP_POOL
    assert apply_backup_retention.pool == BACKUP_POOL and verify_stored_backup.pool == BACKUP_POOL
    from maestro_pipelines.definitions import defs

    nightly = defs.resolve_job_def("nightly_backup")
    assert nightly.tags["dagster/max_runtime"] == str(3 * 3600) and nightly.tags["maestro/kind"] == "backup"
    for job, kind in [("monthly_archive_job", "archive"), ("backup_retention", "retention"), ("verify_backup_job", "verify")]:
        assert defs.resolve_job_def(job).tags["maestro/kind"] == kind
    # The step claimed a slot of the pool (limited to 1 by this instance's config), which
    # allocates the pool's slots on first use, and gave it back.
    storage = backup_env.instance.event_log_storage
    assert storage.get_concurrency_info(BACKUP_POOL).slot_count == 0
    assert backup_env.run("nightly_backup").success
    info = storage.get_concurrency_info(BACKUP_POOL)
    assert info.limit == 1 and info.slot_count == 1 and info.active_slot_count == 0


def test_each_backup_records_the_rpo_it_closed(backup_env):
    """rpo_closed_h: hours from the previous backup's snapshot (one taken by the CLI counts) to this one's."""
    previous = backup_env.take_backup(verify=False)
    result = backup_env.run("nightly_backup")
    assert result.success, step_failures(result)
    metadata = result.asset_materializations_for_node("database_backup")[0].metadata
    gap = metadata["snapshot_at"].value - previous.snapshot_at.timestamp()
    assert gap > 0 and metadata["rpo_closed_h"].value == pytest.approx(gap / 3600, abs=1e-4)
    # The page's history has the backup Dagster never saw, latest first, each with its state.
    history = metadata["store_history"].value.splitlines()
    rows = [line for line in history if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [metadata["backup_id"].value, previous.backup_id]
    assert rows[0].endswith("| verified |") and rows[1].endswith("| not verified |")


def test_executing_the_check_alone_re_verifies_the_latest_backup_without_a_new_one(backup_env):
    from maestro_pipelines.definitions import defs

    assert backup_env.run("nightly_backup").success
    (backup,) = list_backups(backup_env.store())
    check_only = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={VERIFIED}, asset_selection=set()
    )

    def execute_check():
        return check_only.execute_in_process(instance=backup_env.instance, resources=backup_env.resources,
                                             raise_on_error=False)

    again = execute_check()
    assert again.success, step_failures(again)
    assert not again.asset_materializations_for_node("database_backup")
    assert [e.backup_id for e in list_backups(backup_env.store())] == [backup.backup_id]
    dump = backup_env.store_dir / "backups" / backup.backup_id / "platform.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-10])  # truncated since
    broken = execute_check()
    assert not broken.success
    latest, earlier, first = checks_of(backup_env.instance)
    assert first.passed and earlier.passed and not latest.passed
    assert latest.description.startswith(f"Backup {backup.backup_id} failed verification: ")
    assert "platform.dump.zst" in latest.description


def test_transient_store_errors_retry_and_configuration_errors_do_not():
    @backup_step
    def unavailable():
        raise StoreUnavailable("the store at s3://b did not answer", "Check the network")

    @backup_step
    def misconfigured():
        raise MaestroError("MAESTRO_STORE_URL is not a store URL", "Fix it")

    with pytest.raises(dg.Failure) as transient:
        unavailable()
    assert transient.value.allow_retries
    with pytest.raises(dg.Failure) as permanent:
        misconfigured()
    assert not permanent.value.allow_retries and "MAESTRO_STORE_URL" in permanent.value.description


def _previous_month() -> tuple[int, int]:
    now = datetime.now(timezone.utc)
    first = now.replace(day=1)
    last = first - timedelta(days=1)
    return last.year, last.month


def test_monthly_archive_copies_the_newest_verified_backup_of_the_month(backup_env):
    year, month = _previous_month()
    older = backup_env.take_backup(at=datetime(year, month, 10, 2, tzinfo=timezone.utc))
    newest = backup_env.take_backup(at=datetime(year, month, 20, 2, tzinfo=timezone.utc))
    backup_env.take_backup(at=datetime(year, month, 25, 2, tzinfo=timezone.utc), verify=False)  # never verified
    backup_env.take_backup()  # this month's: after the month's end
    config = {"ops": {"monthly_archive": {"config": {"month": f"{year}-{month:02d}"}}}}

    # database_backup was never materialized in this instance: the archive does not need it.
    result = backup_env.run("monthly_archive_job", run_config=config)
    assert result.success, step_failures(result)
    metadata = result.asset_materializations_for_node("monthly_archive")[0].metadata
    assert metadata["month"].value == f"{year}-{month:02d}"
    assert metadata["backup_id"].value == newest.backup_id != older.backup_id
    assert metadata["copied_now"].value is True and metadata["verified"].value is True
    assert metadata["base_backups"].value.startswith("no base backup to archive")  # this server archives no WAL
    (archived,) = list_backups(backup_env.store(), monthly=True)
    assert archived.month == f"{year}-{month:02d}" and archived.backup_id == newest.backup_id and archived.verified
    assert (backup_env.store_dir / archived.root / "platform.dump.zst").exists()

    # Without a month (what "Materialize" in the UI does): last month, already archived.
    again = backup_env.run("monthly_archive_job")
    assert again.success, step_failures(again)
    metadata = again.asset_materializations_for_node("monthly_archive")[0].metadata
    assert metadata["month"].value == f"{year}-{month:02d}" and metadata["copied_now"].value is False


def test_retention_job_deletes_what_the_policy_does_not_keep(backup_env):
    now = datetime.now(timezone.utc).replace(hour=2, minute=0, second=0, microsecond=0)
    days = [now - timedelta(days=n) for n in (4, 3, 2, 1)]
    taken = {d.date(): backup_env.take_backup(at=d).backup_id for d in days}
    early_same_day = backup_env.take_backup(at=days[-1] - timedelta(hours=1)).backup_id

    result = backup_env.run(
        "backup_retention", run_config={"ops": {"apply_backup_retention": {"config": {"daily": 2}}}}
    )
    assert result.success, step_failures(result)
    remaining = {e.backup_id for e in list_backups(backup_env.store())}
    assert remaining == {taken[days[-1].date()], taken[days[-2].date()]}
    assert early_same_day not in remaining
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output.event_specific_data.metadata
    assert metadata["deleted"].value == 3 and metadata["kept"].value == 2


def test_verify_job_verifies_a_backup_and_fails_on_a_broken_one(backup_env):
    manifest = backup_env.take_backup(verify=False)
    config = {"ops": {"verify_stored_backup": {"config": {"backup_id": manifest.backup_id}}}}
    result = backup_env.run("verify_backup_job", run_config=config)
    assert result.success, step_failures(result)
    assert newest_verified(backup_env.store()).backup_id == manifest.backup_id
    # ... recorded as an evaluation of database_backup's check, as verify_new_backup_sensor's runs are.
    (passed,) = checks_of(backup_env.instance)
    assert passed.passed and passed.metadata["backup_id"].value == manifest.backup_id

    dump = backup_env.store_dir / "backups" / manifest.backup_id / "mlflow.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-10])  # truncated
    broken = backup_env.run("verify_backup_job", run_config=config)
    assert not broken.success
    (message,) = step_failures(broken)
    assert "failed verification" in message and "mlflow.dump.zst" in message
    assert newest_verified(backup_env.store()) is None
    failed = checks_of(backup_env.instance)[0]
    assert not failed.passed and failed.metadata["backup_id"].value == manifest.backup_id
    assert f"Backup {manifest.backup_id} failed verification" in failed.description and "mlflow.dump.zst" in failed.description
