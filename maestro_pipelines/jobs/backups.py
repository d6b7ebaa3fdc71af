"""Jobs of backups: the nightly backup, the monthly archive, retention and verification.

Every run is tagged `maestro/kind` (backup, archive, retention, verify): the failure-alert
sensor and the UI's run filters select backup runs by it.

`dagster/max_runtime` (seconds) ends a run that hangs (a stuck pg_dump, a store that stopped
answering) as failed, which alerts. It is enforced by the daemon's run monitoring, which a
deployment turns on in dagster.yaml:

    run_monitoring:
      enabled: true
"""

from typing import Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.backups import (
    BACKUP_ASSET,
    VERIFIED_CHECK,
    database_backup,
    monthly_archive,
    verification_metadata,
    verification_summary,
    verified_check_result,
    verify_with_marker,
)
from maestro_pipelines.dagster_support import (
    BACKUP_POOL,
    KIND_TAG,
    STORE_RETRY,
    backup_step,
    markdown_list,
    mib,
    run_tags,
)
from maestro_pipelines.objectives import DAILY_BACKUPS_KEPT, MONTHLY_ARCHIVES_KEPT
from maestro_pipelines.resources import ObjectStoreResource

NIGHTLY_BACKUP_MAX_RUNTIME_S = 3 * 3600

nightly_backup = dg.define_asset_job(
    "nightly_backup",
    selection=dg.AssetSelection.assets(database_backup),
    description="Back up every stateful database into the object store and verify it: one materialization of database_backup.",
    tags=run_tags("backup", NIGHTLY_BACKUP_MAX_RUNTIME_S, database_lane=True),
)

monthly_archive_job = dg.define_asset_job(
    "monthly_archive_job",
    selection=dg.AssetSelection.assets(monthly_archive),
    description="Copy a month's latest verified backup into monthly/YYYY-MM/ (config `month`, default last month).",
    tags=run_tags("archive", 2 * 3600, database_lane=True),
)


class RetentionConfig(dg.Config):
    daily: int = Field(default=DAILY_BACKUPS_KEPT, ge=1, description="Days (with at least one backup) whose latest backup is kept.")
    monthly: int = Field(default=MONTHLY_ARCHIVES_KEPT, ge=0, description="Monthly archives kept (the latest months).")
    dry_run: bool = Field(default=False, description="Only report what would be deleted.")


@dg.op(pool=BACKUP_POOL, retry_policy=STORE_RETRY, tags={KIND_TAG: "retention"})
@backup_step
def apply_backup_retention(context: dg.OpExecutionContext, config: RetentionConfig, store: ObjectStoreResource):
    """Delete backups and archives the policy no longer keeps (never the latest verified
    backup; nothing at all while a backup, restore, archive or verification runs)."""
    from maestro_pipelines.backup import RetentionPolicy, apply_retention

    object_store = store.get_store()
    plan = apply_retention(
        object_store, RetentionPolicy(daily=config.daily, monthly=config.monthly), dry_run=config.dry_run
    )
    verb = "would delete" if config.dry_run else "deleted"
    if plan.skipped:
        context.log.warning(f"Retention skipped: {plan.skipped}")
    for entry, why in plan.keep:
        context.log.info(f"keep {entry.root}: {why}")
    for entry, why in plan.delete:
        context.log.info(f"{verb} {entry.root}: {why}")
    for root in plan.delete_incomplete:
        context.log.info(f"{verb} {root}: never finished (no manifest), left by a dead process or older than the stale limit")
    for leftover in plan.discarded:
        context.log.info(f"removed {leftover}: left by a write that never finished")

    def listing(items) -> dg.MetadataValue:
        return markdown_list(f"`{entry.root}`: {why}" for entry, why in items)

    return dg.Output(
        None,
        metadata={
            "policy": dg.MetadataValue.text(f"daily={config.daily} monthly={config.monthly}"),
            "dry_run": dg.MetadataValue.bool(config.dry_run),
            "skipped": dg.MetadataValue.text(plan.skipped or "no"),
            "kept": dg.MetadataValue.int(len(plan.keep)),
            "deleted": dg.MetadataValue.int(len(plan.delete)),
            "deleted_incomplete": dg.MetadataValue.int(len(plan.delete_incomplete)),
            "discarded_uploads": dg.MetadataValue.int(len(plan.discarded)),
            "freed_mib": dg.MetadataValue.float(mib(sum(entry.stored_bytes for entry, _ in plan.delete))),
            "kept_backups": listing(plan.keep),
            "deleted_backups": listing(plan.delete),
        },
    )


@dg.job(
    tags=run_tags("retention", 3600),
    description=(
        f"Apply the retention policy to the backup store (default: {DAILY_BACKUPS_KEPT} daily backups, "
        f"{MONTHLY_ARCHIVES_KEPT} monthly archives)."
    ),
)
def backup_retention():
    apply_backup_retention()


class VerifyBackupConfig(dg.Config):
    backup_id: str = Field(description="The backup to verify, e.g. 20261126T020000Z-1a2b3c (`maestro backup list`).")
    month: Optional[str] = Field(
        default=None, description="YYYY-MM: verify the monthly archive's copy of the backup instead."
    )


@dg.op(pool=BACKUP_POOL, retry_policy=STORE_RETRY, tags={KIND_TAG: "verify"})
@backup_step
def verify_stored_backup(context: dg.OpExecutionContext, config: VerifyBackupConfig, store: ObjectStoreResource):
    """Re-read every object of one backup against its manifest and read each dump with
    pg_restore --list; record the result in the store (verified.json) and, for a backup (not an
    archive's copy), as an evaluation of database_backup's check `verified`."""
    report = verify_with_marker(store.get_store(), config.backup_id, context.log, month=config.month)
    if config.month is None:
        # Yielded, not context.log_event: logged events are lost when the step then fails.
        yield dg.AssetCheckEvaluation(
            asset_key=BACKUP_ASSET, check_name=VERIFIED_CHECK, blocking=True, **verified_check_result(report)
        )
    metadata = {"verified": dg.MetadataValue.bool(report.ok), **verification_metadata(report)}
    if not report.ok:
        raise dg.Failure(
            description=f"Backup {report.backup_id} failed verification: {'; '.join(report.problems)}",
            metadata=metadata,
            allow_retries=False,
        )
    context.log.info(f"Backup {report.backup_id} verified: {verification_summary(report)}")
    yield dg.Output(None, metadata=metadata)


@dg.job(
    tags=run_tags("verify", 3 * 3600),
    description="Verify one backup in the store (the verify sensor launches it for backups taken outside Dagster).",
)
def verify_backup_job():
    verify_stored_backup()


backup_jobs = [nightly_backup, monthly_archive_job, backup_retention, verify_backup_job]
