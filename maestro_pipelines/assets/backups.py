"""Backups as assets: `database_backup` and `monthly_archive`. The work is in
`maestro_pipelines.backup` (no Dagster), imported inside the functions so loading the
definitions stays cheap; these are thin wrappers that log progress and publish what the
backup holds as metadata.

No partitions
    Every materialization of `database_backup` is one backup, a snapshot of the databases
    *now*: its page's history is the backup history (Dagster 1.13 plots each numeric metadata
    value over the materializations: sizes, duration, the RPO each backup closed), and its
    Materialize button takes a backup now. Days were partitions before; a backup cannot be
    taken for a past day, so all but today's were "missing" forever and refused when launched.
    Backups taken outside Dagster (`maestro backup run`) are in this history too:
    `store_catalog_sensor` (sensors/catalog.py) finds them in the store and records each as a
    materialization with the same metadata (`backup_history_metadata`) and its check.

    The check `verified` (blocking) is the backup's verification: each materialization
    records it, "Execute check" re-verifies the backup of the latest materialization (nothing
    is dumped), and `verify_backup_job` records its verifications of other backups there too.

    `monthly_archive` is one materialization per archived month: its config `month` (YYYY-MM)
    defaults to last month in MAESTRO_TIMEZONE, and the month is in its metadata. It keeps the
    latest verified backup taken before the end of that month (`archive_month`, which counts
    months in UTC) in `monthly/<YYYY-MM>/`, whatever took the backup.

The pool `maestro_backup`
    Every step that writes the backup store (backup, archive, retention, verification) runs
    in the Dagster pool `maestro_backup`, so two of them never run at once, in particular
    never two backups. A pool only limits anything once the instance has a limit for it:

        dagster instance concurrency set maestro_backup 1

    or, in dagster.yaml (this limits every pool without its own limit, e.g. the ML graph's
    `platform_database`, too):

        concurrency:
          pools:
            default_limit: 1

    Without a limit, `database_backup` logs a warning naming that command. Backups taken by
    the CLI (`maestro backup run`) do not go through Dagster's pools; the store's activity
    markers make retention wait for them, and the asset logs when one is running.
"""

import time
from datetime import datetime, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.dagster_support import (
    BACKUP_POOL,
    KIND_TAG,
    STORE_RETRY,
    Column,
    MiB,
    ProgressLog,
    backup_step,
    markdown_list,
    metadata_table,
    mib,
)
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.formatting import human_bytes
from maestro_pipelines.environment import BACKUP_TIMEZONE, run_settings
from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase

BACKUP_GROUP = "backups"
BACKUP_ASSET = dg.AssetKey("database_backup")
VERIFIED_CHECK = "verified"
"""The asset check on database_backup that holds each backup's verification."""


# BACKUP_TIMEZONE (the schedules' clock, the default month of `monthly_archive`) and whether
# automation starts running are deployment decisions: maestro_pipelines.environment takes them.

def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _pool_check(context) -> None:
    try:
        limit = context.instance.event_log_storage.get_concurrency_info(BACKUP_POOL).limit
    except Exception:  # storages without pools: nothing to check
        return
    if limit is None:
        context.log.warning(
            f"The pool '{BACKUP_POOL}' has no limit on this Dagster instance, so two backups could run at "
            f"once: run `dagster instance concurrency set {BACKUP_POOL} 1` (or set concurrency.pools.default_limit)"
        )


def _others_running(context, store, kinds: tuple[str, ...], ident: Optional[str] = None) -> None:
    from maestro_pipelines.backup import running_activities

    for other in running_activities(store):
        if other.kind in kinds and other.ident != ident:
            context.log.warning(
                f"Another {other.kind} ({other.ident}, since {other.started_at:%Y-%m-%d %H:%M} UTC on "
                f"{other.host}) is running outside this run; this one goes ahead"
            )


DATABASE_COLUMNS = [
    Column("role", "string"),
    Column("database", "string"),
    Column("where", "string"),
    Column("server_version", "string"),
    Column("tables", "int"),
    Column("rows", "int"),
    Column("dump_mib", "float", "the dumps as pg_dump wrote them, MiB (2^20 bytes)"),
    Column("stored_mib", "float", "compressed, as stored, MiB"),
    Column("ratio", "float"),
    Column("seconds", "float"),
]


