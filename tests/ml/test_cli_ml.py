"""`maestro tenants` and `maestro demo` as a user runs them (installed entry point)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from ..conftest import create_database, drop_database
from ..test_cli import run_maestro


def test_tenants_add_and_list(pg18):
    name = create_database(pg18, "tenants")
    env = {"MAESTRO_DATABASE_URL": pg18.libpq_url(name)}
    try:
        bad = run_maestro("tenants", "add", "Bad Name", env=env)
        assert bad.returncode == 1 and "'Bad Name' is not a valid tenant name" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1

        added = run_maestro("tenants", "add", "acme", "--display-name", "Acme", "--min-accuracy", "0.9", env=env)
        assert added.returncode == 0, added.stderr
        again = run_maestro("tenants", "add", "acme", env=env)
        assert again.returncode == 1 and "tenant 'acme' already exists" in again.stderr

        listed = json.loads(run_maestro("tenants", "list", "--json", env=env).stdout)
        assert [(t["name"], t["display_name"], t["status"]) for t in listed] == [("acme", "Acme", "active")]
        assert listed[0]["gates"]["accuracy"] == 0.9 and listed[0]["gates"]["f1"] == 0.65
    finally:
        drop_database(pg18, name)


def test_demo_on_the_embedded_default_trains_every_tenant(tmp_path):
    """The README's first command, end to end: nothing configured but MAESTRO_HOME. It trains
    every tenant, then runs the platform upkeep so Dagit shows the statistics and summary.
    A first run prints nothing a user cannot act on: no Dagster telemetry banner or beta
    warning, no MLflow INFO lines, no psycopg "error ignored terminating <psycopg.Pipeline>"
    (MLflow swallowing a duplicate-key error on its metrics, which the server's log shows)."""
    home = tmp_path / "home"
    result = run_maestro("demo", "--tenants", "acme,globex", env={"MAESTRO_HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr
    for noise in ("error ignored terminating", "Telemetry", "usage statistics", "Warning:", "INFO mlflow"):
        assert noise not in result.stdout + result.stderr, result.stderr
    # stderr holds the progress bar only
    assert all("━" in line for line in result.stderr.splitlines() if line.strip()), result.stderr
    assert 'unique constraint "metric_pk"' not in (home / "pgdata" / "log").read_text()
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
    for tenant, predictions in (("acme", "569"), ("globex", "178")):
        cells = [c.strip() for c in rows[tenant].split("│")[1:-1]]
        assert cells[1] == "1", cells  # production version
        assert float(cells[2]) > 0.8 and cells[5] == "pass" and cells[6] == predictions
    # The command to open the UI works as printed, venv activated or not: the program is the
    # virtualenv's own dagster (the run's working folder is this one).
    [ui_command] = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("DAGSTER_HOME=")]
    assert ui_command[0] == f"DAGSTER_HOME={home / 'dagster'}" and ui_command[2] == "dev", ui_command
    assert Path(ui_command[1]).name == "dagster" and (Path.cwd() / ui_command[1]).is_file(), ui_command

    # The runs are in the persistent instance that `dagster dev` will open.
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        runs = instance.get_runs()
        # __ASSET_JOB: the schema asset, materialized as the UI's Materialize button does, so the
        # graph's root is not "never materialized" after a demo.
        assert sorted(r.job_name for r in runs) == ["__ASSET_JOB", "platform_upkeep", "train_and_deploy", "train_and_deploy"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert instance.get_latest_materialization_event(dg.AssetKey("platform_schema")) is not None
        assert sorted(instance.get_dynamic_partitions("tenants")) == ["acme", "globex"]

        # What the admin opens in Dagit: statistics tables, the summary chart, slow queries.
        def latest(asset: str) -> dict:
            return instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata

        usage = {r.data["tenant_name"]: r.data["predictions"] for r in latest("tenant_usage_statistics")["rows"].value.records}
        assert usage == {"acme": 569, "globex": 178}
        assert len(latest("model_statistics")["rows"].value.records) == 2
        assert "data:image/png;base64," in latest("platform_summary")["chart"].value
        assert latest("slow_queries")["available"].value is True


def test_mlflow_ui_serves_the_embedded_defaults_experiments(tmp_path):
    """The README's `maestro mlflow ui` on the embedded default: MLflow's own UI and API answer
    on the port given, with the tenant's experiment and registered model; the backend's URI is
    in no process's arguments; SIGTERM stops the server with the command."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    import psutil

    from maestro_pipelines.ml.registry import ModelRegistry, registry_name
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
    from maestro_pipelines.resources.mlflow import embedded_tracking_uri
    from maestro_pipelines.settings import Settings

    from ..services import free_port, wait_for_port
    from ..test_cli import MAESTRO

    home = tmp_path / "home"
    settings = Settings(home=home, database_url=None)
    tracking_uri = embedded_tracking_uri(settings)  # what a training on the embedded default writes to
    registry = ModelRegistry(tracking_uri, (tmp_path / "artifacts").as_uri())
    experiment_id = registry.experiment_id("acme")
    registry.client.create_registered_model(registry_name("acme"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen([MAESTRO, "mlflow", "ui", "--port", str(port)], env={**env, "MAESTRO_HOME": str(home)},
                          cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, ui, tmp_path / "ui.log", deadline_s=90)

        def get(path: str) -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                return json.loads(response.read())

        experiments = get("/api/2.0/mlflow/experiments/search?max_results=100")["experiments"]
        assert {e["name"]: e["experiment_id"] for e in experiments}[registry_name("acme")] == experiment_id
        assert get(f"/api/2.0/mlflow/registered-models/get?name={registry_name('acme')}")["registered_model"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert b"<title>MLflow" in page.read()
        for process in [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]:
            assert not any("postgresql" in arg for arg in process.cmdline()), process.cmdline()
        printed = (tmp_path / "ui.log").read_text()
        assert f"http://127.0.0.1:{port}" in printed and "MAESTRO_MLFLOW_UI_URL" in printed
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
        log.close()
        EmbeddedPostgres(home).stop()
    deadline = time.monotonic() + 30
    while True:  # the server went with the command
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        except OSError:
            break
        assert time.monotonic() < deadline, "the MLflow server outlived `maestro mlflow ui`"
        time.sleep(0.2)


def test_mlflow_ui_says_what_to_do_when_there_is_nothing_to_serve(pg18, tmp_path):
    """Before any training there is no MLflow database to read; with an MLflow server
    configured, its own UI is the one to open. Each case: one line, exit 1."""
    name = create_database(pg18, "noui")
    try:
        fresh = run_maestro("mlflow", "ui", env={"MAESTRO_DATABASE_URL": pg18.libpq_url(name)})
    finally:
        drop_database(pg18, name)
    assert fresh.returncode == 1, fresh.stdout + fresh.stderr
    assert fresh.stderr.strip() == (f"error: MLflow's database '{name}_mlflow' does not exist yet: no model was "
                                    "trained. Train one first (`maestro demo`, or materialize the `ml` group in Dagster)")
    server = run_maestro("mlflow", "ui", env={"MAESTRO_HOME": str(tmp_path / "home"),
                                             "MLFLOW_TRACKING_URI": "https://mlflow.internal"})
    assert server.returncode == 1 and len(server.stderr.strip().splitlines()) == 1, server.stderr
    assert "MLFLOW_TRACKING_URI is an MLflow server" in server.stderr and "MAESTRO_MLFLOW_UI_URL" in server.stderr
