"""Real servers and stores for the backup tests: nothing here is a mock.

- Databases: the embedded PostgreSQL 18 and Debian's PostgreSQL 15 (`server`, `pg18`,
  `pg15` from tests/conftest.py). `Databases` creates the databases and roles a test needs
  under names it chooses (MLflow's backend must be `<platform>_mlflow`) and drops them after.
- Stores: a local folder and S3 over real HTTP (moto), the same `Case` objects as the store
  tests, so an object can be changed behind the store's back the way bit rot, a truncated
  upload or an operator with a text editor would.
- `restore_dump`: pg_restore of a backup's dump into a new database, as a restore drill does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from maestro_pipelines.backup.consistency import table_checks
from maestro_pipelines.backup.manifest import TableCheck
from maestro_pipelines.backup.pgtools import CHECKSUM_SESSION_OPTIONS, libpq_environment, program
from maestro_pipelines.platform_db.admin import quote_ident
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.storage import ObjectStore
from tests.conftest import ServerUnderTest
from tests.stores.conftest import PREFIX, Case, LocalCase, S3Case

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = "mlflow-artifacts/"
BIG_ROWS = 160_000
"""Rows of `fill_big_table`: its dump is about 22 MB, past the 16 MiB at which a backup
first reports progress, so a test can act in the middle of a dump."""


# ---- stores -----------------------------------------------------------------------------------


def _case(kind: str, request, tmp_path: Path) -> Case:
    if kind == "local":
        return LocalCase(tmp_path / "store")
    return S3Case(request.getfixturevalue("moto_endpoint"))


@pytest.fixture(params=["local", "s3"])
def case(request, tmp_path) -> Iterator[Case]:
    """A fresh local folder or S3 bucket (`case.store`), with raw access behind it."""
    made = _case(request.param, request, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def local_case(tmp_path) -> Case:
    return LocalCase(tmp_path / "store")


def read_raw(case: Case, key: str) -> bytes:
    """The stored bytes, read past the store (no verification of any kind)."""
    if isinstance(case, LocalCase):
        return case.root.joinpath(*key.split("/")).read_bytes()
    return case.client.get_object(Bucket=case.bucket, Key=f"{PREFIX}/{key}")["Body"].read()


def replace_raw(case: Case, key: str, data: bytes) -> None:
    """Replace the stored bytes behind the store's back, keeping what the store recorded
    about the object (its sha256, size and metadata): corruption it did not write."""
    if isinstance(case, LocalCase):
        # Same file (inode), so the store's record of the object still applies to it.
        with open(case.root.joinpath(*key.split("/")), "r+b") as f:
            f.truncate(0)
            f.write(data)
        return
    name = f"{PREFIX}/{key}"
    metadata = case.client.head_object(Bucket=case.bucket, Key=name)["Metadata"]
    case.client.put_object(Bucket=case.bucket, Key=name, Body=data, Metadata=metadata)


def local_raw_files(case: LocalCase, under: str) -> list[str]:
    """Every file in the folder under `under`: objects, the store's records, temporary files."""
    root = case.root / under
    return sorted(p.relative_to(case.root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def store_spec(case: Case) -> dict:
    """How a child process opens the same store (see child.py)."""
    if isinstance(case, LocalCase):
        return {"kind": "local", "root": str(case.root)}
    return {"kind": "s3", "url": f"s3://{case.bucket}/{PREFIX}", "endpoint": case.endpoint}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return sorted(info.key for info in store.list(prefix, with_metadata=False))


# ---- databases --------------------------------------------------------------------------------


class Databases:
    """Databases and roles on one server, created under chosen names and dropped afterwards."""

    def __init__(self, server: ServerUnderTest):
        self.server = server
        self.names: list[str] = []
        self.roles: list[str] = []

    def url(self, database: str, user: str | None = None, password: str | None = None) -> URL:
        url = self.server.admin_url.set(database=database)
        if user is not None:
            url = url.set(username=user, password=password)
        return url

    def location(self, database: str) -> DatabaseLocation:
        """The platform database as MAESTRO_DATABASE_URL would give it."""
        return DatabaseLocation(platform_url=self.url(database), source="MAESTRO_DATABASE_URL")

    def connect(self, database: str, autocommit: bool = True, **kwargs):
        return psycopg_connect(self.url(database, **kwargs), autocommit=autocommit)

    def create(self, name: str | None = None) -> str:
        name = name or f"bk_{uuid.uuid4().hex[:10]}"
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        self.names.append(name)
        return name

    def execute(self, database: str, *statements: str) -> None:
        with self.connect(database) as conn:
            for statement in statements:
                conn.execute(statement)

    def scalar(self, database: str, sql: str):
        with self.connect(database) as conn:
            return conn.execute(sql).fetchone()[0]

    def create_role(self, password: str) -> str:
        name = f"bk_role_{uuid.uuid4().hex[:8]}"
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD '{password}'")
        self.roles.append(name)
        return name

    def drop_all(self) -> None:
        with self.connect("postgres") as conn:
            for name in reversed(self.names):
                conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            for role in self.roles:
                conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")


@pytest.fixture
def databases(server) -> Iterator[Databases]:
    """Databases on each server in turn (the test runs against PostgreSQL 18 and 15)."""
    made = Databases(server)
    try:
        yield made
    finally:
        made.drop_all()


@pytest.fixture
def pg18_databases(pg18) -> Iterator[Databases]:
    """Databases on the embedded server only, for behaviour that does not depend on the version."""
    made = Databases(pg18)
    try:
        yield made
    finally:
        made.drop_all()


def fill_big_table(dbs: Databases, database: str, table: str = "big", rows: int = BIG_ROWS) -> None:
    dbs.execute(
        database,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, payload text NOT NULL)",
        f"INSERT INTO {table} SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {rows}) g",
    )


def count_rows(dbs: Databases, database: str) -> dict[str, int]:
    """SELECT count(*) of every table that holds rows itself (partitions, not their parent)."""
    with dbs.connect(database) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
            "AND format('%I.%I', schemaname, tablename)::regclass NOT IN (SELECT partrelid FROM pg_partitioned_table)"
        ).fetchall()
        counts = {}
        for schema, name in tables:
            relation = f"{quote_ident(schema)}.{quote_ident(name)}"
            counts[f"{schema}.{name}"] = conn.execute(f"SELECT count(*) FROM {relation}").fetchone()[0]
        return counts


