"""A self-hosted server archiving with `archive_command = '<maestro> wal push %p'`, set up the
way docs/configuration.md tells a DBA to: Debian's PostgreSQL 15 (its own small cluster,
run as the `postgres` OS user), a Maestro that user can run (a venv made with
/usr/bin/python3 outside root's home: MAESTRO_TEST_WAL_LAUNCHER is its bin folder, which
scripts/test provides) and MAESTRO_STORE_URL in the server's environment, not in the
command. Its segments reach the store; when a push is refused, PostgreSQL keeps the segment,
retries, and `archiver_status` / `maestro wal status` say archiving is failing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.wal import archiver_status, push_wal
from maestro_pipelines.storage.local import LocalObjectStore
from tests.pitr.conftest import archived_names, maestro, switch_wal, synthetic_segment, system_id, wait_for
from tests.services import free_port, missing_service

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
LAUNCHER_VARIABLE = "MAESTRO_TEST_WAL_LAUNCHER"

# One worker for the module: its tests share one server (module fixture), started once.
pytestmark = pytest.mark.xdist_group("pitr-pg15")


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _launcher() -> Path:
    folder = os.environ.get(LAUNCHER_VARIABLE)
    if not folder:
        if os.environ.get("CI"):
            pytest.fail(f"{LAUNCHER_VARIABLE} is not set: scripts/test should have built the launcher venv")
        pytest.skip(f"{LAUNCHER_VARIABLE} not set (the bin folder of a Maestro venv the postgres user can run)")
    maestro = Path(folder) / "maestro"
    if not maestro.exists():
        pytest.fail(f"{LAUNCHER_VARIABLE}={folder} has no maestro program")
    return maestro


@dataclass
class SelfHosted:
    folder: Path
    port: int

    @property
    def conninfo(self) -> str:
        return f"host={self.folder} port={self.port} user=postgres dbname=postgres"

    @property
    def url(self) -> URL:
        return URL.create("postgresql+psycopg", username="postgres", database="postgres", port=self.port,
                          query={"host": str(self.folder)})

    @property
    def store(self) -> LocalObjectStore:
        return LocalObjectStore(self.folder / "store")

    @property
    def env(self) -> dict[str, str]:
        """A user's shell pointed at this server and its store."""
        return {"MAESTRO_DATABASE_URL": f"postgresql://postgres@:{self.port}/postgres?host={self.folder}",
                "MAESTRO_STORE_URL": (self.folder / "store").as_uri(), "MAESTRO_HOME": str(self.folder / "home")}


@pytest.fixture(scope="module")
def self_hosted() -> Iterator[SelfHosted]:
    launcher = _launcher()
    if not (PG15_BIN / "initdb").exists():
        missing_service("PostgreSQL 15", "apt-get install postgresql-15")
    folder = Path(tempfile.mkdtemp(prefix="maestro-wal-pg15-"))
    folder.chmod(0o755)
    (folder / "store").mkdir()
    if os.geteuid() == 0:
        for path in (folder, folder / "store"):
            shutil.chown(path, "postgres")
    data = folder / "data"
    subprocess.run(_as_postgres([str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
                   check=True, capture_output=True, timeout=120)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"wal_level = replica\narchive_mode = on\narchive_timeout = 60\nfsync = off\n"
                   f"archive_command = '{launcher} wal push %p'\n")
    port = free_port()
    pg_ctl = [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    # The store's URL (and in production its credentials) is the server's environment.
    server_env = ["env", f"MAESTRO_STORE_URL={(folder / 'store').as_uri()}"]
    subprocess.run(_as_postgres([*server_env, *pg_ctl, "-l", str(folder / "log"), "start",
                                 "-o", f"-p {port} -k {folder} -c listen_addresses=''"]),
                   check=True, capture_output=True, timeout=90)
    try:
        yield SelfHosted(folder, port)
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True, timeout=90)
        shutil.rmtree(folder, ignore_errors=True)


def test_pg15_archives_each_segment_into_the_store_through_maestro_wal_push(self_hosted):
    sysid = system_id(self_hosted.conninfo)
    segment = switch_wal(self_hosted.conninfo)
    wait_for(f"{segment} in the store", lambda: segment in archived_names(self_hosted.store, sysid))

    # PostgreSQL counts the segment archived once archive_command has exited: just after.
    status = wait_for("the archiver's count of it", lambda: (s := archiver_status(self_hosted.url, "test server"))
                      .archived_count > 0 and s)
    assert status.archiving and status.problem is None, status.problem
    assert status.last_archived_wal >= segment and status.failed_count == 0
    assert status.summarize_wal is None  # PostgreSQL 15: full base backups only
    shown = json.loads(maestro("wal", "status", "--json", env=self_hosted.env))
    assert shown["newest_in_store"] >= segment and shown["archiving"] is True


def test_a_refused_push_keeps_the_segment_on_the_server_and_status_says_archiving_fails(self_hosted, tmp_path):
    """Another server's file already stored under the name of the next segment (two servers,
    one store, one system identifier: a cloned VM): the push is refused every time, the
    stored file stays, and the status names the failing segment."""
    sysid = system_id(self_hosted.conninfo)
    with psycopg.connect(self_hosted.conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_marker (at timestamptz, note text)")
        conn.execute("INSERT INTO wal_marker VALUES (now(), 'into the segment being written')")
        current = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
    impostor = synthetic_segment(tmp_path, name=current, system_id=int(sysid))
    assert push_wal(self_hosted.store, impostor) == "archived"
    stored = self_hosted.store.head(layout.wal_key(sysid, current))

    assert switch_wal(self_hosted.conninfo) == current
    failing = wait_for("a failed archive_command", lambda: (s := archiver_status(self_hosted.url, "test server"))
                       .failed_count > 0 and s)
    assert not failing.archiving and failing.last_failed_wal == current
    assert "archiving is failing on" in failing.problem and current in failing.problem
    assert self_hosted.store.head(layout.wal_key(sysid, current)).sha256 == stored.sha256
    assert (self_hosted.folder / "data" / "pg_wal" / current).exists()  # kept for the retries
    conflicts = list(self_hosted.store.list(f"pitr/{sysid}/{layout.CONFLICTS_FOLDER}/{current}-"))
    assert conflicts, "the refusal is recorded in the store"
    text = maestro("wal", "status", env=self_hosted.env)
    assert "archiving: on" not in text
