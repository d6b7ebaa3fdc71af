"""The production Dagster instance, deploy/dagster.yaml, as a deployment runs it: storage on
PostgreSQL (the embedded server standing in for the production one), runs submitted to the
QueuedRunCoordinator with `dagster job launch`, started by a real `dagster-daemon`, executed
by the default run launcher in their own processes.

Then the worst night for the orchestrator: its database is backed up by `maestro backup run`,
dropped, and restored with `maestro restore`; a new instance on the same file sees the old
runs again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for

from .conftest import create_database, drop_database
from .test_cli import run_maestro

REPO_ROOT = Path(__file__).parent.parent
VENV_BIN = Path(sys.executable).parent
RUN_DEADLINE_S = 300


@pytest.fixture
def deployment(pg18, tmp_path):
    """DAGSTER_HOME holding deploy/dagster.yaml as it is, Dagster's database and the platform
    database on the server, a local object store, and the environment every process gets."""
    dagster_db = create_database(pg18, "dagster")
    platform_db = create_database(pg18, "platform")
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (tmp_path / "maestro_home").mkdir()
    (tmp_path / "store").mkdir()  # an explicit store folder must exist (a typo must not create one)
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(dagster_home),
        "MAESTRO_HOME": str(tmp_path / "maestro_home"),
        "MAESTRO_DATABASE_URL": pg18.libpq_url(platform_db),
        "MAESTRO_DAGSTER_DATABASE_URL": pg18.libpq_url(dagster_db),
        "MAESTRO_STORE_URL": (tmp_path / "store").as_uri(),
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}
    yield {**clean, **env}, dagster_db, platform_db
    for name in (f"{platform_db}_mlflow", platform_db, dagster_db):
        drop_database(pg18, name)


def instance_from(env: dict) -> dg.DagsterInstance:
    previous = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "MAESTRO_DAGSTER_DATABASE_URL")}
    os.environ.update({k: env[k] for k in previous})
    try:
        return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch(env: dict, job: str, tags: dict) -> str:
    run_id = str(uuid.uuid4())
    launched = subprocess.run(
        [str(VENV_BIN / "dagster"), "job", "launch", "-w", str(REPO_ROOT / "workspace.yaml"), "-j", job,
         "--run-id", run_id, "--tags", json.dumps(tags)],
        cwd=env["MAESTRO_HOME"], env=env, capture_output=True, text=True, timeout=180,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return run_id


def wait_for(instance: dg.DagsterInstance, run_ids: list[str], daemon: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + RUN_DEADLINE_S
    while True:
        runs = {run_id: instance.get_run_by_id(run_id) for run_id in run_ids}
        if all(run.is_finished for run in runs.values()):
            return runs
        if daemon.poll() is not None:
            pytest.fail(f"dagster-daemon exited ({daemon.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"runs not finished after {RUN_DEADLINE_S} s: "
                        f"{ {r: runs[r].status for r in runs} }\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Each failed step's error (the first lines), for the assertion message."""
    messages = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event else None
        while error is not None:  # step failures and retries, with their causes
            messages.append(f"{event.step_key}: {error.message.strip()[:1500]}")
            error = error.cause
    return messages


def test_runs_queue_start_and_record_in_postgres_then_come_back_after_a_restore(pg18, deployment, tmp_path):
    from maestro_pipelines.ml.demo import seed_demo_tenant

    env, dagster_db, platform_db = deployment
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    with engine_for(pg18.admin_url.set(database=platform_db)).begin() as conn:
        seed_demo_tenant(conn, "acme")
    assert run_maestro("tenants", "add", "acme", env=env).returncode == 0
    instance = instance_from(env)
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    instance.add_dynamic_partitions("tenants", ["acme"])

    backup_run = launch(env, "nightly_backup", {})
    training_run = launch(env, "train_and_deploy", {"dagster/partition": "acme"})
    queued = {r: instance.get_run_by_id(r).status for r in (backup_run, training_run)}
    assert set(queued.values()) <= {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                                    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED}
    assert instance.get_run_by_id(backup_run).tags["maestro/lane"] == "database"

    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")],
                                  cwd=env["MAESTRO_HOME"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        runs = wait_for(instance, [backup_run, training_run], daemon, log)
    finally:
        stop_daemon(daemon)
    for run_id, run in runs.items():
        assert run.status == dg.DagsterRunStatus.SUCCESS, (run.job_name, failure_messages(instance, run_id))
    # Each step ran in a process of its own: none fell back to MLflow's default store
    # (./mlflow.db in the working directory) for want of the process-wide tracking URI.
    assert not (Path(env["MAESTRO_HOME"]) / "mlflow.db").exists()
    # The runs went through the queue (enqueued, then started by the daemon) and their events are rows in
    # Dagster's PostgreSQL database.
    for run_id in runs:
        types = [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event]
        assert "PIPELINE_ENQUEUED" in types and types.index("PIPELINE_ENQUEUED") < types.index("PIPELINE_STARTING")
    with engine_for(pg18.admin_url.set(database=dagster_db)).connect() as conn:
        counted = dict(conn.execute(text(
            "SELECT run_id, count(*) FROM event_logs WHERE run_id = ANY(:ids) GROUP BY run_id"
        ), {"ids": list(runs)}).all())
    assert set(counted) == set(runs) and min(counted.values()) > 10
    materialized = instance.get_latest_materialization_event(dg.AssetKey("database_backup"))
    assert materialized.run_id == backup_run
    assert {"platform", "dagster"} <= set(materialized.asset_materialization.metadata["databases"].value.split(", "))
    # Its verification is the asset check `verified`, recorded in the same PostgreSQL event log.
    (verified,) = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("database_backup"), "verified"), limit=5
    )
    assert verified.run_id == backup_run and verified.status.value == "SUCCEEDED"
    instance.dispose()

    # Lost: Dagster's database. Back up (the CLI needs no Dagster), drop, restore, look again.
    backed_up = run_maestro("backup", "run", env=env)
    assert backed_up.returncode == 0, backed_up.stderr
    drop_database(pg18, dagster_db)
    restored = run_maestro("restore", "--databases", "dagster", "--target", "live", "--confirm", dagster_db, env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    again = instance_from(env)
    try:
        for run_id, job in ((backup_run, "nightly_backup"), (training_run, "train_and_deploy")):
            run = again.get_run_by_id(run_id)
            assert run is not None and run.job_name == job and run.status == dg.DagsterRunStatus.SUCCESS
        assert again.get_latest_materialization_event(dg.AssetKey("database_backup")).run_id == backup_run
        assert again.get_dynamic_partitions("tenants") == ["acme"]
    finally:
        again.dispose()
    cleanup = run_maestro("restore", "cleanup", env=env)
    assert cleanup.returncode == 0, cleanup.stderr


def start_daemon(env: dict[str, str], log: Path, cwd: str) -> subprocess.Popen:
    """`dagster-daemon run` on the repository's workspace.yaml, as a user starts it, in its own
    process group (stop_daemon stops it and its run workers); output into `log`."""
    with log.open("w") as out:
        return subprocess.Popen([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemon(daemon: subprocess.Popen) -> None:
    """SIGTERM the daemon's process group (it and its run workers); SIGKILL after a minute."""
    os.killpg(daemon.pid, signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
