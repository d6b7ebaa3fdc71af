"""Maestro on a managed database: a role with only LOGIN and CREATEDB, what RDS, Cloud SQL or
Azure give an application (`CREATE ROLE app LOGIN CREATEDB PASSWORD '...'`), owning its
platform database on Debian's PostgreSQL 15. Every `maestro` command runs as the user runs
it (the installed entry point, in a subprocess, MAESTRO_DATABASE_URL with the password in
it) and must succeed without ever printing the password; the backup, restore and drill jobs
run in process through Dagster with the same role. MLflow's database `<db>_mlflow` is
created by the role itself (CREATEDB), as the MLflow resource does on first use.

What a managed server's administrator does that this role may not (create amcheck or
pg_stat_statements, hold a session open) is done here by the test server's superuser."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from maestro_pipelines.platform_db.admin import quote_ident
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.platform_db.migrate import head_revision
from tests.test_cli import run_maestro

pytestmark = pytest.mark.pg15

# Run in a subprocess with the user's environment: MLflow's database made by the role, as
# the MLflow resource makes it (embedded_tracking_uri), and one model aliased `production`.
MAKE_MLFLOW_REGISTRY = """
from mlflow.tracking import MlflowClient
from maestro_pipelines.resources.mlflow import embedded_tracking_uri
from maestro_pipelines.settings import load_settings

uri = embedded_tracking_uri(load_settings())
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
client.create_registered_model("maestro-acme")
version = client.create_model_version("maestro-acme", source="mlflow-artifacts:/0/0123abcd/artifacts/model")
client.set_registered_model_alias("maestro-acme", "production", version.version)
"""


@dataclass
class ManagedRole:
    server: object
    role: str
    password: str
    env: dict[str, str]
    home: Path
    store_dir: Path

    @property
    def database(self) -> str:
        return self.role

    @property
    def url(self) -> str:
        return self.env["MAESTRO_DATABASE_URL"]

    def maestro(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        result = run_maestro(*args, env=self.env)
        shown = result.stdout + result.stderr
        assert self.password not in shown, f"`maestro {' '.join(args)}` printed the password"
        assert result.returncode == expect, f"`maestro {' '.join(args)}` exited {result.returncode}: {shown[-3000:]}"
        assert "unexpected" not in result.stderr, result.stderr
        return result

    def admin(self, database: str = "postgres"):
        """A superuser session (the server's administrator), autocommit."""
        return psycopg_connect(self.server.admin_url.set(database=database), autocommit=True, source="test admin")

    def databases(self) -> set[str]:
        with self.admin() as conn:
            rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", [f"{self.role}%"]).fetchall()
        return {r[0] for r in rows}

    def owners(self) -> set[str]:
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE %s", [f"{self.role}%"]
            ).fetchall()
        return {r[0] for r in rows}

    def tenants(self, database: str | None = None) -> list[str]:
        with self.admin(database or self.database) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM tenants ORDER BY name").fetchall()]

    def make_mlflow_registry(self) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
        made = subprocess.run([sys.executable, "-c", MAKE_MLFLOW_REGISTRY], env={**clean, **self.env},
                              capture_output=True, text=True, timeout=180)
        assert made.returncode == 0, made.stderr[-3000:]


@pytest.fixture
def managed(pg15, tmp_path) -> Iterator[ManagedRole]:
    """A LOGIN CREATEDB role with a random password, owning an empty database of its name;
    the environment a user of a managed database sets (no MLFLOW_TRACKING_URI)."""
    role = f"app_{uuid.uuid4().hex[:10]}"
    password = secrets.token_hex(16)
    admin = psycopg_connect(pg15.admin_url, autocommit=True, source="test admin")
    with admin:
        admin.execute(f"CREATE ROLE {quote_ident(role)} LOGIN CREATEDB PASSWORD '{password}'")
        admin.execute(f"CREATE DATABASE {quote_ident(role)} OWNER {quote_ident(role)}")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    url = pg15.admin_url.set(drivername="postgresql", username=role, password=password, database=role)
    env = {
        "MAESTRO_DATABASE_URL": url.render_as_string(hide_password=False),
        "MAESTRO_STORE_URL": store_dir.as_uri(),
        "MAESTRO_HOME": str(tmp_path / "home"),
    }
    made = ManagedRole(pg15, role, password, env, tmp_path / "home", store_dir)
    try:
        yield made
    finally:
        from maestro_pipelines.platform_db.connection import dispose_engines

        dispose_engines()
        with made.admin() as conn:
            for name in sorted(made.databases()):
                conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")


def _this_month() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m")


