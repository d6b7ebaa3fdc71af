"""The disaster-recovery drill as an asset: `dr_drill` restores the newest verified backup
into scratch databases next to the live ones, proves it (counts and checksums against the
manifest, amcheck on every btree index, migrations, MLflow's `production` aliases), measures
RTO and RPO and drops the scratch databases. The work is `maestro_pipelines.backup.run_drill`
(no Dagster: `maestro drill` runs the same function); this is a thin wrapper that logs, keeps
the history as metadata and alerts.

Outcomes
    - the drill worked and met both targets: a materialization, both checks pass;
    - it worked but missed a target (RTO `rto_within_target`, RPO `rpo_within_target`): a
      materialization whose check fails (severity ERROR), and an alert through `alerts`;
    - it did not work (no verified backup, a damaged dump, counts that differ, a corrupt
      index, an alias that does not resolve): an alert, the drill's metadata recorded as an
      observation of `dr_drill`, and the step fails (the failure-alert sensor reports the
      run too: runs of `dr_drill_job` are tagged `maestro/kind: drill`).

No retries: a drill that fails is the finding; the weekly schedule (or a click) runs the
next one. It runs in the pool `maestro_backup` like every step that works on backups, so it
never restores while a backup is being taken and, queued behind Sunday's backup, drills
with that fresh one.
"""

import dataclasses
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Union

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.backups import BACKUP_GROUP, BACKUP_POOL, _ProgressLog, database_backup
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.settings import load_settings

DRILL_KIND = "drill"
RTO_CHECK = "rto_within_target"
RPO_CHECK = "rpo_within_target"
CHART_DRILLS = 10
"""Drills in the RTO chart: this one and the 9 materializations before it."""


def live_destinations(platform_db: PlatformDatabase, mlflow: MLflowRegistry) -> tuple[list, list[str]]:
    """(DatabaseTarget list, notes): the live databases of this run's resources, as
    `database_backup` backs them up; Dagster's own is the environment's
    (MAESTRO_DAGSTER_DATABASE_URL), as for `maestro restore`."""
    from maestro_pipelines.backup import database_targets

    settings = dataclasses.replace(
        load_settings(),
        home=Path(platform_db.home).expanduser().resolve(),
        database_url=platform_db.database_url or None,
        mlflow_tracking_uri=mlflow.tracking_uri or None,
    )
    return database_targets(settings, platform_db.location())


def steps_table(steps) -> dg.MetadataValue:
    """RestoreStep list -> a table of step, seconds, detail."""
    return dg.MetadataValue.table(
        [dg.TableRecord({"step": s.name, "seconds": round(s.seconds, 3), "detail": s.detail or ""}) for s in steps],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("step", "string"),
                dg.TableColumn("seconds", "float"),
                dg.TableColumn("detail", "string"),
            ]
        ),
    )


class DrillConfig(dg.Config):
    # The library's ranges (backup.drill.MAX_RTO_MINUTES, MAX_RPO_HOURS, backup.restore.MAX_JOBS),
    # written out: importing the library here would load SQLAlchemy with the definitions.
    rto_target_minutes: float = Field(
        default=15, gt=0, le=7 * 24 * 60, allow_inf_nan=False, description="RTO target: from the drill's start to the restored databases verified."
    )
    rpo_target_hours: float = Field(
        default=26, gt=0, le=366 * 24, allow_inf_nan=False, description="RPO target: the drilled backup's snapshot at most this old at the drill's start."
    )
    jobs: int = Field(default=2, ge=1, le=32, description="pg_restore parallel jobs (-j).")
    backup: str = Field(
        default="latest", description="The backup to drill with: `latest` (the newest verified) or a backup id."
    )


def _previous_rtos(context, limit: int) -> list[tuple[float, float]]:
    """(timestamp, rto_s) of up to `limit` earlier materializations of this asset, oldest first."""
    try:
        records = context.instance.fetch_materializations(context.asset_key, limit=limit).records
    except Exception as exc:  # the chart is a nicety: never fail a drill over it
        context.log.warning(f"Could not read earlier drills for the RTO chart: {exc}")
        return []
    points = []
    for record in records:
        materialization = record.asset_materialization
        value = materialization.metadata.get("rto_s") if materialization else None
        if value is not None and isinstance(value.value, (int, float)):
            points.append((record.timestamp, float(value.value)))
    return sorted(points)


