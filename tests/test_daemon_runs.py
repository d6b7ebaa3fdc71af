"""`train_and_deploy` the way the UI and the daemon run it: three demo tenants seeded as
`maestro demo` seeds them, runs submitted to the QueuedRunCoordinator with `dagster job
launch`, started by a real `dagster-daemon` (DefaultRunLauncher: one run worker process per
run), each step in its own subprocess (the multiprocess executor), all on the embedded
default (no MAESTRO_DATABASE_URL: every one of those processes attaches to the same embedded
PostgreSQL in MAESTRO_HOME)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

from . import test_production_instance
from .test_production_instance import failure_messages, launch, start_daemon

TENANTS = ["acme", "globex", "initech"]
RUN_DEADLINE_S = 900

DAGSTER_YAML = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
telemetry:
  enabled: false
"""

SEED = textwrap.dedent("""
    import sys
    import dagster as dg
    from rich.console import Console
    from maestro_pipelines.demo_run import prepare_tenants
    from maestro_pipelines.partitions import tenant_partitions
    from maestro_pipelines.settings import load_settings

    tenants = sys.argv[1:]
    prepare_tenants(load_settings(), tenants, Console(stderr=True))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(tenant_partitions.name, tenants)
""")


OPEN_MLFLOW = textwrap.dedent("""
    import os
    from maestro_pipelines.resources import MLflowRegistry
    registry = MLflowRegistry(home=os.environ["MAESTRO_HOME"]).registry()
    print(registry.experiment_id("acme"))
""")


@pytest.fixture
def user_setup(tmp_path):
    """MAESTRO_HOME and DAGSTER_HOME (queued runs, default run launcher, local storage) and
    nothing else configured; the embedded server is stopped afterwards."""
    maestro_home, dagster_home, tmp = tmp_path / "maestro_home", tmp_path / "dagster_home", tmp_path / "tmp"
    for folder in (maestro_home, dagster_home, tmp):
        folder.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}
    yield {**clean, "MAESTRO_HOME": str(maestro_home), "DAGSTER_HOME": str(dagster_home), "TMPDIR": str(tmp)}
    EmbeddedPostgres(maestro_home).stop()


def predictions_per_tenant(maestro_home) -> dict[str, int]:
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.settings import Settings

    location = locate_platform_database(Settings(home=Path(maestro_home), database_url=None))
    with engine_for(location.platform_url).connect() as conn:
        return dict(conn.execute(text(
            "SELECT t.name, count(p.*) FROM tenants t LEFT JOIN predictions p ON p.tenant_id = t.id GROUP BY t.name"
        )).all())


@pytest.mark.slow
@pytest.mark.timeout(RUN_DEADLINE_S + 300)
def test_train_and_deploy_for_three_tenants_launched_by_the_daemon(user_setup, tmp_path, monkeypatch):
    env = user_setup
    seeded = subprocess.run([sys.executable, "-c", SEED, *TENANTS], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert seeded.returncode == 0, seeded.stderr
    run_ids = [launch(env, "train_and_deploy", {"dagster/partition": tenant}) for tenant in TENANTS]

    started = time.monotonic()
    log = tmp_path / "daemon.log"
    daemon = start_daemon(env, log, cwd=env["MAESTRO_HOME"])
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        monkeypatch.setattr(test_production_instance, "RUN_DEADLINE_S", RUN_DEADLINE_S)
        runs = test_production_instance.wait_for(instance, run_ids, daemon, log)
    finally:
        test_production_instance.stop_daemon(daemon)
    print(f"three train_and_deploy runs through the daemon: {time.monotonic() - started:.0f} s")
    try:
        for tenant, run_id in zip(TENANTS, run_ids):
            run = runs[run_id]
            assert run.status == dg.DagsterRunStatus.SUCCESS, (tenant, failure_messages(instance, run_id))
            assert run.tags["dagster/partition"] == tenant
            events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event]
            # Queued, then started by the daemon; the multiprocess executor: a process per step.
            types = [e.event_type_value for e in events]
            assert types.index("PIPELINE_ENQUEUED") < types.index("PIPELINE_STARTING")
            assert "STEP_WORKER_STARTED" in types, types
            assert any(e.is_step_materialization and e.asset_key == dg.AssetKey("batch_predictions") for e in events)
    finally:
        instance.dispose()
    scored = predictions_per_tenant(env["MAESTRO_HOME"])
    assert all(scored.get(tenant, 0) > 0 for tenant in TENANTS), scored


def test_steps_opening_a_new_mlflow_database_together_all_succeed(user_setup, tmp_path):
    """The first trainings on a new install: each step process opens MLflow's database, which
    MLflow creates (its alembic migrations) on first use. Started together, they take turns."""
    env = user_setup
    opening = [subprocess.Popen([sys.executable, "-c", OPEN_MLFLOW], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.communicate(timeout=300), p.returncode) for p in opening]
    for (out, err), code in results:
        assert code == 0, err[-3000:]
    assert len({out.strip() for (out, _), _ in results}) == 1  # one experiment, found by all
