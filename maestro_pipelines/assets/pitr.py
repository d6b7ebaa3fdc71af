"""The physical tier in the graph: `base_backup` (a base backup of each server whose WAL is
archived, beside `database_backup`'s dumps), `wal_archive` (the WAL archive itself: an
external asset that `wal_rpo_sensor` observes) and `pitr_drill` (the weekly point-in-time
recovery drill with its RTO and RPO checks). The work is `maestro_pipelines.backup.pitr`
(no Dagster: `maestro backup run --kind base`, `maestro restore --to-time` and these assets
run the same functions).

A server whose WAL is not archived (archive_mode off, or a managed service that keeps its own
PITR) gets no base backup: `base_backup` says so in its metadata, with the RPO the dumps alone
give there, rather than failing every night.
"""

import time
from datetime import timedelta
from typing import Iterator, Union

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.backups import BACKUP_GROUP
from maestro_pipelines.assets.drills import live_destinations, steps_table
from maestro_pipelines.dagster_support import (
    BACKUP_POOL,
    KIND_TAG,
    STORE_RETRY,
    Column,
    ProgressLog,
    backup_step,
    markdown_list,
    metadata_table,
    mib,
)
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.formatting import human_bytes, human_duration
from maestro_pipelines.objectives import PITR_RPO_TARGET, PITR_RTO_TARGET
from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase

WAL_ARCHIVE = dg.AssetKey("wal_archive")
PITR_DRILL_KIND = "pitr-drill"
PITR_RTO_CHECK = "pitr_rto_within_target"
PITR_RPO_CHECK = "pitr_rpo_within_target"

wal_archive = dg.AssetSpec(
    WAL_ARCHIVE,
    group_name=BACKUP_GROUP,
    kinds={"postgres"},
    description=(
        "The WAL archived continuously into the store (archive_command `maestro wal push %p`, or the embedded "
        "server's spool and pusher). Observed every minute by wal_rpo_sensor: the newest archived segment, its age, "
        f"failures (pg_stat_archiver) and lag; alerts when WAL waits longer than {PITR_RPO_TARGET.seconds} s."
    ),
)


def point_in_time_markdown(platform_db: PlatformDatabase, mlflow: MLflowRegistry) -> str:
    """Per server, the RPO the user really has beside the dumps: WAL archived (any second) or
    not (the dumps' age), for database_backup's metadata."""
    from maestro_pipelines.backup.pitr.base import backup_servers
    from maestro_pipelines.backup.pitr.wal import archiver_status

    targets, _ = live_destinations(platform_db, mlflow)
    lines = []
    for server in backup_servers(targets):
        try:
            status = archiver_status(server.url, server.source)
        except MaestroError as exc:
            lines.append(f"- {server.source}: archiving status unknown ({exc})")
            continue
        if status.archiving:
            lines.append(f"- {status.where}: WAL archived (last {status.last_archived_wal or 'none yet'}): RPO about "
                         f"{status.archive_timeout_s} s, restore to any second with `maestro restore --to-time`")
        else:
            lines.append(f"- {status.where}: RPO is this backup's age (up to a day): {status.problem}")
    return "\n".join(lines) or "no server"


BASE_COLUMNS = [
    Column("server", "string"),
    Column("base_id", "string"),
    Column("kind", "string", "full, or incremental on its parent (PostgreSQL 17+)"),
    Column("stop_lsn", "string", "consistent from this WAL position on"),
    Column("tar_mib", "float", "as pg_basebackup wrote it, MiB"),
    Column("stored_mib", "float", "compressed, as stored, MiB"),
    Column("seconds", "float"),
]


def _base_row(record) -> dict:
    return {"server": record.where, "base_id": record.base_id,
            "kind": record.kind + (f" on {record.parent}" if record.parent else ""), "stop_lsn": record.stop_lsn,
            "tar_mib": mib(record.tar_bytes, 2), "stored_mib": mib(record.compressed_bytes, 2),
            "seconds": round(record.duration_s, 2)}


def window_text(object_store, system_id: str) -> str:
    """The recovery window of one server in a line: from when to when, and any WAL gap."""
    from maestro_pipelines.backup.pitr.window import recovery_window

    try:
        window = recovery_window(object_store, system_id)
    except MaestroError as exc:
        return f"unknown ({exc})"
    if not window.recoverable:
        return "no recoverable point yet: " + "; ".join(window.unusable.values() or ["no usable base backup"])
    text = (f"any point from {window.earliest_time:%Y-%m-%d %H:%M:%S} to {window.latest_time:%Y-%m-%d %H:%M:%S} UTC "
            f"(LSN {window.earliest_lsn} to {window.latest_lsn})")
    return text + "".join(f"; GAP: {gap.describe()}" for gap in window.gaps)


