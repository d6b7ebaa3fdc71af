"""`maestro demo`: seed demo tenants, materialize the whole ML graph for each of them, then
the platform upkeep (statistics tables, summary chart, slow queries).

Runs are recorded in a persistent Dagster instance (DAGSTER_HOME, or MAESTRO_HOME/dagster) so
`dagster dev` started with the same DAGSTER_HOME shows them afterwards.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.ml.gates import METRIC_FLOORS_CHECK, NO_REGRESSION_CHECK
from maestro_pipelines.settings import Settings, load_settings


@dataclass
class TenantOutcome:
    tenant: str
    success: bool
    version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: dict[str, bool] = field(default_factory=dict)
    predictions: int | None = None
    error: str | None = None


DEMO_INSTANCE_CONFIG = """\
# Written by `maestro demo`: default local storage. Telemetry off, so that neither the demo
# nor `dagster dev` on this folder prints Dagster's telemetry banner (delete these lines to
# share usage statistics with Dagster).
telemetry:
  enabled: false
"""


def dagster_home(settings: Settings) -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or settings.home / "dagster").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    # A dagster.yaml of the user's own (DAGSTER_HOME) is theirs: only a missing or empty one is written.
    if not config.exists() or not config.read_text().strip():
        config.write_text(DEMO_INSTANCE_CONFIG)
    return home


def prepare_tenants(settings: Settings, tenant_names: list[str], err: Console) -> None:
    """Migrate, seed the demo rows into the default source, and add the tenants."""
    from maestro_pipelines.ml.demo import DEMO_TENANTS, seed_demo_tenant
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import connect
    from maestro_pipelines.platform_db.migrate import upgrade
    from maestro_pipelines.platform_db.tenants import add_tenant, list_tenants

    unknown = [t for t in tenant_names if t not in DEMO_TENANTS]
    if unknown:
        raise MaestroError(f"no demo data for {', '.join(unknown)}", f"Demo tenants are {', '.join(DEMO_TENANTS)}")
    location = locate_platform_database(settings)
    for warning in upgrade(location).warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    with connect(location.platform_url, location.source) as conn:
        if settings.source_url is None:
            for tenant in tenant_names:
                seed_demo_tenant(conn, tenant)
        else:
            err.print("MAESTRO_SOURCE_URL is set: the demo expects the tenants' rows there", highlight=False)
        existing = {t.name for t in list_tenants(conn, include_inactive=True)}
        for tenant in tenant_names:
            if tenant not in existing:
                add_tenant(conn, tenant, DEMO_TENANTS[tenant][0])
        conn.commit()


_EXCEPTION_CLASS = re.compile(r"^[A-Za-z_][\w.]*(Error|Failure|Exception): ")
QUALITY_GATES = (METRIC_FLOORS_CHECK, NO_REGRESSION_CHECK)

def outcome_of(tenant: str, result) -> TenantOutcome:
    outcome = TenantOutcome(tenant, result.success)
    for materialization in result.asset_materializations_for_node("model_evaluation"):
        outcome.metrics = {k: float(materialization.metadata[k].value) for k in ("accuracy", "f1", "roc_auc") if k in materialization.metadata}
    for materialization in result.asset_materializations_for_node("deployment"):
        outcome.version = int(materialization.metadata["production_version"].value)
    for materialization in result.asset_materializations_for_node("batch_predictions"):
        outcome.predictions = int(materialization.metadata["rows_scored"].value)
    for evaluation in result.get_asset_check_evaluations():
        # The quality gates only: a run that failed before them shows none, not the data
        # checks' "pass" (a failed training was shown as "gates pass").
        if evaluation.check_name in QUALITY_GATES:
            outcome.gates[evaluation.check_name] = evaluation.passed
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            first_line = event.step_failure_data.error.message.strip().splitlines()[0]
            # "dagster._core.definitions.events.Failure: <our one line>": the line is the news.
            outcome.error = f"{event.step_key}: {_EXCEPTION_CLASS.sub('', first_line)}"
            break
    return outcome


def run_demo(tenant_names: list[str], out: Console, err: Console) -> list[TenantOutcome]:
    # The console shows the progress bar and the results table; MLflow's INFO lines
    # ("Creating initial MLflow database tables...") say nothing a user acts on. Read when
    # MLflow is first imported (in the first training step); a user's own setting wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    settings = load_settings()
    prepare_tenants(settings, tenant_names, err)
    home = dagster_home(settings)
    os.environ["DAGSTER_HOME"] = str(home)

    import dagster as dg

    from maestro_pipelines.definitions import defs
    from maestro_pipelines.partitions import tenant_partitions

    instance = dg.DagsterInstance.get()
    known = set(instance.get_dynamic_partitions(tenant_partitions.name))
    instance.add_dynamic_partitions(tenant_partitions.name, [t for t in tenant_names if t not in known])
    job = defs.resolve_job_def("train_and_deploy")

    outcomes = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        task = progress.add_task("training", total=len(tenant_names) + 2)
        # The schema the tenants' rows were just written into, materialized so the graph does not
        # show the root of every asset as never materialized.
        progress.update(task, description="platform_schema")
        schema_job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("platform_schema")})
        _execute_quietly(schema_job, instance)
        progress.advance(task)
        for tenant in tenant_names:
            progress.update(task, description=f"train_and_deploy[{tenant}]")
            outcomes.append(outcome_of(tenant, _execute_quietly(job, instance, partition_key=tenant)))
            progress.advance(task)
        # The admin's view: statistics, partitions, slow queries and the summary chart.
        progress.update(task, description="platform_upkeep")
        upkeep = _execute_quietly(defs.resolve_job_def("platform_upkeep"), instance)
        progress.advance(task)

    out.print(_results_table(outcomes))
    for o in outcomes:
        if not o.success:
            out.print(f"{o.tenant}: run failed at {o.error or 'a step (see the Dagster UI)'}", highlight=False, soft_wrap=True)
    out.print(f"Open the Dagster UI (http://127.0.0.1:3000) to see the graph, partitions, checks and pictures:\n"
              f"  DAGSTER_HOME={home} {dagster_command()} dev", highlight=False, soft_wrap=True)
    if not upkeep.success:
        out.print("platform_upkeep failed (see the Dagster UI)", highlight=False)
    if not all(o.success for o in outcomes):
        raise MaestroError("the demo did not finish for every tenant", "Open the Dagster UI (command above) for each failed run's logs")
    return outcomes


def _results_table(outcomes: list[TenantOutcome]) -> Table:
    """One row per tenant: the version it deployed, its test metrics, its gates, its predictions."""
    table = Table(title="maestro demo", title_justify="left")
    for column in ("tenant", "version", "accuracy", "f1", "roc auc", "gates", "predictions"):
        table.add_column(column, justify="left" if column in ("tenant", "gates") else "right")
    for o in outcomes:
        def metric(name: str) -> str:
            value = o.metrics.get(name)
            return "" if value is None or math.isnan(value) else f"{value:.3f}"
        failed_gates = [name for name, passed in sorted(o.gates.items()) if not passed]
        gates = "" if not o.gates else ("pass" if not failed_gates else "FAIL " + ", ".join(failed_gates))
        table.add_row(o.tenant, str(o.version or "-"), metric("accuracy"), metric("f1"), metric("roc_auc"), gates,
                      "-" if o.predictions is None else f"{o.predictions:,}")
    return table


def _execute_quietly(job, instance, **kwargs):
    """Run in process in the demo's instance; the progress bar is the console's view, step logs
    stay in the instance for the UI."""
    return job.execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}}, **kwargs,
    )


def dagster_command() -> str:
    """The `dagster` program beside the running Python (the virtualenv's, whether or not it is
    activated), relative to the current folder when inside it, as the README writes it."""
    import sys

    program = Path(sys.executable).parent / "dagster"
    if not program.exists():
        return "dagster"
    try:
        return str(program.relative_to(Path.cwd()))
    except ValueError:
        return str(program)
