"""The `maestro` command as a user runs it: the installed entry point, in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
from maestro_pipelines.platform_db.migrate import head_revision

from .conftest import create_database, drop_database

MAESTRO = str(Path(sys.executable).with_name("maestro"))


def run_maestro(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # MLflow exports MLFLOW_TRACKING_URI into os.environ when an in-process test sets it: a
    # user's shell would not have it, nor the other tests' MAESTRO_* settings, nor the
    # COLUMNS a pytest-xdist worker carries (a shell does not export it).
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MAESTRO_", "MLFLOW_")) and k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [MAESTRO, *args], env={**clean, **(env or {})}, capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def external_database(server):
    """A database on a test server, addressed the way a user sets MAESTRO_DATABASE_URL."""
    name = create_database(server, "cli")
    yield {"MAESTRO_DATABASE_URL": server.libpq_url(name)}, name
    drop_database(server, name)


def test_upgrade_then_status_on_an_external_server(external_database, server):
    env, name = external_database
    upgraded = run_maestro("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded {name}: base -> {head_revision()}" in upgraded.stdout

    status = run_maestro("db", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["current_revision"] == head_revision() and report["up_to_date"] is True
    assert report["server_version"].startswith(str(server.major_version))
    assert "MAESTRO_DATABASE_URL" in report["where"]
    tables = {t["table_name"]: t for t in report["tables"]}
    assert tables["predictions"]["partitions"] == 4
    assert {"tenants", "models", "experiments", "deployments", "model_statistics"} <= tables.keys()

    again = run_maestro("db", "upgrade", env=env)
    assert f"{name} is already at {head_revision()}" in again.stdout


def test_status_counts_the_rows_of_a_fresh_database_exactly(external_database):
    """A fresh database has no statistics yet (reltuples -1 on PostgreSQL 14+): `db status`
    used to show 0 rows (estimate) for every table. Small tables are counted, and the table
    says which counts are exact."""
    env, _name = external_database
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    for tenant in ("acme", "globex", "initech"):
        assert run_maestro("tenants", "add", tenant, env=env).returncode == 0
    report = json.loads(run_maestro("db", "status", "--json", env=env).stdout)
    tables = {t["table_name"]: t for t in report["tables"]}
    assert (tables["tenants"]["rows"], tables["tenants"]["rows_exact"]) == (3, True)
    assert all(t["rows_exact"] and t["rows"] == 0 for name, t in tables.items() if name != "tenants")
    shown = run_maestro("db", "status", env=env)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("│ tenants "))
    assert [cell.strip() for cell in row.split("│")[2:4]] == ["3", "exact"]


def test_embedded_default_with_nothing_configured(tmp_path):
    home = tmp_path / "home"
    env = {"MAESTRO_HOME": str(home)}
    upgraded = run_maestro("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "created database maestro" in upgraded.stdout

    status = run_maestro("db", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"embedded PostgreSQL, data in {home / 'pgdata'}" in status.stdout
    assert "PostgreSQL 18" in status.stdout and "up to date" in status.stdout
    assert "pg_stat_statements  on (version" in status.stdout
    # The last process that used the server stopped it on exit: nothing is left running.
    assert not EmbeddedPostgres(home).is_running()


def test_db_start_keeps_the_embedded_server_until_stop(tmp_path):
    env = {"MAESTRO_HOME": str(tmp_path)}
    embedded = EmbeddedPostgres(tmp_path)
    try:
        started = run_maestro("db", "start", env=env)
        assert started.returncode == 0, started.stderr
        assert embedded.is_running(), "db start must leave the server running after it exits"
        assert run_maestro("db", "upgrade", env=env).returncode == 0
        assert embedded.is_running(), "a later command must not stop a server started with db start"
        stopped = run_maestro("db", "stop", env=env)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert not embedded.is_running()
    finally:
        embedded.stop()


def test_downgrade_needs_the_database_name_to_confirm(external_database):
    env, name = external_database
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    refused = run_maestro("db", "downgrade", "base", env=env)
    assert refused.returncode == 1 and f"--confirm {name}" in refused.stderr
    done = run_maestro("db", "downgrade", "base", "--confirm", name, env=env)
    assert done.returncode == 0, done.stderr
    assert f"{head_revision()} -> base" in done.stdout
    status = json.loads(run_maestro("db", "status", "--json", env=env).stdout)
    assert status["current_revision"] is None and status["tables"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_postgres_port():
    """A TCP server on loopback that answers like an HTTP server, not like PostgreSQL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


SECRET = "hunter2-do-not-print"


def _assert_one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "MAESTRO_DATABASE_URL" in lines[0]
    assert expected in lines[0], lines[0]
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "make_url, expected",
    [
        (lambda port: f"postgresql://maestro:{SECRET}@no-such-host.invalid:5432/maestro", "cannot be resolved"),
        (lambda port: f"postgresql://maestro:{SECRET}@127.0.0.1:{_free_port()}/maestro", "nothing accepts connections"),
        (lambda port: f"postgresql://maestro:{SECRET}@127.0.0.1:{port}/maestro", "did not answer as PostgreSQL"),
        (lambda port: f"mysql://maestro:{SECRET}@127.0.0.1:3306/maestro", "not PostgreSQL"),
        (lambda port: f"postgresql://maestro:{SECRET}@127.0.0.1:5432", "names no database"),
        (lambda port: f"::{SECRET}", "not a valid database URL"),
        (lambda port: f"postgresql://maestro:{SECRET}@127.0.0.1:port/maestro", "not a valid database URL"),
    ],
    ids=["wrong-host", "nothing-listening", "not-postgres", "mysql-scheme", "no-database", "malformed", "bad-port"],
)
@pytest.mark.parametrize("command", [["db", "status"], ["db", "upgrade"]])
def test_bad_database_url_gives_one_clear_line(not_postgres_port, make_url, expected, command):
    result = run_maestro(*command, env={"MAESTRO_DATABASE_URL": make_url(not_postgres_port)})
    _assert_one_clear_line(result, expected)


def test_wrong_password_gives_one_clear_line(pg15):
    """Needs password authentication, which Debian's PostgreSQL 15 here uses over TCP."""
    url = pg15.admin_url.set(drivername="postgresql", password=SECRET).render_as_string(hide_password=False)
    result = run_maestro("db", "status", env={"MAESTRO_DATABASE_URL": url})
    _assert_one_clear_line(result, "password authentication failed for user 'postgres'")


def test_help_reads_well():
    result = run_maestro("db", "--help")
    assert result.returncode == 0
    for command in ("upgrade", "downgrade", "status", "start", "stop"):
        assert command in result.stdout
