"""Backups as assets: `database_backup` (one partition per day) and `monthly_archive` (one
per month). The work is in `maestro_pipelines.backup` (no Dagster), imported inside the
functions so loading the definitions stays cheap; these are thin wrappers that log progress
and publish what the backup holds as metadata.

What a partition means
    `database_backup` partition `2026-11-27` is the backup *taken on* 2026-11-27 in
    MAESTRO_TIMEZONE (the nightly schedule takes it at 02:00 that day), so it holds the data
    as of that night: everything up to the end of 2026-11-26. `end_offset=1` makes today's
    partition exist. A backup is a snapshot of *now*: only today's partition, or yesterday's
    for a run that started late (queued behind a long backup, launched by hand after
    midnight), can be materialized; an older one fails at once instead of quietly taking a
    fresh backup under an old date (a careless backfill would otherwise take hundreds).

    `monthly_archive` partition `2026-11-01` keeps the newest verified backup taken before
    the end of November (`archive_month`, which counts months in UTC) in `monthly/2026-11/`.
    It depends on that month's daily partitions; it runs on whatever verified backups exist,
    so days without a backup do not block it.

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
import zoneinfo
from datetime import date, datetime, timedelta, timezone
from typing import Optional

import dagster as dg

from maestro_pipelines.assets.platform import platform_schema
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.settings import load_settings

BACKUP_GROUP = "backups"
BACKUP_POOL = "maestro_backup"
PARTITIONS_START = "2026-01-01"
MiB = 1024 * 1024


def _backup_timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MaestroError(
            f"MAESTRO_TIMEZONE '{name}' is not a time zone", "Use an IANA name such as Europe/Berlin, or unset it for UTC"
        ) from None
    return name


_SETTINGS = load_settings()
BACKUP_TIMEZONE = _backup_timezone(_SETTINGS.timezone)
"""MAESTRO_TIMEZONE: the days of `database_backup`, the months of `monthly_archive` and the
schedules' clock."""

AUTOMATION_ON_BY_DEFAULT = not _SETTINGS.uses_embedded_database
"""Backup schedules and sensors start RUNNING in production (MAESTRO_DATABASE_URL set) and
STOPPED on the embedded default (a laptop): see `maestro_pipelines.schedules.backups`."""

# A datetime, not the string: Dagster parses a string start with strptime, whose import every
# process loading the code location would pay for.
_START = datetime.fromisoformat(PARTITIONS_START)
daily_backup_partitions = dg.DailyPartitionsDefinition(start_date=_START, timezone=BACKUP_TIMEZONE, end_offset=1)
monthly_archive_partitions = dg.MonthlyPartitionsDefinition(start_date=_START, timezone=BACKUP_TIMEZONE)