@dg.asset(
    group_name=BACKUP_GROUP,
    pool=BACKUP_POOL,
    retry_policy=STORE_RETRY,
    kinds={"postgres"},
    tags={KIND_TAG: "backup"},
    op_tags={KIND_TAG: "backup"},
    description=(
        "Base backup of each server whose WAL is archived (pg_basebackup streamed through zstd into the store, "
        "incremental on PostgreSQL 17+ when a previous one exists, PostgreSQL's manifest kept): with the WAL "
        "archive, a restore to any second since (maestro restore --to-time). Nightly at 01:00 (MAESTRO_TIMEZONE)."
    ),
)
@backup_step
def base_backup(context: dg.AssetExecutionContext, platform_db: PlatformDatabase, mlflow: MLflowRegistry,
                store: ObjectStoreResource) -> dg.MaterializeResult:
    from maestro_pipelines.backup.pitr.base import take_base_backups

    object_store = store.get_store()
    targets, _ = live_destinations(platform_db, mlflow)
    run = take_base_backups(object_store, targets, kind="auto", verify=True,
                            progress=ProgressLog(context.log, "base backup"), log=context.log.info)
    for note in run.skipped:
        context.log.warning(note)
    failed = [report for report in run.reports if not report.ok]
    if failed:
        raise dg.Failure(description="base backup failed verification: " + "; ".join(
            f"{report.base_id}: {'; '.join(report.problems)}" for report in failed))
    metadata = {
        "base_backups": metadata_table((_base_row(record) for record in run.records), BASE_COLUMNS),
        "notes": markdown_list(run.skipped),
        "servers_without_archiving": dg.MetadataValue.int(len(run.skipped)),
    }
    if run.records:
        metadata["stored_mib"] = dg.MetadataValue.float(mib(sum(r.compressed_bytes for r in run.records)))
        metadata["duration_s"] = dg.MetadataValue.float(round(sum(r.duration_s for r in run.records), 2))
        metadata["recovery_window"] = dg.MetadataValue.md(
            "\n".join(f"- {r.where}: {window_text(object_store, r.system_id)}" for r in run.records))
        metadata["encryption"] = dg.MetadataValue.text(_encryption_text(run.records, object_store, context.log))
        for record in run.records:
            context.log.info(f"Base backup {record.base_id} ({record.kind}) of {record.where}: "
                             f"{human_bytes(record.compressed_bytes)} stored, consistent at {record.stop_lsn}")
    return dg.MaterializeResult(metadata=metadata)


def _encryption_text(records, object_store, log) -> str:
    """How the base backups are sealed (key ids only), or the warning a cloud store's plaintext ones carry."""
    from maestro_pipelines.backup.sealing import unencrypted_warning

    if all(record.encryption for record in records):
        keys = ", ".join(sorted({record.encryption["kek_id"] for record in records}))
        return f"encrypted (AES-256-GCM, each its own data key wrapped by backup key {keys}); record signed"
    warning = unencrypted_warning(object_store)
    if warning is not None:
        log.warning(warning)
    return f"NOT encrypted: {warning}" if warning else "not encrypted (no backup key configured; local store)"


class PitrDrillConfig(dg.Config):
    rto_target_minutes: float = Field(
        default=PITR_RTO_TARGET.total_seconds() / 60, gt=0, le=7 * 24 * 60, allow_inf_nan=False,
        description="RTO target: from the start of recovery to the recovered server checked by pg_amcheck.")
    rpo_target_seconds: float = Field(
        default=PITR_RPO_TARGET.total_seconds(), gt=0, le=24 * 3600, allow_inf_nan=False,
        description="RPO target: from the marker's commit to its WAL in the store (the data a crash would lose).")