def live_checks(url: URL) -> list[TableCheck]:
    """Row counts and content checksums of a database now, as a restore drill takes them."""
    with psycopg_connect(url, options=CHECKSUM_SESSION_OPTIONS) as conn:
        return table_checks(conn)


def restore_dump(store: ObjectStore, key: str, dbs: Databases) -> str:
    """pg_restore the backup object `key` (read and verified through the store) into a new
    database; return its name."""
    import zstandard

    database = dbs.create()
    # pg_restore 17+ always sends `SET transaction_timeout = 0`, which servers older than 17
    # refuse; there it runs without --exit-on-error and that one error is the only one allowed.
    old_server = dbs.server.major_version < 17
    restore = subprocess.Popen(
        [program("pg_restore"), "--no-owner", *([] if old_server else ["--exit-on-error"]), f"--dbname={database}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=libpq_environment(dbs.url(database)),
    )
    try:
        with store.open_read(key) as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            for block in iter(lambda: reader.read(1024 * 1024), b""):
                restore.stdin.write(block)
        restore.stdin.close()
    except BrokenPipeError:
        pass  # pg_restore stopped early: its exit status and message say why, below
    finally:
        if restore.poll() is None and not restore.stdin.closed:
            restore.kill()
    stderr = restore.stderr.read().decode()
    code = restore.wait()
    if old_server and code == 1:
        errors = [line for line in stderr.splitlines() if "ERROR:" in line]
        tolerated = ['ERROR:  unrecognized configuration parameter "transaction_timeout"']
        if [e.split("query: ", 1)[-1] for e in errors] == tolerated and "errors ignored on restore: 1" in stderr:
            code = 0
    assert code == 0, f"pg_restore of {key} failed: {stderr}"
    return database


def child_environment() -> dict[str, str]:
    """The environment of a backup run in a child process (the repo importable)."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


CHILD_DEADLINE_S = 60


def wait_until(what: str, condition, child: subprocess.Popen, deadline_s: float = CHILD_DEADLINE_S,
               running: str = "backup", output=None, poll_s: float = 0.02):
    """Poll `condition` until it is true; fail if the child (`running` a backup, a restore, a
    daemon) exits or the deadline passes. `output()`: what the child wrote, for a child whose
    output goes to a file (else its pipes are read when it exited)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if child.poll() is not None:
            if output is None:
                out, err = child.communicate()
                output = lambda: f"{out.decode()}\n{err.decode()}"  # noqa: E731
            pytest.fail(f"the {running} exited ({child.returncode}) before {what}:\n{output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {deadline_s} s" + (f":\n{output()}" if output else ""))
        time.sleep(poll_s)