def _database_table(manifest) -> dg.MetadataValue:
    return metadata_table(
        (
            {
                "role": dump.role,
                "database": dump.database,
                "where": dump.where,
                "server_version": dump.server_version,
                "tables": len(dump.tables),
                "rows": dump.rows,
                "dump_mib": mib(dump.dump_bytes, 2),
                "stored_mib": mib(dump.compressed_bytes, 2),
                "ratio": round(dump.dump_bytes / dump.compressed_bytes, 2) if dump.compressed_bytes else 0.0,
                "seconds": dump.duration_s,
            }
            for dump in manifest.databases
        ),
        DATABASE_COLUMNS,
    )


def _largest_tables(manifest, limit: int = 15) -> str:
    rows = sorted(
        ((dump.role, table.qualified, table.rows) for dump in manifest.databases for table in dump.tables),
        key=lambda r: r[2],
        reverse=True,
    )[:limit]
    if not rows:
        return "no tables"
    lines = ["| database | table | rows |", "|---|---|---:|"]
    lines += [f"| {role} | {name} | {count:,} |" for role, name, count in rows]
    return "\n".join(lines)


def verification_summary(report) -> str:
    """One line for a VerifyReport, or for the store's VerificationRecord of a verification
    done elsewhere (`maestro backup verify`), which keeps no pg_restore --list counts."""
    if not report.ok:
        return "FAILED: " + "; ".join(report.problems)
    if getattr(report, "storage_only", None):
        return (f"storage checks only: full verification needs the key ({report.storage_only}); "
                f"{report.objects} objects re-read ({human_bytes(report.bytes_read)} stored, sha256 and sizes match)")
    toc = getattr(report, "toc_entries", None)
    entries = f" (TABLE DATA entries {', '.join(f'{role}: {count}' for role, count in sorted(toc.items()))})" if toc else ""
    return (
        f"ok: {report.objects} objects re-read ({human_bytes(report.bytes_read)} stored, sha256 and sizes match), "
        f"pg_restore --list read every dump{entries} in {report.duration_s:.1f} s"
    )


def verify_with_marker(store, backup_id: str, log, month: Optional[str] = None):
    """verify_backup under an activity marker `verify-<id>`, so the verify sensor does not
    request a second verification of a backup being verified, and retention waits."""
    from maestro_pipelines.backup import activity, verify_backup

    with activity(store, "verify", backup_id):
        return verify_backup(store, backup_id, month=month, progress=ProgressLog(log, "verify"))


def verified_check_result(report) -> dict:
    """The `verified` check's fields for a verification report: passed, a description naming
    the backup and what failed, and metadata."""
    description = (
        f"Backup {report.backup_id} verified" if report.ok
        else f"Backup {report.backup_id} failed verification: {'; '.join(report.problems)}"
    )
    return {"passed": report.ok, "description": description, "metadata": verification_metadata(report)}


def verification_metadata(report) -> dict:
    """What a verification report publishes: on the check `verified` and on verify_backup_job's step."""
    return {
        "backup_id": dg.MetadataValue.text(report.backup_id),
        "verification": dg.MetadataValue.text(verification_summary(report)),
        "objects": dg.MetadataValue.int(report.objects),
        "read_mib": dg.MetadataValue.float(mib(report.bytes_read)),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 2)),
    }


def closed_rpo_s(entries, manifest) -> Optional[float]:
    """Seconds from the snapshot of the previous backup in the store (committed, not known to be
    bad) to this one's: the window of data this backup stopped being at risk. None for the first."""
    earlier = [
        entry.manifest.snapshot_at
        for entry in entries
        if entry.manifest is not None and entry.bad is None and entry.backup_id != manifest.backup_id
        and entry.manifest.snapshot_at < manifest.snapshot_at
    ]
    return (manifest.snapshot_at - max(earlier)).total_seconds() if earlier else None


STORE_HISTORY_ROWS = 15


def store_history_md(entries, now: datetime) -> str:
    """The store's latest backups as a markdown table, latest first: every backup, whoever took
    it (`maestro backup run` too), with its state."""
    from maestro_pipelines.formatting import human_age

    listed = [e for e in entries if e.manifest is not None][-STORE_HISTORY_ROWS:]
    if not listed:
        return "no backups in the store"
    lines = ["| backup | taken (UTC) | age | stored | seconds | state |", "|---|---|---|---:|---:|---|"]
    for entry in reversed(listed):
        manifest = entry.manifest
        state = f"BAD: {entry.bad}" if entry.bad else ("verified" if entry.verified else "not verified")
        lines.append(
            f"| `{entry.backup_id}` | {manifest.snapshot_at:%Y-%m-%d %H:%M:%S} | "
            f"{human_age((now - manifest.snapshot_at).total_seconds())} | {human_bytes(manifest.stored_bytes)} | "
            f"{manifest.duration_s:.1f} | {state} |"
        )
    older = len([e for e in entries if e.manifest is not None]) - len(listed)
    if older:
        lines.append(f"\n{older} older backups: `maestro backup list`")
    return "\n".join(lines)