def rto_chart_png(points: list[tuple[float, float]], target_s: float) -> bytes:
    """Bars of the RTO (seconds) of each drill (timestamp, rto_s), oldest first, with the target."""
    import io
    from datetime import datetime, timezone

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [datetime.fromtimestamp(ts, timezone.utc).strftime("%m-%d\n%H:%M") for ts, _ in points]
    values = [rto for _, rto in points]
    fig, ax = plt.subplots(figsize=(6, 3))
    try:
        colors = ["#2e7d32" if v <= target_s else "#c62828" for v in values]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(target_s, color="#555555", linestyle="--", linewidth=1, label=f"target {target_s:.0f} s")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_ylabel("RTO (s)")
        ax.set_title(f"RTO of the last {len(values)} drill(s) (UTC)", fontsize=9)
        ax.set_ylim(0, max(values + [target_s]) * 1.15)
        ax.legend(fontsize=7, loc="upper left")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _chart_markdown(png: bytes) -> str:
    import base64

    return f"![RTO of the last drills](data:image/png;base64,{base64.b64encode(png).decode()})"


def _drill_metadata(report, store_url: str) -> dict:
    metadata = {
        "ok": dg.MetadataValue.bool(report.ok),
        "backup_id": dg.MetadataValue.text(report.backup_id or "none"),
        "store": dg.MetadataValue.text(store_url),
        "rto_target_s": dg.MetadataValue.float(report.rto_target_s),
        "rpo_target_h": dg.MetadataValue.float(round(report.rpo_target_s / 3600, 2)),
        "steps": steps_table(report.steps),
        "indexes_checked": dg.MetadataValue.int(report.indexes_checked),
        "aliases_resolved": dg.MetadataValue.int(report.aliases_resolved),
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in report.failures()) or "none"),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in report.notes) or "none"),
        "databases": dg.MetadataValue.table(
            [dg.TableRecord({k: d[k] for k in ("role", "restored_as", "tables", "rows")}) for d in report.databases],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("role", "string"),
                    dg.TableColumn("restored_as", "string", description="scratch database (dropped after the drill)"),
                    dg.TableColumn("tables", "int"),
                    dg.TableColumn("rows", "int"),
                ]
            ),
        ),
    }
    # Only measured values: a missing RTO is not 0 s (the chart and the checks read these).
    if report.rto_s is not None:
        metadata["rto_s"] = dg.MetadataValue.float(round(report.rto_s, 3))
    if report.rpo_s is not None:
        metadata["rpo_h"] = dg.MetadataValue.float(round(report.rpo_s / 3600, 3))
    if report.snapshot_at is not None:
        metadata["snapshot_at"] = dg.MetadataValue.timestamp(report.snapshot_at)
    return metadata


def _alert_text(context, report, failures: list[str]) -> str:
    lines = [f"Run id: {context.run.run_id}"]
    if report.backup_id:
        lines.append(f"Backup: {report.backup_id}")
    if report.rto_s is not None:
        lines.append(f"RTO: {report.rto_s:.1f} s (target {report.rto_target_s:.0f} s)")
    if report.rpo_s is not None:
        lines.append(f"RPO: {report.rpo_s / 3600:.1f} h (target {report.rpo_target_s / 3600:.1f} h)")
    lines.append("Problems: " + " | ".join(failures))
    return "\n".join(lines)