def test_database_and_tenant_commands(managed):
    """`db upgrade` warns once that pg_stat_statements needs an administrator, `db status`
    works (it used to fail: "permission denied to examine shared_preload_libraries") and
    counts the rows of a fresh database exactly, tenants can be added and listed, `db
    downgrade` goes back to base."""
    upgraded = managed.maestro("db", "upgrade")
    assert f"upgraded {managed.database}: base -> {head_revision()}" in upgraded.stdout
    assert upgraded.stderr.count("pg_stat_statements could not be created") == 1, upgraded.stderr

    for name in ("acme", "globex"):
        assert f"added tenant {name}" in managed.maestro("tenants", "add", name).stdout
    listed = json.loads(managed.maestro("tenants", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["acme", "globex"]

    status = managed.maestro("db", "status")
    assert "pg_stat_statements  off" in status.stdout and "up to date" in status.stdout
    report = json.loads(managed.maestro("db", "status", "--json").stdout)
    tables = {t["table_name"]: t for t in report["tables"]}
    assert tables["tenants"]["rows"] == 2 and tables["tenants"]["rows_exact"] is True
    assert report["url"].count("***") == 1

    downgraded = managed.maestro("db", "downgrade", "base", "--confirm", managed.database)
    assert f"{head_revision()} -> base" in downgraded.stdout
    assert json.loads(managed.maestro("db", "status", "--json").stdout)["tables"] == []


def test_backup_restore_and_drill_commands(managed):
    """The whole backup and recovery path as the role: backups of the platform database and
    of MLflow's (which the role created), list, verify, archive, retention, a scratch
    restore, a live restore that brings back the backed-up tenants, cleanup, a drill."""
    managed.maestro("db", "upgrade")
    managed.maestro("tenants", "add", "acme")
    managed.make_mlflow_registry()
    assert managed.databases() == {managed.database, f"{managed.database}_mlflow"}

    backup = managed.maestro("backup", "run")
    assert "verified" in backup.stdout
    (entry,) = json.loads(managed.maestro("backup", "list", "--json").stdout)
    assert entry["verified"] is True and entry["databases"] == ["platform", "mlflow"]
    managed.maestro("backup", "verify", "newest")
    assert "archived" in managed.maestro("backup", "archive", "--month", _this_month()).stdout
    managed.maestro("backup", "retention", "--dry-run")
    assert "deleted 0" in managed.maestro("backup", "retention").stdout  # the daily backup and its archive

    scratch = json.loads(managed.maestro("restore", "--json").stdout)
    assert scratch["ok"] and {d["role"] for d in scratch["databases"]} == {"platform", "mlflow"}
    restored = {d["role"]: d["restored_as"] for d in scratch["databases"]}
    assert managed.tenants(restored["platform"]) == ["acme"]

    managed.maestro("tenants", "add", "after-the-backup")
    live = managed.maestro("restore", "--target", "live", "--confirm", managed.database)
    assert "swapped into place" in live.stdout
    assert managed.tenants() == ["acme"], "the live restore brings back the tenants of the backup"
    assert managed.owners() == {managed.role}, "every database, restored or kept aside, is the role's"

    managed.maestro("restore", "cleanup", "--confirm", managed.database)
    assert managed.databases() == {managed.database, f"{managed.database}_mlflow"}

    drill = managed.maestro("drill")
    assert "RTO" in drill.stdout and "1 production alias resolved" in drill.stdout
    assert managed.databases() == {managed.database, f"{managed.database}_mlflow"}, "the drill left scratch databases"
    stored = [path for path in managed.store_dir.rglob("*") if path.is_file()]
    assert stored and not [path for path in stored if managed.password.encode() in path.read_bytes()]


def test_an_administrators_session_is_named_not_a_permission_error(managed):
    """A session of another role (here the administrator's psql) on a database Maestro must
    rename or drop: the role may not end it. The live restore stops with one line naming it
    and leaves the live database as it was; cleanup drops every other leftover, names the one
    it kept (it used to fail with "permission denied to terminate process"), and drops it
    once the session is gone. The role's own sessions it still ends."""
    managed.maestro("db", "upgrade")
    managed.maestro("tenants", "add", "acme")
    managed.maestro("backup", "run")
    managed.maestro("tenants", "add", "after-the-backup")
    scratch = json.loads(managed.maestro("restore", "--json").stdout)
    (leftover,) = [d["restored_as"] for d in scratch["databases"]]

    administrator = managed.admin(managed.database)
    with administrator:
        refused = managed.maestro("restore", "--target", "live", "--confirm", managed.database, expect=1)
        assert f"held open by 1 session of {managed.server.admin_url.username}" in refused.stderr, refused.stderr
        assert managed.tenants() == ["acme", "after-the-backup"], "the live database must be left as it was"

    # A monitoring agent's role (LOGIN only) connected to a scratch restore, and a forgotten
    # session of Maestro's own role: cleanup ends the latter, may not end the former.
    monitor, monitor_password = f"{managed.role}_monitor", secrets.token_hex(8)
    with managed.admin() as conn:
        conn.execute(f"CREATE ROLE {quote_ident(monitor)} LOGIN PASSWORD '{monitor_password}'")
    try:
        connect_as = managed.server.admin_url.set(database=leftover)
        own_session = psycopg_connect(connect_as.set(username=managed.role, password=managed.password), source="role")
        held = psycopg_connect(connect_as.set(username=monitor, password=monitor_password), source="monitor")
        try:
            kept = managed.maestro("restore", "cleanup", expect=1)
            assert f"'{leftover}'" in kept.stderr and f"1 session of {monitor}," in kept.stderr, kept.stderr
            assert managed.databases() == {managed.database, leftover}, "the other leftovers are dropped"
        finally:
            held.close()
            own_session.close()
        managed.maestro("restore", "cleanup")
        assert managed.databases() == {managed.database}
    finally:
        with managed.admin() as conn:
            conn.execute(f"DROP ROLE IF EXISTS {quote_ident(monitor)}")


def test_extensions_an_administrator_created(managed):
    """An administrator created pg_stat_statements and amcheck (granting bt_index_check) in
    the role's database. `db upgrade` and `db status` work (they read a setting only a
    superuser may read), a backup holds the extensions, and a drill restores it as the role,
    which may not create them: one note says the indexes were not checked and how an
    administrator allows it, and the drill passes."""
    with managed.admin(managed.database) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE EXTENSION amcheck")
        conn.execute(f"GRANT EXECUTE ON FUNCTION bt_index_check(regclass) TO {quote_ident(managed.role)}")
    managed.maestro("db", "upgrade")
    managed.maestro("tenants", "add", "acme")
    status = managed.maestro("db", "status")
    assert "pg_stat_statements  created but not in shared_preload_libraries" in status.stdout

    managed.maestro("backup", "run")
    drill = managed.maestro("drill")
    assert drill.stderr.count("btree indexes not checked") == 1, drill.stderr
    assert managed.databases() == {managed.database}


def test_backup_restore_and_drill_jobs(managed, tmp_path):
    """nightly_backup, restore_database (scratch), dr_drill_job and restore_cleanup_job in
    process through Dagster, every resource configured with the role's URL. While the
    administrator has a scratch database open, the cleanup job drops the other one and fails
    naming the session (it used to fail on "must be a superuser to terminate superuser
    process" and drop nothing after it); once the session is gone it drops that one too."""
    import dagster as dg

    from maestro_pipelines.definitions import defs
    from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase

    managed.maestro("db", "upgrade")
    managed.maestro("tenants", "add", "acme")
    managed.make_mlflow_registry()
    resources = {
        "platform_db": PlatformDatabase(database_url=managed.url, home=str(managed.home)),
        "mlflow": MLflowRegistry(database_url=managed.url, home=str(managed.home)),
        "store": ObjectStoreResource(url=managed.store_dir.as_uri()),
        "alerts": AlertResource(),
    }
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        def run(job: str, op: str | None = None, config: dict | None = None, partition_key: str | None = None,
                succeeds: bool = True) -> list[str]:
            result = defs.resolve_job_def(job).execute_in_process(
                instance=instance, resources=resources, partition_key=partition_key, raise_on_error=False,
                run_config={"ops": {op: {"config": config or {}}}} if op else {},
            )
            failures = [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            assert result.success is succeeds, failures
            assert not any(managed.password in m for m in failures)
            return failures

        run("nightly_backup")
        run("restore_database", "restore_from_backup")
        live = {managed.database, f"{managed.database}_mlflow"}
        scratch = sorted(managed.databases() - live)
        assert len(scratch) == 2, "the scratch restore sits beside the live databases"
        run("dr_drill_job", "dr_drill")
        assert managed.databases() == live | set(scratch), "the drill dropped its own scratch databases only"

        held = managed.admin(scratch[0])
        try:
            (failure,) = run("restore_cleanup_job", "drop_restore_leftovers", {"dry_run": False}, succeeds=False)
            assert f"'{scratch[0]}'" in failure and f"1 session of {managed.server.admin_url.username}" in failure
            assert managed.databases() == live | {scratch[0]}, "the other scratch database is dropped"
        finally:
            held.close()
        run("restore_cleanup_job", "drop_restore_leftovers", {"dry_run": False})
        assert managed.databases() == live
        for past in instance.get_runs():
            assert not any(managed.password in e.user_message for e in instance.all_logs(past.run_id))