def encryption_summary(manifest, object_store) -> str:
    """How the backup is sealed, by the key id only; a cloud store's plaintext backup says so
    (the same warning `maestro backup run` prints and the manifest's notes carry)."""
    from maestro_pipelines.backup.sealing import unencrypted_warning

    if manifest.encryption:
        return (f"encrypted (AES-256-GCM, its own data key wrapped by backup key {manifest.encryption['kek_id']}); "
                "manifest signed")
    warning = unencrypted_warning(object_store)
    return f"NOT encrypted: {warning}" if warning else "not encrypted (no backup key configured; local store)"


def _backup_metadata(manifest, object_store, rpo_s: Optional[float]) -> dict:
    metadata = {
        "backup_id": dg.MetadataValue.text(manifest.backup_id),
        "location": dg.MetadataValue.text(f"{object_store.url.rstrip('/')}/backups/{manifest.backup_id}"),
        "databases": dg.MetadataValue.text(", ".join(d.role for d in manifest.databases)),
        # Every number here is a plot over the materializations (Metadata -> Plots): only numbers
        # worth a plot, sizes in MiB (2^20 bytes, the unit of the CLI's KiB/MiB/GiB) to read them
        # on the axis (the exact bytes are in the manifest). stored: compressed, as in the store
        # (`maestro backup list`'s size); dump: as pg_dump wrote it (what a restore unpacks).
        "stored_mib": dg.MetadataValue.float(mib(manifest.stored_bytes)),
        "dump_mib": dg.MetadataValue.float(mib(manifest.dump_bytes)),
        "duration_s": dg.MetadataValue.float(round(manifest.duration_s, 2)),
        "compression_ratio": dg.MetadataValue.float(
            round(manifest.dump_bytes / manifest.compressed_bytes, 2) if manifest.compressed_bytes else 0.0
        ),
        "throughput_mib_per_s": dg.MetadataValue.float(
            round(manifest.dump_bytes / MiB / manifest.duration_s, 1) if manifest.duration_s > 0 else 0.0
        ),
        "snapshot_at": dg.MetadataValue.timestamp(manifest.snapshot_at),
        "dagster/row_count": dg.MetadataValue.int(sum(d.rows for d in manifest.databases)),
        "per_database": _database_table(manifest),
        "largest_tables": dg.MetadataValue.md(_largest_tables(manifest)),
        "artifacts": dg.MetadataValue.text(f"{manifest.artifacts.count if manifest.artifacts else 0} MLflow artifact files"),
        "encryption": dg.MetadataValue.text(encryption_summary(manifest, object_store)),
        "notes": markdown_list(manifest.notes),
    }
    if rpo_s is not None:  # the first backup closed no gap: left out rather than plotted as 0
        metadata["rpo_closed_h"] = dg.MetadataValue.float(round(rpo_s / 3600, 4))
    return metadata


def backup_history_metadata(manifest, object_store, entries, now: datetime, verification, taken_by: str) -> dict:
    """The metadata of one backup in database_backup's history, whoever took it: the asset
    (`verification`: its VerifyReport) and store_catalog_sensor for a backup taken outside
    Dagster (the store's VerificationRecord, or None while it is not verified). `entries`:
    the store's backups (list_backups); the store history shown is the one up to this backup."""
    upto = [e for e in entries if e.backup_id == manifest.backup_id
            or (e.manifest is not None and e.manifest.snapshot_at <= manifest.snapshot_at)]
    metadata = {
        **_backup_metadata(manifest, object_store, closed_rpo_s(entries, manifest)),
        "taken_by": dg.MetadataValue.text(taken_by),
        "store_history": dg.MetadataValue.md(store_history_md(upto, now)),
    }
    if verification is not None:
        metadata["verified"] = dg.MetadataValue.bool(verification.ok)
        metadata["verification"] = dg.MetadataValue.text(verification_summary(verification))
        metadata["verify_duration_s"] = dg.MetadataValue.float(round(verification.duration_s, 2))
    return metadata


