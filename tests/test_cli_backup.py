"""`maestro backup` as on-call runs it: the installed entry point in a subprocess, configured
only by MAESTRO_DATABASE_URL / MAESTRO_HOME and MAESTRO_STORE_URL, no Dagster instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.tenants import add_tenant

from .conftest import create_database, drop_database
from .services import free_port
from .test_cli import run_maestro


@pytest.fixture
def platform_with_mlflow(server):
    """A migrated platform database with two tenants, and its `<name>_mlflow` sibling."""
    name = create_database(server, "clibk")
    location = server.location(name)
    upgrade(location)
    with engine_for(location.platform_url).connect() as conn:
        add_tenant(conn, "acme", "Acme", {})
        add_tenant(conn, "globex", "Globex", {})
        conn.commit()
    mlflow = f"{name}_mlflow"
    with engine_for(server.admin_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f'CREATE DATABASE "{mlflow}"'))
    with engine_for(server.admin_url.set(database=mlflow)).connect() as conn:
        conn.execute(text("CREATE TABLE registered_models (name text PRIMARY KEY)"))
        conn.execute(text("INSERT INTO registered_models VALUES ('acme-churn'), ('globex-churn'), ('initech-churn')"))
        conn.commit()
    yield name
    drop_database(server, mlflow)
    drop_database(server, name)


def test_backup_run_list_verify_and_a_corrupted_dump(server, platform_with_mlflow, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    env = {"MAESTRO_DATABASE_URL": server.libpq_url(platform_with_mlflow), "MAESTRO_STORE_URL": store.as_uri(),
           "MAESTRO_HOME": str(tmp_path / "home")}

    run = run_maestro("backup", "run", "--json", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["verified"] is True and summary["problems"] == []
    assert set(summary["databases"]) == {"platform", "mlflow"}
    assert summary["databases"]["mlflow"]["rows"] == 3
    assert summary["databases"]["platform"]["rows"] >= 3  # two tenants + alembic_version
    if server.admin_url.password:
        assert str(server.admin_url.password) not in run.stdout + run.stderr
    backup_id = summary["id"]

    listed = run_maestro("backup", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == backup_id and entry["verified"] is True and entry["databases"] == ["platform", "mlflow"]
    table = run_maestro("backup", "list", env=env)
    assert backup_id in table.stdout and "yes" in table.stdout
    # Piped (no terminal), as into a file or `less`: nothing is cropped to 80 columns.
    assert "platform,mlflow" in table.stdout and "…" not in table.stdout, table.stdout

    assert run_maestro("backup", "verify", backup_id, env=env).returncode == 0

    dump = store / "backups" / backup_id / "mlflow.dump.zst"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    bad = run_maestro("backup", "verify", backup_id, env=env)
    assert bad.returncode == 1
    assert f"backups/{backup_id}/mlflow.dump.zst" in bad.stderr and "FAILED" in bad.stderr
    # The failed verification withdraws the earlier "verified": it no longer counts as good.
    [entry] = json.loads(run_maestro("backup", "list", "--json", env=env).stdout)
    assert entry["verified"] is False


def test_backup_on_the_embedded_default(tmp_path):
    """Nothing configured but MAESTRO_HOME: the embedded server, the store folder in the home."""
    env = {"MAESTRO_HOME": str(tmp_path)}
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    run = run_maestro("backup", "run", env=env)
    assert run.returncode == 0, run.stderr
    assert "verified" in run.stdout and "maestro" in run.stdout
    # MLflow has no database until a model is trained: the backup says so rather than failing.
    assert "maestro_mlflow' does not exist yet" in run.stderr
    [entry] = json.loads(run_maestro("backup", "list", "--json", env=env).stdout)
    assert entry["verified"] is True
    assert (tmp_path / "store" / "backups" / entry["id"] / "manifest.json").exists()


def test_backup_errors_are_one_line_without_secrets(tmp_path):
    port = free_port()  # nothing listens there
    env = {"MAESTRO_DATABASE_URL": f"postgresql://maestro:s3cret-pw@127.0.0.1:{port}/maestro",
           "MAESTRO_STORE_URL": (tmp_path / "store").as_uri()}
    (tmp_path / "store").mkdir()
    down = run_maestro("backup", "run", env=env)
    assert down.returncode == 1
    assert "MAESTRO_DATABASE_URL" in down.stderr and "nothing accepts connections" in down.stderr
    assert "s3cret-pw" not in down.stderr and "Traceback" not in down.stderr

    bad_store = run_maestro("backup", "list", env={"MAESTRO_STORE_URL": "s3://"})
    assert bad_store.returncode == 1 and "MAESTRO_STORE_URL" in bad_store.stderr

    missing = run_maestro("backup", "verify", "20260101T020000Z-abcdef", env={"MAESTRO_STORE_URL": (tmp_path / "store").as_uri()})
    assert missing.returncode == 1
    assert "no backup 20260101T020000Z-abcdef" in missing.stderr and "maestro backup list" in missing.stderr
