"""database_backup and monthly_archive materialized in process, retention and verification
as op jobs: real pg_dumps of the embedded PostgreSQL into a local store."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from maestro_pipelines.assets.backups import (
    BACKUP_POOL,
    BACKUP_TIMEZONE,
    backup_step,
    database_backup,
    local_day,
    monthly_archive,
)
from maestro_pipelines.backup import list_backups, newest_verified
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.jobs.backups import apply_backup_retention, verify_stored_backup
from maestro_pipelines.storage import StoreUnavailable


def today() -> str:
    return local_day(datetime.now(timezone.utc), BACKUP_TIMEZONE)


def step_failures(result) -> list[str]:
    return [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


def test_nightly_backup_materializes_a_verified_backup_with_metadata(backup_env):
    result = backup_env.run("nightly_backup", partition_key=today())
    assert result.success, step_failures(result)
    (materialization,) = result.asset_materializations_for_node("database_backup")
    assert materialization.partition == today()
    metadata = materialization.metadata

    newest = newest_verified(backup_env.store())
    assert newest is not None and newest.backup_id == metadata["backup_id"].value
    assert metadata["verified"].value is True and metadata["verification"].value.startswith("ok")
    assert metadata["databases"].value == "platform, mlflow"
    assert metadata["dump_bytes"].value == newest.manifest.dump_bytes > 0
    assert metadata["stored_bytes"].value == newest.stored_bytes > 0
    assert metadata["compression_ratio"].value > 1
    assert metadata["throughput_mb_per_s"].value > 0 and metadata["duration_s"].value > 0
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
    assert backup_env.run("nightly_backup", partition_key=today()).success
    info = storage.get_concurrency_info(BACKUP_POOL)
    assert info.limit == 1 and info.slot_count == 1 and info.active_slot_count == 0


def test_a_past_partition_fails_at_once_without_a_backup(backup_env):
    result = backup_env.run("nightly_backup", partition_key="2026-01-05")
    assert not result.success
    (message,) = step_failures(result)
    assert "a backup is a snapshot of the databases now" in message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert list_backups(backup_env.store()) == []


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
    key = f"{year}-{month:02d}-01"

    # No database_backup partition is materialized in this instance: the archive does not need them.
    result = backup_env.run("monthly_archive_job", partition_key=key)
    assert result.success, step_failures(result)
    metadata = result.asset_materializations_for_node("monthly_archive")[0].metadata
    assert metadata["backup_id"].value == newest.backup_id != older.backup_id
    assert metadata["copied_now"].value is True and metadata["verified"].value is True
    (archived,) = list_backups(backup_env.store(), monthly=True)
    assert archived.month == f"{year}-{month:02d}" and archived.backup_id == newest.backup_id and archived.verified
    assert (backup_env.store_dir / archived.root / "platform.dump.zst").exists()

    again = backup_env.run("monthly_archive_job", partition_key=key)
    assert again.success
    assert again.asset_materializations_for_node("monthly_archive")[0].metadata["copied_now"].value is False


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

    dump = backup_env.store_dir / "backups" / manifest.backup_id / "mlflow.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-10])  # truncated
    broken = backup_env.run("verify_backup_job", run_config=config)
    assert not broken.success
    (message,) = step_failures(broken)
    assert "failed verification" in message and "mlflow.dump.zst" in message
    assert newest_verified(backup_env.store()) is None