def _take_backup(context, platform_db: PlatformDatabase, mlflow: MLflowRegistry, object_store):
    from maestro_pipelines.backup import BackupOptions, backup_targets, create_backup

    # The databases are those of this run's resources; Dagster's own storage is the
    # environment's (MAESTRO_DAGSTER_DATABASE_URL), as for `maestro backup run`.
    targets, notes = backup_targets(run_settings(platform_db, mlflow), platform_db.location())
    for note in notes:
        context.log.info(note)
    context.log.info(
        f"Backing up {', '.join(f'{t.role} ({t.database})' for t in targets)} into {object_store.url}"
    )
    started = time.monotonic()
    manifest = create_backup(
        object_store, targets, BackupOptions(), progress=ProgressLog(context.log, "dump"), notes=notes
    )
    context.log.info(
        f"Backup {manifest.backup_id} committed: {human_bytes(manifest.dump_bytes)} dumped, "
        f"{human_bytes(manifest.stored_bytes)} stored in {time.monotonic() - started:.1f} s; verifying"
    )
    if not manifest.encrypted:
        from maestro_pipelines.backup.sealing import unencrypted_warning

        if (warning := unencrypted_warning(object_store)) is not None:
            context.log.warning(warning)
    return manifest


def _backup_to_reverify(context, object_store) -> str:
    """The backup of database_backup's latest materialization (what the check is about), or the
    store's latest committed backup when Dagster has no materialization of it."""
    from maestro_pipelines.backup import list_backups

    event = context.instance.get_latest_materialization_event(BACKUP_ASSET)
    materialization = event.asset_materialization if event else None
    if materialization is not None and "backup_id" in materialization.metadata:
        return materialization.metadata["backup_id"].value
    committed = [entry for entry in list_backups(object_store) if entry.manifest is not None]
    if not committed:
        raise MaestroError("There is no backup to verify", "Materialize database_backup (take a backup) first")
    return committed[-1].backup_id


def _reverify(context, object_store) -> dg.AssetCheckResult:
    from maestro_pipelines.backup import BackupNotFound

    backup_id = _backup_to_reverify(context, object_store)
    context.log.info(f"Re-verifying backup {backup_id} (the check alone: nothing is dumped)")
    try:
        report = verify_with_marker(object_store, backup_id, context.log)
    except BackupNotFound as exc:
        return dg.AssetCheckResult(
            asset_key=BACKUP_ASSET, check_name=VERIFIED_CHECK, passed=False,
            description=f"Backup {backup_id} failed verification: {exc}",
            metadata={"backup_id": dg.MetadataValue.text(backup_id)},
        )
    return dg.AssetCheckResult(asset_key=BACKUP_ASSET, check_name=VERIFIED_CHECK, **verified_check_result(report))


BACKUP_SPEC = dg.AssetSpec(
    BACKUP_ASSET,
    group_name=BACKUP_GROUP,
    kinds={"postgres"},
    tags={KIND_TAG: "backup"},
    skippable=True,  # "Execute check" alone re-verifies without a new backup
    description=(
        "Backup of every stateful PostgreSQL database (platform, MLflow, Dagster's own when on "
        "PostgreSQL): pg_dump in one consistent snapshot, streamed through zstd into the object store "
        "(MAESTRO_STORE_URL), then verified (the check `verified`). Each materialization is one backup: "
        "Materialize takes one now; the nightly schedule takes one at 02:00 (MAESTRO_TIMEZONE)."
    ),
)
VERIFIED_SPEC = dg.AssetCheckSpec(
    VERIFIED_CHECK,
    asset=BACKUP_ASSET,
    blocking=True,
    description=(
        "Every object re-read against the manifest (sizes, sha256) and every dump read by pg_restore "
        "--list. Executed alone, re-verifies the backup of the latest materialization."
    ),
)


@dg.multi_asset(
    name="database_backup",
    specs=[BACKUP_SPEC],
    check_specs=[VERIFIED_SPEC],
    can_subset=True,
    pool=BACKUP_POOL,
    retry_policy=STORE_RETRY,
    op_tags={KIND_TAG: "backup"},
)
@backup_step
def database_backup(
    context: dg.AssetExecutionContext,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
):
    _pool_check(context)
    object_store = store.get_store()
    if BACKUP_ASSET not in context.selected_asset_keys:
        yield _reverify(context, object_store)
        return
    _others_running(context, object_store, ("backup",))
    manifest = _take_backup(context, platform_db, mlflow, object_store)
    report = verify_with_marker(object_store, manifest.backup_id, context.log)
    check = verified_check_result(report)
    from maestro_pipelines.backup import list_backups

    entries = list_backups(object_store)  # after verification: this backup's state is known
    metadata = backup_history_metadata(manifest, object_store, entries, _utcnow(), report,
                                       taken_by=f"Dagster run {context.run.run_id}")
    from maestro_pipelines.assets.pitr import point_in_time_markdown

    metadata["point_in_time"] = dg.MetadataValue.md(point_in_time_markdown(platform_db, mlflow))
    # The backup is recorded either way, with its check: a failed one is in the history as such.
    yield dg.MaterializeResult(
        asset_key=BACKUP_ASSET,
        metadata=metadata,
        check_results=[dg.AssetCheckResult(asset_key=BACKUP_ASSET, check_name=VERIFIED_CHECK, **check)],
    )
    if not report.ok:
        # It cannot be trusted (verify removed any verified.json): fail, so the run retries with
        # a fresh backup and, failing again, alerts.
        raise dg.Failure(description=check["description"], allow_retries=True)
    context.log.info(f"Backup {manifest.backup_id} verified: {check['metadata']['verification'].value}")