@dg.asset(
    group_name=BACKUP_GROUP,
    pool=BACKUP_POOL,
    # Lineage: a drill proves the backups. It never needs a partition of database_backup to
    # be materialized (it drills whatever verified backup the store has).
    deps=[database_backup],
    kinds={"postgres"},
    tags={"maestro/kind": DRILL_KIND},
    op_tags={"maestro/kind": DRILL_KIND},
    description=(
        "Weekly disaster-recovery drill: restore the newest verified backup into scratch databases, verify "
        "counts, checksums, btree indexes (amcheck), migrations and MLflow's production aliases, measure "
        "RTO and RPO, drop the scratch databases. Alerts when it fails or misses a target."
    ),
    check_specs=[
        dg.AssetCheckSpec(RTO_CHECK, asset="dr_drill", blocking=False,
                          description="Restore to verified within the RTO target (default 15 minutes)."),
        dg.AssetCheckSpec(RPO_CHECK, asset="dr_drill", blocking=False,
                          description="The drilled backup's snapshot within the RPO target (default 26 hours)."),
    ],
)
def dr_drill(
    context: dg.AssetExecutionContext,
    config: DrillConfig,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
    alerts: AlertResource,
) -> Iterator[Union[dg.AssetObservation, dg.MaterializeResult]]:
    from maestro_pipelines.backup import run_drill

    started = time.monotonic()
    try:
        destinations, notes = live_destinations(platform_db, mlflow)
        for note in notes:
            context.log.info(note)
        object_store = store.get_store()
        context.log.info(
            f"Drill: restoring backup '{config.backup}' from {object_store.url} into scratch databases next to "
            f"{', '.join(f'{d.role} ({d.database})' for d in destinations)}"
        )
        report = run_drill(
            object_store,
            destinations,
            rto_target=timedelta(minutes=config.rto_target_minutes),
            rpo_target=timedelta(hours=config.rpo_target_hours),
            jobs=config.jobs,
            progress=_ProgressLog(context.log, "download"),
            log=context.log.info,
            backup=config.backup,
        )
    except MaestroError as exc:  # before any restore: no verified backup, an unknown id, a server or store down
        alerts.send("Maestro DR drill failed", f"Run id: {context.run.run_id}\nProblem: {exc}", "error", log=context.log)
        raise dg.Failure(description=f"DR drill failed: {exc}", allow_retries=False) from None
    except Exception as exc:  # a server gone mid-drill, a bug: alert, then fail with the traceback
        alerts.send(
            "Maestro DR drill failed",
            f"Run id: {context.run.run_id}\nError: {type(exc).__name__}: {str(exc).strip()[:500]}",
            "error",
            log=context.log,
        )
        raise
    for step in report.steps:
        context.log.info(f"{step.name}: {step.seconds:.2f} s {step.detail}".rstrip())
    for note in report.notes:
        context.log.warning(f"note: {note}")

    metadata = _drill_metadata(report, object_store.url)
    failures = report.failures()
    if report.problems:
        # The restore did not prove the backup: record what the drill saw (yielded, so it is
        # recorded before the step fails), alert, fail.
        yield dg.AssetObservation(asset_key=context.asset_key, metadata=metadata)
        alerts.send(
            f"Maestro DR drill failed: backup {report.backup_id or '?'} did not restore cleanly",
            _alert_text(context, report, failures),
            "error",
            log=context.log,
        )
        raise dg.Failure(
            description=f"DR drill failed with backup {report.backup_id}: {'; '.join(report.problems)}",
            metadata=metadata,
            allow_retries=False,
        )

    points = _previous_rtos(context, CHART_DRILLS - 1)
    if report.rto_s is not None:
        points.append((time.time(), report.rto_s))
    if points:
        try:
            metadata["rto_history"] = dg.MetadataValue.md(_chart_markdown(rto_chart_png(points, report.rto_target_s)))
        except Exception as exc:  # matplotlib trouble must not hide the drill's result
            context.log.warning(f"Could not draw the RTO chart: {type(exc).__name__}: {exc}")

    if failures:
        missed = [name for name, ok in (("RTO", report.rto_ok), ("RPO", report.rpo_ok)) if not ok]
        alerts.send(
            f"Maestro DR drill missed its {' and '.join(missed)} target",
            _alert_text(context, report, failures),
            "error",
            log=context.log,
        )
    context.log.info(
        f"Drill with backup {report.backup_id} done in {time.monotonic() - started:.1f} s: "
        f"RTO {report.rto_s:.1f} s, RPO {report.rpo_s / 3600:.2f} h, {report.indexes_checked} indexes checked, "
        f"{report.aliases_resolved} production aliases resolved"
    )
    yield dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=RTO_CHECK,
                passed=report.rto_ok,
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"RTO {report.rto_s:.1f} s, target {report.rto_target_s:.0f} s",
                metadata={
                    "rto_s": dg.MetadataValue.float(round(report.rto_s, 3)),
                    "target_s": dg.MetadataValue.float(report.rto_target_s),
                },
            ),
            dg.AssetCheckResult(
                check_name=RPO_CHECK,
                passed=report.rpo_ok,
                severity=dg.AssetCheckSeverity.ERROR,
                description=(
                    f"RPO {report.rpo_s / 3600:.2f} h (backup {report.backup_id}), "
                    f"target {report.rpo_target_s / 3600:.1f} h"
                ),
                metadata={
                    "rpo_h": dg.MetadataValue.float(round(report.rpo_s / 3600, 3)),
                    "target_h": dg.MetadataValue.float(round(report.rpo_target_s / 3600, 2)),
                },
            ),
        ],
    )


drill_assets = [dr_drill]
