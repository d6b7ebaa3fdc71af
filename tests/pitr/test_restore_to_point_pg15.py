"""A restore to a point from Debian's PostgreSQL 15 (full base backups only): the temporary
server must be PostgreSQL 15's own `postgres` (recovery needs the same major version), the
delivery pg_dump 18 -> pg_restore into the 15 server. A small cluster of the test's own,
run as the `postgres` OS user, its superuser `dba` (initdb -U dba, as some installations
name it), archiving into a spool the test pushes from (`push_wal`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from maestro_pipelines.backup.pitr.base import take_base_backup
from maestro_pipelines.backup.pitr.wal import push_wal
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.storage import open_store
from tests.services import free_port, missing_service
from tests.test_cli import run_maestro

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
APP = "pitr15"
SUPERUSER = "dba"
"""Not `postgres`: the temporary server is then reached as the live URL's user."""


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def pg15_history():
    if not (PG15_BIN / "postgres").exists():
        missing_service("PostgreSQL 15", "apt-get install postgresql-15")
    folder = Path(tempfile.mkdtemp(prefix="maestro-pitr-pg15-"))
    folder.chmod(0o755)
    spool, data, sockets, port = folder / "spool", folder / "data", folder / "sockets", free_port()
    for owned in (spool, data, sockets):
        owned.mkdir(mode=0o755)
        if os.geteuid() == 0:
            shutil.chown(owned, "postgres")
    subprocess.run(_as_postgres([str(PG15_BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust"]),
                   check=True, capture_output=True, timeout=120)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"wal_level = replica\narchive_mode = on\nfsync = off\n"
                   f"archive_command = 'cp %p {spool}/.%f.tmp && mv {spool}/.%f.tmp {spool}/%f'\n")
    pg_ctl = [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    subprocess.run(_as_postgres([*pg_ctl, "-l", str(sockets / "log"), "start", "-o", f"-p {port} -k {sockets} -c listen_addresses=''"]),
                   check=True, capture_output=True, timeout=90)
    (folder / "store").mkdir()
    store = open_store((folder / "store").as_uri())
    url = URL.create("postgresql+psycopg", username=SUPERUSER, database="postgres", port=port, query={"host": str(sockets)})

    def sql(database: str, statement: str):
        with psycopg.connect(host=str(sockets), port=port, user=SUPERUSER, dbname=database, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else None

    def archive() -> None:
        sql("postgres", "SELECT pg_logical_emit_message(false, 'maestro-test', 'switch')")
        [(switched,)] = sql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while sql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")[0][0] < switched:
            assert time.monotonic() < deadline, f"{switched} not archived"
            time.sleep(0.05)
        system_id = str(sql("postgres", "SELECT system_identifier FROM pg_control_system()")[0][0])
        for path in sorted(spool.iterdir()):
            if layout.is_wal_name(path.name):
                push_wal(store, path, system_id)
                path.unlink()

    try:
        sql("postgres", f"CREATE DATABASE {APP}")
        sql("postgres", f"CREATE DATABASE {APP}_mlflow")  # MLflow's database: restored without migrations
        sql(f"{APP}_mlflow", "CREATE TABLE markers (id serial PRIMARY KEY, label text NOT NULL)")
        take_base_backup(store, DatabaseTarget("platform", url, "test pg15"), kind="full")
        sql(f"{APP}_mlflow", "INSERT INTO markers (label) VALUES ('t1')")
        [(between,)] = sql("postgres", "SELECT clock_timestamp()")
        sql(f"{APP}_mlflow", "INSERT INTO markers (label) VALUES ('t2')")
        archive()
        env = {"MAESTRO_DATABASE_URL": f"postgresql://{SUPERUSER}@:{port}/{APP}?host={sockets}",
               "MAESTRO_STORE_URL": (folder / "store").as_uri(), "MAESTRO_HOME": str(folder / "home"),
               "TMPDIR": str(folder)}
        yield {"sql": sql, "between": between, "env": env}
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True, timeout=90)
        shutil.rmtree(folder, ignore_errors=True)


def test_pg15_restores_to_a_time_with_its_own_server_programs(pg15_history):
    done = run_maestro("restore", "--databases", "mlflow", "--to-time", pg15_history["between"].isoformat(), "--json",
                       env=pg15_history["env"])
    assert done.returncode == 0, done.stderr
    [database] = json.loads(done.stdout)["databases"]
    sql = pg15_history["sql"]
    assert [row[0] for row in sql(database["restored_as"], "SELECT label FROM markers ORDER BY id")] == ["t1"]
    assert [row[0] for row in sql(f"{APP}_mlflow", "SELECT label FROM markers ORDER BY id")] == ["t1", "t2"]