class MonthlyArchiveConfig(dg.Config):
    month: Optional[str] = Field(
        default=None,
        description="YYYY-MM, the month to archive; unset: last month (MAESTRO_TIMEZONE), what the schedule does.",
    )


@dg.asset(
    group_name=BACKUP_GROUP,
    pool=BACKUP_POOL,
    retry_policy=STORE_RETRY,
    # No dependency on database_backup: an archive copies a verified backup from the store,
    # whoever took it (`maestro backup run` too), so "upstream never materialized" would be wrong.
    tags={KIND_TAG: "archive"},
    op_tags={KIND_TAG: "archive"},
    description=(
        "A month's restore point kept for a year: a server-side copy of the latest verified backup taken "
        "before the end of the month into monthly/YYYY-MM/ (idempotent). One materialization per archived "
        "month (config `month`, default last month; metadata `month`)."
    ),
)
@backup_step
def monthly_archive(
    context: dg.AssetExecutionContext, config: MonthlyArchiveConfig, store: ObjectStoreResource
) -> dg.MaterializeResult:
    from maestro_pipelines.backup import archive_month
    from maestro_pipelines.clock import previous_month

    month = config.month or previous_month(_utcnow(), BACKUP_TIMEZONE)
    object_store = store.get_store()
    entry, copied = archive_month(object_store, month)  # validates the month; marks itself running
    context.log.info(
        f"{'Archived' if copied else 'Already archived'}: backup {entry.backup_id} as the restore point of {month}"
    )
    metadata = archive_metadata(entry, object_store, taken_by=f"Dagster run {context.run.run_id}")
    metadata["copied_now"] = dg.MetadataValue.bool(copied)
    metadata["base_backups"] = dg.MetadataValue.md(_archive_base_backups(context, object_store, month))
    return dg.MaterializeResult(metadata=metadata)


def _archive_base_backups(context, object_store, month: str) -> str:
    """The physical tier of the month: each server's base backup (its chain) and the WAL that
    makes it consistent, beside the month's dump backup."""
    from maestro_pipelines.backup.archive import archive_base_backups

    archived = archive_base_backups(object_store, month)
    for system_id, base_id, copied in archived:
        context.log.info(f"{'Archived' if copied else 'Already archived'}: base backup {base_id} of server {system_id}")
    return "\n".join(f"- server {system_id}: base backup `{base_id}`{' (copied now)' if copied else ''}"
                     for system_id, base_id, copied in archived) or "no base backup to archive (no WAL archived)"


def archive_metadata(entry, object_store, taken_by: str) -> dict:
    """The metadata of one monthly archive (a list_backups(monthly=True) entry) in
    monthly_archive's history, whoever archived it: the asset, or store_catalog_sensor for an
    archive made by `maestro backup archive`."""
    manifest = entry.manifest
    metadata = {
        "month": dg.MetadataValue.text(entry.month),
        "backup_id": dg.MetadataValue.text(entry.backup_id),
        "location": dg.MetadataValue.text(f"{object_store.url.rstrip('/')}/{entry.root}"),
        "taken_by": dg.MetadataValue.text(taken_by),
        "verified": dg.MetadataValue.bool(entry.verified),
        "stored_mib": dg.MetadataValue.float(mib(entry.stored_bytes)),
    }
    if manifest is not None:
        metadata["snapshot_at"] = dg.MetadataValue.timestamp(manifest.snapshot_at)
        metadata["databases"] = dg.MetadataValue.text(", ".join(d.role for d in manifest.databases))
        metadata["per_database"] = _database_table(manifest)
    return metadata


backup_assets = [database_backup, monthly_archive]