def _pitr_metadata(report, store_url: str) -> dict:
    metadata = {
        "ok": dg.MetadataValue.bool(report.ok),
        "drill_id": dg.MetadataValue.text(report.drill_id),
        "store": dg.MetadataValue.text(store_url),
        "base_backup": dg.MetadataValue.text(report.base_id or "-"),
        "steps": steps_table(report.steps),
        "relations_checked": dg.MetadataValue.text(f"{report.relations_checked} relations (pg_amcheck)"),
        "rto_target": dg.MetadataValue.text(human_duration(report.rto_target_s)),
        "rpo_target": dg.MetadataValue.text(human_duration(report.rpo_target_s)),
        "problems": markdown_list(report.problems),
        "notes": markdown_list(report.notes),
    }
    for name, value in (("marker_at", report.marker_at), ("target_time", report.target_time),
                        ("reached_time", report.reached_time)):
        if value is not None:
            metadata[name] = dg.MetadataValue.timestamp(value)
    if report.reached_lsn:
        metadata["reached_lsn"] = dg.MetadataValue.text(report.reached_lsn)
    if report.rto_s is not None:
        metadata["rto_s"] = dg.MetadataValue.float(round(report.rto_s, 2))
    if report.rpo_s is not None:
        metadata["rpo_s"] = dg.MetadataValue.float(round(report.rpo_s, 1))
    return metadata


def pitr_check_results(report) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(check_name=PITR_RTO_CHECK, passed=report.rto_ok, severity=dg.AssetCheckSeverity.ERROR,
                            description=f"RTO {human_duration(report.rto_s)}, target {human_duration(report.rto_target_s)}",
                            metadata={"rto_s": dg.MetadataValue.float(round(report.rto_s, 2))}),
        dg.AssetCheckResult(check_name=PITR_RPO_CHECK, passed=report.rpo_ok, severity=dg.AssetCheckSeverity.ERROR,
                            description=f"measured RPO {human_duration(report.rpo_s)}, target "
                                        f"{human_duration(report.rpo_target_s)}",
                            metadata={"rpo_s": dg.MetadataValue.float(round(report.rpo_s, 1))}),
    ]


@dg.asset(
    group_name=BACKUP_GROUP,
    pool=BACKUP_POOL,
    kinds={"postgres"},
    tags={KIND_TAG: PITR_DRILL_KIND},
    op_tags={KIND_TAG: PITR_DRILL_KIND},
    description=(
        "Weekly point-in-time recovery drill: write a marker row, wait until its WAL is in the store, recover to "
        "just after it into a temporary server, check the marker is there and a later one is not, run pg_amcheck, "
        "and record the RTO and the measured RPO against their targets."
    ),
    check_specs=[
        dg.AssetCheckSpec(PITR_RTO_CHECK, asset="pitr_drill", blocking=False,
                          description=f"Recovery to checked within the RTO target (default {PITR_RTO_TARGET.seconds // 60} min)."),
        dg.AssetCheckSpec(PITR_RPO_CHECK, asset="pitr_drill", blocking=False,
                          description=f"The marker's WAL in the store within the RPO target (default {PITR_RPO_TARGET.seconds} s)."),
    ],
)
def pitr_drill(context: dg.AssetExecutionContext, config: PitrDrillConfig, platform_db: PlatformDatabase,
               mlflow: MLflowRegistry, store: ObjectStoreResource,
               alerts: AlertResource) -> Iterator[Union[dg.AssetObservation, dg.MaterializeResult]]:
    from maestro_pipelines.backup.pitr.drill import run_pitr_drill

    object_store = store.get_store()
    targets, _ = live_destinations(platform_db, mlflow)
    platform = next(t for t in targets if t.role == "platform")
    started = time.monotonic()
    try:
        report = run_pitr_drill(object_store, platform, rto_target=timedelta(minutes=config.rto_target_minutes),
                                rpo_target=timedelta(seconds=config.rpo_target_seconds), log=context.log.info)
    except MaestroError as exc:
        alerts.send("PITR drill could not run", f"Run id: {context.run.run_id}\n{exc}", "error", log=context.log)
        raise dg.Failure(description=str(exc)) from None
    metadata = _pitr_metadata(report, object_store.url)
    if report.problems:
        yield dg.AssetObservation(asset_key=context.asset_key, metadata=metadata)
        alerts.send("PITR drill failed", f"Run id: {context.run.run_id}\nProblems: {' | '.join(report.problems)}",
                    "error", log=context.log)
        raise dg.Failure(description="PITR drill failed: " + "; ".join(report.problems), metadata=metadata)
    context.log.info(f"PITR drill done in {time.monotonic() - started:.1f} s: RTO {human_duration(report.rto_s)}, "
                     f"measured RPO {human_duration(report.rpo_s)}, reached {report.reached_lsn}")
    yield dg.MaterializeResult(metadata=metadata, check_results=pitr_check_results(report))
    if not report.ok:
        alerts.send("PITR drill missed a target", "\n".join([f"Run id: {context.run.run_id}", *report.notes]),
                    "warning", log=context.log)


pitr_assets = [wal_archive, base_backup, pitr_drill]