STORE_RETRY = dg.RetryPolicy(max_retries=2, delay=60, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
"""Retries of transient store failures (`StoreUnavailable`: the store retried each request
already). A configuration problem (any other MaestroError) fails at once."""


def backup_step(fn):
    """Decorate a backup asset/op body: transient errors (store or database unavailable) retry
    under STORE_RETRY, other MaestroErrors fail at once."""
    return fail_fast_on_user_errors(fn)


def local_day(moment: datetime, tz: str) -> str:
    """The calendar day (YYYY-MM-DD) of `moment` in time zone `tz` (naive moments are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(zoneinfo.ZoneInfo(tz)).date().isoformat()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def check_backup_partition(partition_key: str, now: Optional[datetime] = None, tz: str = BACKUP_TIMEZONE) -> None:
    """Refuse partitions other than today's and yesterday's (see the module docstring)."""
    today = date.fromisoformat(local_day(now or _utcnow(), tz))
    day = date.fromisoformat(partition_key)
    if not (today - timedelta(days=1) <= day <= today):
        raise MaestroError(
            f"Partition {partition_key} of database_backup cannot be taken on {today.isoformat()} ({tz}): "
            "a backup is a snapshot of the databases now, not of a past or future day",
            f"Materialize today's partition ({today.isoformat()}) instead",
        )


class _ProgressLog:
    """create_backup/verify_backup progress -> context.log, about every 10% per database."""

    def __init__(self, log, what: str):
        self.log = log
        self.what = what
        self.logged: dict[str, int] = {}
        self.started = time.monotonic()

    def __call__(self, label: str, done: int, expected: Optional[int]) -> None:
        if expected:
            percent = min(100, int(done * 100 / expected))
            step = percent // 10 * 10
            if step <= self.logged.get(label, -1):
                return
            self.logged[label] = step
            # For a dump, `expected` is the database's size on disk: the dump is usually smaller
            # (no indexes), so the last step jumps to 100%.
            self.log.info(
                f"{self.what} {label}: {done / MiB:,.1f} MiB (~{percent}% of {expected / MiB:,.1f} MiB), "
                f"{time.monotonic() - self.started:.1f} s"
            )
        else:
            self.log.info(f"{self.what} {label}: {done / MiB:,.1f} MiB, {time.monotonic() - self.started:.1f} s")


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


def _database_table(manifest) -> dg.MetadataValue:
    records = []
    for dump in manifest.databases:
        records.append(
            dg.TableRecord(
                {
                    "role": dump.role,
                    "database": dump.database,
                    "where": dump.where,
                    "server_version": dump.server_version,
                    "tables": len(dump.tables),
                    "rows": dump.rows,
                    "dump_mb": round(dump.dump_bytes / MiB, 2),
                    "stored_mb": round(dump.compressed_bytes / MiB, 2),
                    "ratio": round(dump.dump_bytes / dump.compressed_bytes, 2) if dump.compressed_bytes else 0.0,
                    "seconds": dump.duration_s,
                }
            )
        )
    return dg.MetadataValue.table(
        records,
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("role", "string"),
                dg.TableColumn("database", "string"),
                dg.TableColumn("where", "string"),
                dg.TableColumn("server_version", "string"),
                dg.TableColumn("tables", "int"),
                dg.TableColumn("rows", "int"),
                dg.TableColumn("dump_mb", "float"),
                dg.TableColumn("stored_mb", "float"),
                dg.TableColumn("ratio", "float"),
                dg.TableColumn("seconds", "float"),
            ]
        ),
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
    if not report.ok:
        return "FAILED: " + "; ".join(report.problems)
    entries = ", ".join(f"{role}: {count}" for role, count in sorted(report.toc_entries.items()))
    return (
        f"ok: {report.objects} objects re-read ({report.bytes_read / MiB:,.1f} MiB, sha256 and sizes match), "
        f"pg_restore --list read every dump (TABLE DATA entries {entries}) in {report.duration_s:.1f} s"
    )


def verify_with_marker(store, backup_id: str, log, month: Optional[str] = None):
    """verify_backup under an activity marker `verify-<id>`, so the verify sensor does not
    request a second verification of a backup being verified, and retention waits."""
    from maestro_pipelines.backup import activity, verify_backup

    with activity(store, "verify", backup_id):
        return verify_backup(store, backup_id, month=month, progress=_ProgressLog(log, "verify"))


@dg.asset(
    group_name=BACKUP_GROUP,
    partitions_def=daily_backup_partitions,
    pool=BACKUP_POOL,
    retry_policy=STORE_RETRY,
    deps=[platform_schema],
    kinds={"postgres"},
    tags={"maestro/kind": "backup"},
    op_tags={"maestro/kind": "backup"},
    description=(
        "Nightly backup of every stateful PostgreSQL database (platform, MLflow, Dagster's own when on "
        "PostgreSQL): pg_dump in one consistent snapshot, streamed through zstd into the object store "
        "(MAESTRO_STORE_URL), then verified. Partition = the day the backup is taken (MAESTRO_TIMEZONE)."
    ),
)
@backup_step
def database_backup(
    context: dg.AssetExecutionContext,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
) -> dg.MaterializeResult:
    import dataclasses
    from pathlib import Path

    from maestro_pipelines.backup import BackupOptions, backup_targets, create_backup

    check_backup_partition(context.partition_key)
    _pool_check(context)
    object_store = store.get_store()
    _others_running(context, object_store, ("backup",))

    # The databases are those of this run's resources; Dagster's own storage is the
    # environment's (MAESTRO_DAGSTER_DATABASE_URL), as for `maestro backup run`.
    settings = dataclasses.replace(
        load_settings(),
        home=Path(platform_db.home).expanduser().resolve(),
        database_url=platform_db.database_url or None,
        mlflow_tracking_uri=mlflow.tracking_uri or None,
    )
    targets, notes = backup_targets(settings, platform_db.location())
    for note in notes:
        context.log.info(note)
    context.log.info(
        f"Backing up {', '.join(f'{t.role} ({t.database})' for t in targets)} into {object_store.url}"
    )
    started = time.monotonic()
    manifest = create_backup(
        object_store, targets, BackupOptions(), progress=_ProgressLog(context.log, "dump"), notes=notes
    )
    backup_seconds = time.monotonic() - started
    context.log.info(
        f"Backup {manifest.backup_id} committed: {manifest.dump_bytes / MiB:,.1f} MiB dumped, "
        f"{manifest.stored_bytes / MiB:,.1f} MiB stored in {backup_seconds:.1f} s; verifying"
    )
    report = verify_with_marker(object_store, manifest.backup_id, context.log)
    summary = verification_summary(report)
    metadata = {
        "backup_id": dg.MetadataValue.text(manifest.backup_id),
        "location": dg.MetadataValue.text(f"{object_store.url.rstrip('/')}/backups/{manifest.backup_id}"),
        "databases": dg.MetadataValue.text(", ".join(d.role for d in manifest.databases)),
        "dump_bytes": dg.MetadataValue.int(manifest.dump_bytes),
        "stored_bytes": dg.MetadataValue.int(manifest.stored_bytes),
        "compression_ratio": dg.MetadataValue.float(
            round(manifest.dump_bytes / manifest.compressed_bytes, 2) if manifest.compressed_bytes else 0.0
        ),
        "throughput_mb_per_s": dg.MetadataValue.float(
            round(manifest.dump_bytes / MiB / manifest.duration_s, 1) if manifest.duration_s > 0 else 0.0
        ),
        "duration_s": dg.MetadataValue.float(round(manifest.duration_s, 2)),
        "snapshot_at": dg.MetadataValue.timestamp(manifest.snapshot_at),
        "dagster/row_count": dg.MetadataValue.int(sum(d.rows for d in manifest.databases)),
        "per_database": _database_table(manifest),
        "largest_tables": dg.MetadataValue.md(_largest_tables(manifest)),
        "artifacts": dg.MetadataValue.int(manifest.artifacts.count if manifest.artifacts else 0),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in manifest.notes) or "none"),
        "verified": dg.MetadataValue.bool(report.ok),
        "verification": dg.MetadataValue.text(summary),
        "verify_duration_s": dg.MetadataValue.float(report.duration_s),
    }
    if not report.ok:
        # The backup exists but cannot be trusted (verify removed any verified.json): fail,
        # so the run retries with a fresh backup and, failing again, alerts.
        raise dg.Failure(
            description=f"Backup {manifest.backup_id} failed verification: {'; '.join(report.problems)}",
            metadata=metadata,
            allow_retries=True,
        )
    context.log.info(f"Backup {manifest.backup_id} verified: {summary}")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=BACKUP_GROUP,
    partitions_def=monthly_archive_partitions,
    pool=BACKUP_POOL,
    retry_policy=STORE_RETRY,
    # Month M depends on the daily partitions of M. Materializing never requires them to be
    # materialized (archive_month takes whatever verified backups the store has), and they
    # always exist as partitions (same start and time zone; a month is a partition only
    # once it ended), so the beta `allow_nonexistent_upstream_partitions` is not needed.
    deps=[dg.AssetDep(database_backup, partition_mapping=dg.TimeWindowPartitionMapping())],
    tags={"maestro/kind": "archive"},
    op_tags={"maestro/kind": "archive"},
    description=(
        "The month's restore point kept for a year: a server-side copy of the newest verified backup "
        "taken before the end of the month into monthly/<YYYY-MM>/ (idempotent)."
    ),
)
@backup_step
def monthly_archive(context: dg.AssetExecutionContext, store: ObjectStoreResource) -> dg.MaterializeResult:
    from maestro_pipelines.backup import archive_month

    month = context.partition_key[:7]
    object_store = store.get_store()
    entry, copied = archive_month(object_store, month)  # marks itself running: retention waits
    manifest = entry.manifest
    context.log.info(
        f"{'Archived' if copied else 'Already archived'}: backup {entry.backup_id} as the restore point of {month}"
    )
    metadata = {
        "month": dg.MetadataValue.text(month),
        "backup_id": dg.MetadataValue.text(entry.backup_id),
        "location": dg.MetadataValue.text(f"{object_store.url.rstrip('/')}/{entry.root}"),
        "copied_now": dg.MetadataValue.bool(copied),
        "verified": dg.MetadataValue.bool(entry.verified),
        "stored_bytes": dg.MetadataValue.int(entry.stored_bytes),
    }
    if manifest is not None:
        metadata["snapshot_at"] = dg.MetadataValue.timestamp(manifest.snapshot_at)
        metadata["databases"] = dg.MetadataValue.text(", ".join(d.role for d in manifest.databases))
        metadata["per_database"] = _database_table(manifest)
    return dg.MaterializeResult(metadata=metadata)


backup_assets = [database_backup, monthly_archive]
