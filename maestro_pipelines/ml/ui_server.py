"""`maestro mlflow ui`: MLflow's own UI on the backend Maestro's trainings write to.

On the embedded default that backend is a database on the embedded PostgreSQL, reached through
a Unix socket whose folder only a running Maestro process knows (and which stops with the last
one). So the command attaches to the server, keeps it up while the UI runs, and starts `mlflow
server` with the backend's URI in its environment (MLFLOW_BACKEND_STORE_URI), never in its
arguments, where `ps` would show an external database's password.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.settings import Settings

BACKEND_VARIABLE = "MLFLOW_BACKEND_STORE_URI"


@dataclass(frozen=True)
class MLflowBackend:
    uri: str  # may hold a password: only ever passed in the environment
    where: str  # for people: no secret


def mlflow_backend(settings: Settings) -> MLflowBackend:
    """The database MLflow's UI should read: MLFLOW_TRACKING_URI's, or the default one beside
    the platform database (starting the embedded server if it is the embedded default)."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import connect

    tracking = settings.mlflow_tracking_uri
    if tracking and tracking.startswith(("http://", "https://")):
        raise MaestroError(
            "MLFLOW_TRACKING_URI is an MLflow server, which serves its own UI",
            "Open that address in a browser (and set MAESTRO_MLFLOW_UI_URL to it so Dagster links to it)",
        )
    if tracking:
        return MLflowBackend(tracking, "MLFLOW_TRACKING_URI")
    location = locate_platform_database(settings)
    name = location.mlflow_database
    with connect(location.admin_url, location.source) as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
    if not exists:
        raise MaestroError(
            f"MLflow's database '{name}' does not exist yet: no model was trained",
            "Train one first (`maestro demo`, or materialize the `ml` group in Dagster)",
        )
    url = location.url_for(name)
    return MLflowBackend(url.render_as_string(hide_password=False), f"database {name}, {location.where}")


def mlflow_server_command(host: str, port: int) -> list[str]:
    """`mlflow server` of this Python environment (one worker: it starts in seconds, not 20)."""
    program = Path(sys.executable).parent / "mlflow"
    launcher = [str(program)] if program.exists() else [sys.executable, "-m", "mlflow"]
    return [*launcher, "server", "--host", host, "--port", str(port), "--workers", "1"]


def serve_mlflow_ui(backend: MLflowBackend, host: str, port: int) -> int:
    """Run the MLflow UI in the foreground until it exits or this process is stopped; its exit code."""
    env = {**os.environ, BACKEND_VARIABLE: backend.uri}
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's own backend is the one above
    # Its GenAI job runner starts four more worker processes that browsing runs never needs.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Its own process group: on Ctrl-C or SIGTERM here, the server and its workers stop together.
    process = subprocess.Popen(mlflow_server_command(host, port), env=env, start_new_session=True)
    try:
        return process.wait()
    except BaseException:  # Ctrl-C, SIGTERM (the CLI raises it), anything: never leave it running
        _stop_group(process)
        raise


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
