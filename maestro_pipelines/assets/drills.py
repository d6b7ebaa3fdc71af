"""The disaster-recovery drill as an asset: `dr_drill` restores the latest verified backup
into scratch databases next to the live ones, proves it (counts and checksums against the
manifest, amcheck on every btree index, migrations, MLflow's `production` aliases), measures
RTO and RPO and drops the scratch databases. The work is `maestro_pipelines.backup.run_drill`
(no Dagster: `maestro drill` runs the same function); this is a thin wrapper that logs,
shows the drill history and alerts. The history is read from the store's drill records
(backup.drill_history), which every drill writes, `maestro drill` ones too: it survives a new
Dagster instance. Metadata `drill_history` (a table: when, ran from, backup, RTO, RPO, result)
and `rto_history` (the chart) show the last drills; `rto_s` and `rpo_h` are Dagster's plots,
where `store_catalog_sensor` (sensors/catalog.py) adds a point for each `maestro drill`.

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
from typing import Iterator, Union

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.backups import BACKUP_GROUP
from maestro_pipelines.dagster_support import BACKUP_POOL, KIND_TAG, Column, ProgressLog, markdown_list, metadata_table
from maestro_pipelines.environment import run_settings
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.formatting import human_duration
from maestro_pipelines.objectives import RPO_TARGET_HOURS
from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase

DRILL_KIND = "drill"
RTO_CHECK = "rto_within_target"
RPO_CHECK = "rpo_within_target"
CHART_DRILLS = 10
"""Drills in the RTO chart and the history table: this one and the 9 recorded before it
(in the store: `maestro drill` ones too)."""


def live_destinations(platform_db: PlatformDatabase, mlflow: MLflowRegistry) -> tuple[list, list[str]]:
    """(DatabaseTarget list, notes): the live databases of this run's resources, as
    `database_backup` backs them up; Dagster's own is the environment's
    (MAESTRO_DAGSTER_DATABASE_URL), as for `maestro restore`."""
    from maestro_pipelines.backup import database_targets

    return database_targets(run_settings(platform_db, mlflow), platform_db.location())


def steps_table(steps) -> dg.MetadataValue:
    """RestoreStep list -> a table of step, seconds, detail."""
    return metadata_table(
        ({"step": s.name, "seconds": round(s.seconds, 3), "detail": s.detail or ""} for s in steps),
        [Column("step", "string"), Column("seconds", "float"), Column("detail", "string")],
    )


class DrillConfig(dg.Config):
    # The library's ranges (backup.drill.MAX_RTO_MINUTES, MAX_RPO_HOURS, backup.restore.MAX_JOBS),
    # written out: importing the library here would load SQLAlchemy with the definitions.
    rto_target_minutes: float = Field(
        default=15, gt=0, le=7 * 24 * 60, allow_inf_nan=False, description="RTO target: from the drill's start to the restored databases verified."
    )
    rpo_target_hours: float = Field(
        default=RPO_TARGET_HOURS, gt=0, le=366 * 24, allow_inf_nan=False, description="RPO target: the drilled backup's snapshot at most this old at the drill's start."
    )
    jobs: int = Field(default=2, ge=1, le=32, description="pg_restore parallel jobs (-j).")
    backup: str = Field(
        default="latest", description="The backup to drill with: `latest` (the latest verified backup; `newest` is accepted too) or a backup id."
    )


def _drill_history(context, object_store, report) -> list:
    """The last CHART_DRILLS drills recorded in the store (`maestro drill` ones too), oldest
    first, this one included (from the report when the store refused its record)."""
    from maestro_pipelines.backup.drill_history import drill_record, list_drills

    try:
        records = list_drills(object_store, limit=CHART_DRILLS, log=context.log.warning).records
    except MaestroError as exc:  # the history is a nicety: never fail a drill over it
        context.log.warning(f"Could not read the drill history from the store: {exc}")
        records = []
    if report.record_key is None or report.record_key not in {r.key for r in records}:
        records = (records + [drill_record(report, "dagster", context.run.run_id)])[-CHART_DRILLS:]
    return records


TARGET_IN_SCALE = 3
"""The RTO target is drawn as a line when it is within this factor of the largest RTO;
beyond, a line at the top would flatten every bar, so the target is written instead."""
SOURCE_COLOURS = {"cli": ("#1565c0", "CLI drill (maestro drill)"), "dagster": ("#7b1fa2", "Dagster drill (dr_drill)"),
                  "library": ("#757575", "other drill (run_drill)")}
FAILED_COLOUR = "#c62828"


@dataclasses.dataclass
class RtoChart:
    png: bytes
    ylim: tuple[float, float]
    target_drawn: bool
    """False when the target is off the scale (then written in a corner)."""


def rto_axis(values: list[float], target_s: float) -> tuple[float, bool]:
    """(top of the y axis, whether the target line is on it): the axis fits the measured RTOs."""
    largest = max(values, default=0.0)
    if largest <= 0:
        return max(target_s * 1.15, 1.0), True
    drawn = target_s <= largest * TARGET_IN_SCALE
    return max(largest, target_s if drawn else 0.0) * 1.2, drawn


def rto_chart_png(records: list, target_s: float) -> RtoChart:
    """Bars of the RTO (seconds) of each drill record, oldest first, coloured by where it ran
    (CLI or Dagster); a failed drill is hatched red, one without an RTO a red x at 0."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    top, target_drawn = rto_axis([r.rto_s for r in records if r.rto_s is not None], target_s)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    try:
        for index, record in enumerate(records):
            colour = SOURCE_COLOURS.get(record.source, SOURCE_COLOURS["library"])[0]
            if record.rto_s is None:
                ax.plot(index, 0, marker="x", color=FAILED_COLOUR, markersize=10, markeredgewidth=2, clip_on=False)
                continue
            ax.bar(index, record.rto_s, color=colour, hatch=None if record.ok else "//",
                   edgecolor=FAILED_COLOUR if not record.ok else colour, linewidth=1.5 if not record.ok else 0)
            ax.annotate(f"{record.rto_s:.1f} s", (index, record.rto_s), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        handles = [Patch(color=SOURCE_COLOURS[s][0], label=SOURCE_COLOURS[s][1])
                   for s in SOURCE_COLOURS if any(r.source == s for r in records)]
        if any(not r.ok for r in records):
            handles.append(Patch(facecolor="white", edgecolor=FAILED_COLOUR, hatch="//", label="failed (x: no RTO)"))
        title = f"RTO of the last {len(records)} drill(s) (UTC)"
        if target_drawn:
            handles.append(ax.axhline(target_s, color="#555555", linestyle="--", linewidth=1, label=f"target {target_s:.0f} s"))
        else:  # in the title, where no bar can hide it
            title += f"; target {target_s:.0f} s, off the scale"
        ax.set_ylim(0, top)
        ax.set_xlim(-0.6, max(len(records), 1) - 0.4)
        labels = [f"{r.started_at:%m-%d}\n{r.started_at:%H:%M}" for r in records]
        ax.set_xticks(range(len(records)), labels, fontsize=7)
        ax.set_ylabel("RTO (s)")
        ax.set_title(title, fontsize=9)
        # Beside the plot, not over the bars.
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        return RtoChart(buffer.getvalue(), ax.get_ylim(), target_drawn)
    finally:
        plt.close(fig)


def history_markdown(records: list) -> str:
    """The drills as a markdown table, newest first: the history checkable as text."""
    # The long backup id last: the metadata column is narrow, what on-call scans comes first.
    lines = ["| started (UTC) | ran from | result | RTO | RPO | backup |", "|---|---|---|---|---|---|"]
    for r in reversed(records):
        rto = human_duration(r.rto_s) if r.rto_s is not None else "-"
        rpo = human_duration(r.rpo_s) if r.rpo_s is not None else "-"
        result = "ok" if r.ok else "FAILED: " + (r.problems[0] if r.problems else "no detail recorded")
        result = result.replace("|", "/").replace("\n", " ")
        result = result if len(result) <= 160 else result[:159] + "…"
        where = f"[{r.where}](/runs/{r.run_id})" if r.source == "dagster" and r.run_id else r.where
        lines.append(f"| {r.started_at:%Y-%m-%d %H:%M:%S} | {where} | {result} | {rto} | {rpo} | {r.backup_id or '-'} |")
    return "\n".join(lines)


def drill_history_metadata(records: list, target_s: float, log) -> dict:
    metadata = {"drill_history": dg.MetadataValue.md(history_markdown(records))}
    if records:
        try:
            metadata["rto_history"] = dg.MetadataValue.md(_chart_markdown(rto_chart_png(records, target_s).png))
        except Exception as exc:  # matplotlib trouble must not hide the drill's result
            log.warning(f"Could not draw the RTO chart: {type(exc).__name__}: {exc}")
    return metadata


def _chart_markdown(png: bytes) -> str:
    import base64

    return f"![RTO of the last drills](data:image/png;base64,{base64.b64encode(png).decode()})"


def drill_record_metadata(record, store_url: str) -> dict:
    """The metadata of one drill in dr_drill's history from its record in the store
    (backup.drill_history): what store_catalog_sensor reports for a `maestro drill`, and the
    core of what dr_drill records of its own drills (`_drill_metadata` adds the report's details)."""
    metadata = {
        "ok": dg.MetadataValue.bool(record.ok),
        "backup_id": dg.MetadataValue.text(record.backup_id or "none"),
        "store": dg.MetadataValue.text(store_url),
        "ran_from": dg.MetadataValue.text(record.where),
        "started_at": dg.MetadataValue.timestamp(record.started_at),
        # Text, not numbers: Dagster plots every number over the materializations, and a target
        # plots as a flat line, a count of 0 or 1 with fractional ticks. Numbers only for what a
        # drill measures (rto_s, rpo_h below; the seconds of the targets are in the drill record).
        "rto_target": dg.MetadataValue.text(human_duration(record.rto_target_s)),
        "rpo_target": dg.MetadataValue.text(human_duration(record.rpo_target_s)),
        "steps": steps_table([_RecordedStep(name, seconds) for name, seconds in record.steps.items()]),
        "problems": markdown_list(record.problems),
        "notes": markdown_list(record.notes),
    }
    # Only measured values: a missing RTO is not 0 s (the chart and the checks read these).
    if record.rto_s is not None:
        metadata["rto_s"] = dg.MetadataValue.float(round(record.rto_s, 3))
    if record.rpo_s is not None:
        metadata["rpo_h"] = dg.MetadataValue.float(round(record.rpo_s / 3600, 3))
        metadata["snapshot_at"] = dg.MetadataValue.timestamp(record.started_at - timedelta(seconds=record.rpo_s))
    return metadata


@dataclasses.dataclass
class _RecordedStep:
    name: str
    seconds: float
    detail: str = ""


def restore_worked(record) -> bool:
    """Whether the drill restored and proved its backup, a missed target aside: dr_drill then
    materializes (a missed target is a failed check); otherwise it records an observation."""
    if not record.restored or record.rto_s is None or record.rpo_s is None:
        return False
    missed = (record.rto_s > record.rto_target_s) + (record.rpo_s > record.rpo_target_s)
    return len(record.problems) <= missed  # the record's problems end with the missed targets


def target_check_fields(record) -> list[dict]:
    """The fields of the checks rto_within_target and rpo_within_target for a drill that
    restored (a DrillReport or a drill record: both have these fields)."""
    return [
        {
            "check_name": RTO_CHECK,
            "passed": record.rto_s <= record.rto_target_s,
            "severity": dg.AssetCheckSeverity.ERROR,
            "description": f"RTO {human_duration(record.rto_s)}, target {human_duration(record.rto_target_s)}",
            "metadata": {
                "rto_s": dg.MetadataValue.float(round(record.rto_s, 3)),
                "target_s": dg.MetadataValue.float(record.rto_target_s),
            },
        },
        {
            "check_name": RPO_CHECK,
            "passed": record.rpo_s <= record.rpo_target_s,
            "severity": dg.AssetCheckSeverity.ERROR,
            "description": (
                f"RPO {human_duration(record.rpo_s)} (backup {record.backup_id}), "
                f"target {human_duration(record.rpo_target_s)}"
            ),
            "metadata": {
                "rpo_h": dg.MetadataValue.float(round(record.rpo_s / 3600, 3)),
                "target_h": dg.MetadataValue.float(round(record.rpo_target_s / 3600, 2)),
            },
        },
    ]


DRILLED_DATABASE_COLUMNS = [
    Column("role", "string"),
    Column("restored_as", "string", "scratch database (dropped after the drill)"),
    Column("tables", "int"),
    Column("rows", "int"),
]


def _drill_metadata(report, store_url: str, run_id: str) -> dict:
    from maestro_pipelines.backup.drill_history import drill_record

    metadata = drill_record_metadata(drill_record(report, "dagster", run_id), store_url)
    metadata.update({
        "steps": steps_table(report.steps),  # with each step's detail, which the record leaves out
        "indexes_checked": dg.MetadataValue.text(f"{report.indexes_checked} btree indexes (amcheck)"),
        "aliases_resolved": dg.MetadataValue.text(
            f"{report.aliases_resolved} production alias{'' if report.aliases_resolved == 1 else 'es'}"),
        "databases": metadata_table(report.databases, DRILLED_DATABASE_COLUMNS),
    })
    if report.snapshot_at is not None:
        metadata["snapshot_at"] = dg.MetadataValue.timestamp(report.snapshot_at)
    return metadata


def _alert_text(context, report, failures: list[str]) -> str:
    lines = [f"Run id: {context.run.run_id}"]
    if report.backup_id:
        lines.append(f"Backup: {report.backup_id}")
    if report.rto_s is not None:
        lines.append(f"RTO: {human_duration(report.rto_s)} (target {human_duration(report.rto_target_s)})")
    if report.rpo_s is not None:
        lines.append(f"RPO: {human_duration(report.rpo_s)} (target {human_duration(report.rpo_target_s)})")
    lines.append("Problems: " + " | ".join(failures))
    return "\n".join(lines)


@dg.asset(
    group_name=BACKUP_GROUP,
    pool=BACKUP_POOL,
    # No dependency on database_backup: a drill drills whatever verified backup the store has,
    # `maestro backup run` ones too, so a deployment whose backups come from the CLI would get
    # Dagster's "upstream database_backup has not been materialized, this may fail" on every click.
    kinds={"postgres"},
    tags={KIND_TAG: DRILL_KIND},
    op_tags={KIND_TAG: DRILL_KIND},
    description=(
        "Weekly disaster-recovery drill: restore the latest verified backup into scratch databases, verify "
        "counts, checksums, btree indexes (amcheck), migrations and MLflow's production aliases, measure "
        "RTO and RPO, drop the scratch databases. Alerts when it fails or misses a target."
    ),
    check_specs=[
        dg.AssetCheckSpec(RTO_CHECK, asset="dr_drill", blocking=False,
                          description="Restore to verified within the RTO target (default 15 minutes)."),
        dg.AssetCheckSpec(RPO_CHECK, asset="dr_drill", blocking=False,
                          description=f"The drilled backup's snapshot within the RPO target (default {RPO_TARGET_HOURS:g} hours)."),
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
    started = time.monotonic()
    report, object_store = _run_drill(context, config, platform_db, mlflow, store, alerts)
    for note in report.notes:
        context.log.warning(f"note: {note}")
    metadata = _drill_metadata(report, object_store.url, context.run.run_id)
    metadata.update(drill_history_metadata(_drill_history(context, object_store, report), report.rto_target_s, context.log))
    if report.problems:
        # The restore did not prove the backup: record what the drill saw (yielded, so it is
        # recorded before the step fails), alert, fail.
        yield dg.AssetObservation(asset_key=context.asset_key, metadata=metadata)
        raise _unproven_backup(context, report, alerts, metadata)
    _alert_missed_targets(context, report, alerts)
    context.log.info(
        f"Drill with backup {report.backup_id} done in {time.monotonic() - started:.1f} s: "
        f"RTO {report.rto_s:.1f} s, RPO {report.rpo_s / 3600:.2f} h, {report.indexes_checked} indexes checked, "
        f"{report.aliases_resolved} production aliases resolved"
    )
    yield dg.MaterializeResult(
        metadata=metadata,
        check_results=[dg.AssetCheckResult(**fields) for fields in target_check_fields(report)],
    )


def _run_drill(context, config: DrillConfig, platform_db: PlatformDatabase, mlflow: MLflowRegistry,
               store: ObjectStoreResource, alerts: AlertResource):
    """(the DrillReport, the store) of `run_drill` with this run's resources, as `maestro drill`
    runs it; a drill that could not start or broke off alerts and fails the step."""
    from maestro_pipelines.backup import run_drill
    from maestro_pipelines.backup.drill import drill_targets
    from maestro_pipelines.backup.phases import PhaseLog

    try:
        rto_target, rpo_target = drill_targets(config.rto_target_minutes, config.rpo_target_hours)
        destinations, notes = live_destinations(platform_db, mlflow)
        for note in notes:
            context.log.info(note)
        object_store = store.get_store()
        context.log.info(
            f"Drill: restoring backup '{config.backup}' from {object_store.url} into scratch databases next to "
            f"{', '.join(f'{d.role} ({d.database})' for d in destinations)}"
        )
        report = run_drill(
            object_store, destinations, rto_target=rto_target, rpo_target=rpo_target, jobs=config.jobs,
            progress=ProgressLog(context.log, "download"), log=context.log.info, backup=config.backup,
            source="dagster", run_id=context.run.run_id,
            phases=PhaseLog(context.log.info, milestones=True),  # each step logged as it ends
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
    return report, object_store


def _unproven_backup(context, report, alerts: AlertResource, metadata: dict) -> dg.Failure:
    """Alert that the drill's restore did not prove its backup; the Failure that fails the step."""
    alerts.send(
        f"Maestro DR drill failed: backup {report.backup_id or '?'} did not restore cleanly",
        _alert_text(context, report, report.failures()),
        "error",
        log=context.log,
    )
    return dg.Failure(
        description=f"DR drill failed with backup {report.backup_id}: {'; '.join(report.problems)}",
        metadata=metadata,
        allow_retries=False,
    )


def _alert_missed_targets(context, report, alerts: AlertResource) -> None:
    """A drill that proved its backup but missed its RTO or RPO target alerts (its check fails)."""
    failures = report.failures()
    if not failures:
        return
    missed = [name for name, ok in (("RTO", report.rto_ok), ("RPO", report.rpo_ok)) if not ok]
    alerts.send(
        f"Maestro DR drill missed its {' and '.join(missed)} target",
        _alert_text(context, report, failures),
        "error",
        log=context.log,
    )


drill_assets = [dr_drill]
