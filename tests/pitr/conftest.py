"""Servers that archive their WAL, for the physical tier's tests (nothing here is a mock).

- `archiving_home`: the embedded PostgreSQL 18 as a user runs it, `maestro db start` with
  MAESTRO_HOME alone: it archives through the spool and the pusher into MAESTRO_HOME/store.
- `switch_wal(url)`: write a row, `pg_switch_wal()`, return the segment it closed.
- `synthetic_segment(...)`: a WAL segment file with a real long page header and random
  (incompressible) bytes after it, as big as wanted: what a kill mid-upload needs.

The session's shared `pg18` server does not archive (MAESTRO_WAL_ARCHIVING=off's setting,
tests/conftest.py): each test's CREATE DATABASE would add half a segment to archive.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from maestro_pipelines.storage.local import LocalObjectStore
from tests.test_cli import MAESTRO, run_maestro

DEADLINE_S = 90
"""A switched segment reaches the store within seconds (the archiver, then the pusher's 1 s
poll); under a CPU hog both may wait much longer."""


@dataclass
class ArchivingHome:
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MAESTRO_HOME": str(self.home)}

    @property
    def store(self) -> LocalObjectStore:
        return LocalObjectStore(self.home / "store", create=True)  # as the default store opens it

    @property
    def socket_url(self) -> str:
        socket_dir = (self.home / "pgdata" / "postmaster.pid").read_text().splitlines()[4]
        return f"host={socket_dir} user=postgres dbname=postgres"


def maestro(*args: str, env: dict[str, str]) -> str:
    done = run_maestro(*args, env=env)
    assert done.returncode == 0, f"maestro {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def archiving_home(tmp_path_factory) -> Iterator[ArchivingHome]:
    made = ArchivingHome(tmp_path_factory.mktemp("archiving") / "home")
    maestro("db", "start", env=made.env)
    try:
        yield made
    finally:
        run_maestro("db", "stop", env=made.env)


def system_id(conninfo: str) -> str:
    with psycopg.connect(conninfo) as conn:
        return str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])


def switch_wal(conninfo: str) -> str:
    """Write a row and close the segment holding it: the name of the segment to be archived."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_marker (at timestamptz, note text)")
        conn.execute("INSERT INTO wal_marker VALUES (now(), %s)", [uuid.uuid4().hex])
        return conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]


def wait_for(what: str, condition, deadline_s: float = DEADLINE_S, poll_s: float = 0.1):
    deadline = time.monotonic() + deadline_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {deadline_s} s")
        time.sleep(poll_s)
    return value


def archiver_knows(conninfo: str, segment: str) -> bool:
    """pg_stat_archiver counts `segment` archived (once archive_command has returned)."""
    with psycopg.connect(conninfo) as conn:
        last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
    return last is not None and last >= segment


def archived_names(store, sysid: str) -> set[str]:
    from maestro_pipelines.backup.pitr.wal import list_wal

    return {wal.name for wal in list_wal(store, sysid)}


SYNTHETIC_SYSTEM_ID = 7300000000000000001
XLOG_PAGE_MAGIC_18 = 0xD118
XLP_LONG_HEADER = 0x0002


def synthetic_segment(folder: Path, name: str = "000000010000000000000001", size: int = 16 * 1024 * 1024,
                      system_id: int = SYNTHETIC_SYSTEM_ID) -> Path:
    """A segment of `size` bytes (a power of two, as wal_segment_size is) named `name`: its
    long page header says where it starts and which server wrote it; the rest is random."""
    number = int(name[8:16], 16) * (0x100000000 // size) + int(name[16:24], 16)
    header = struct.pack("<HHIQI4xQII", XLOG_PAGE_MAGIC_18, XLP_LONG_HEADER, int(name[:8], 16), number * size, 0,
                         system_id, size, 8192)
    path = folder / name
    with open(path, "wb") as out:
        out.write(header)
        out.write(os.urandom(size - len(header)))
    return path


__all__ = ["MAESTRO", "ArchivingHome", "archived_names", "archiver_knows", "maestro", "switch_wal", "synthetic_segment", "system_id",
           "wait_for"]
