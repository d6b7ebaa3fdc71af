"""Real servers for the data connectors, started once per session on 127.0.0.1.

- PostgreSQL: the embedded PostgreSQL 18 (`pg18` from tests/conftest.py), a fresh database
  per test.
- MySQL: Debian's MariaDB 10.11 (`mariadbd`, installed by scripts/test), its own data folder.
- Snowflake: fakesnow's server mode (`fakesnow -s`), which the unpatched connector talks to
  over HTTP. Its gap: `write_pandas` does not work in server mode, so rows go in with a bound
  `executemany`.
- BigQuery: bqemulator (its own venv under .cache, because it needs duckdb 1.5.5), with
  DuckDB's spatial extension linked into a private HOME so it never tries to download it.
  Its gaps: `load_table_from_dataframe`/`load_table_from_json` fail, so rows go in with
  `insert_rows_json`.
- MongoDB: nx-27017 (a wire-protocol server, in memory). Its gaps: no authentication, no
  `$lookup`, and `$max` over dates in `$group` comes back as extended-JSON text; the
  connector sticks to find/sort/limit/count (which it does right), and the `$group` over
  dates runs on mongomock only (the `mongomock` backend: an in-process client, for query
  logic nx-27017 gets wrong).

Every backend is seeded with the same rows (`ROWS`) in a fresh database, dataset or
collection per test, dropped afterwards.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from maestro_pipelines.connectors.mongodb import MongoReader
from maestro_pipelines.resources.sources import DataSource, MongoDataSource, source_from_url

from ..conftest import create_database, drop_database
from ..services import CACHE, find_program, free_port, missing_service, server_process

# ---- the dataset: two tenants, ties in the timestamp, a NUMERIC column ---------------------------

BASE_TIME = datetime(2024, 3, 1, 8, 0, tzinfo=timezone.utc)
ROW_COUNT = 300


def _row(i: int) -> dict[str, Any]:
    tenant = "acme" if i % 5 < 3 else "globex"  # 180 acme, 120 globex, interleaved
    return {
        "id": i + 1,
        "tenant": tenant,
        "entity_key": f"{tenant}-{i:04d}",
        "f1": round(i * 0.25 - 10, 4),
        "f2": round((i % 17) * 1.125, 4),  # NUMERIC/DECIMAL where the backend has it
        "f3": i % 11,
        "label": int(i % 3 == 0),
        # four rows per minute: rows of one tenant share timestamps (the tiebreak matters)
        "updated_at": BASE_TIME + timedelta(minutes=i // 4),
    }


ROWS = [_row(i) for i in range(ROW_COUNT)]
COLUMNS = list(ROWS[0])
NUMERIC_COLUMNS = ("id", "f1", "f2", "f3", "label")


def rows_of(tenant: str, since: datetime | None = None) -> list[dict[str, Any]]:
    return [r for r in ROWS if r["tenant"] == tenant and (since is None or r["updated_at"] > since)]


def extra_row(tenant: str = "acme") -> dict[str, Any]:
    """A row newer than every seeded one (the fingerprint must notice it)."""
    return {
        "id": 10_000, "tenant": tenant, "entity_key": f"{tenant}-new", "f1": 1.5, "f2": 2.25, "f3": 3, "label": 1,
        "updated_at": BASE_TIME + timedelta(days=30),
    }


@dataclass
class Seeded:
    """One backend holding ROWS: its `source`, a way to add a row, and its cleanup."""

    name: str
    source: DataSource
    insert: Callable[[dict[str, Any]], None]
    url: str = ""
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    sql: bool = True

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# ---- servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[int]:
    mariadbd = find_program("mariadbd", Path("/usr/sbin/mariadbd"))
    install_db = find_program("mariadb-install-db", Path("/usr/bin/mariadb-install-db"))
    if not mariadbd or not install_db:
        missing_service("MariaDB", "apt-get install mariadb-server (scripts/test does it)")
    # Not under pytest's tmp_path: its parents are private to root and mariadbd runs as mysql.
    root = Path(tempfile.mkdtemp(prefix="maestro-mariadb-"))
    root.chmod(0o755)
    datadir = root / "data"
    as_root = os.geteuid() == 0
    user = ["--user=mysql"] if as_root else []
    if as_root:
        shutil.chown(root, "mysql", "mysql")
    # MariaDB writes temporary files to TMPDIR, which must be writable by the mysql user
    # (scripts/test points TMPDIR at a folder owned by root).
    env = {"TMPDIR": str(root)}
    try:
        installed = subprocess.run(
            [install_db, "--no-defaults", *user, f"--datadir={datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db"],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )
        if installed.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {(installed.stdout + installed.stderr)[-2000:]}")
        port = free_port()
        args = [mariadbd, "--no-defaults", *user, f"--datadir={datadir}", f"--port={port}", "--bind-address=127.0.0.1",
                f"--socket={root / 'mysqld.sock'}", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0",
                f"--tmpdir={root}"]
        with server_process(args, port, root, env=env):
            yield port
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def fakesnow_server(tmp_path_factory) -> Iterator[int]:
    program = find_program("fakesnow", Path(sys.executable).parent / "fakesnow")
    if not program:
        missing_service("fakesnow", "pip install 'fakesnow[server]'")
    port = free_port()
    with server_process([program, "-s", "-p", str(port)], port, tmp_path_factory.mktemp("fakesnow")):
        yield port


@pytest.fixture(scope="session")
def bqemulator_server(tmp_path_factory) -> Iterator[int]:
    venv = CACHE / "bqemulator-venv"
    program = venv / "bin" / "bqemulator"
    extensions = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "duckdb_extension_spatial" / "extensions"
                               / "v*" / "spatial.duckdb_extension"))
    if not program.exists() or not extensions:
        missing_service(
            "bqemulator", f"create {venv} with: pip install bqemulator numpy duckdb==1.5.5 duckdb-extension-spatial==1.5.5"
        )
    extension = Path(extensions[0])
    version = extension.parent.name  # v1.5.5
    arch = {"x86_64": "linux_amd64", "aarch64": "linux_arm64", "arm64": "linux_arm64"}.get(platform.machine(), "linux_amd64")
    workdir = tmp_path_factory.mktemp("bqemulator")
    home = workdir / "home"
    target = home / ".duckdb" / "extensions" / version / arch
    target.mkdir(parents=True)
    (target / extension.name).symlink_to(extension)  # otherwise it downloads it at start
    rest, grpc = free_port(), free_port()
    args = [str(program), "start", "--rest-port", str(rest), "--grpc-port", str(grpc), "--project", "test-project"]
    with server_process(args, rest, workdir, env={"HOME": str(home)}):
        yield rest


@pytest.fixture(scope="session")
def nx_server(tmp_path_factory) -> Iterator[int]:
    program = find_program("nx-27017", Path(sys.executable).parent / "nx-27017")
    if not program:
        missing_service("nx-27017", "pip install nx-27017")
    port = free_port()
    workdir = tmp_path_factory.mktemp("nx27017")
    # Its PID and log files default to /tmp/nx_27017.*, and a second server (another xdist
    # worker, another session) refuses to start while that PID file names a live process.
    args = [program, "--host", "127.0.0.1", "-p", str(port), "--data-dir", "memory",
            "--pid-file", str(workdir / "nx.pid"), "--log-file", str(workdir / "nx.log")]
    with server_process(args, port, workdir):
        yield port


# ---- seeding each backend --------------------------------------------------------------------------


def seed_postgres(pg18) -> Seeded:
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for

    name = create_database(pg18, "src")
    url = pg18.libpq_url(name)
    engine = engine_for(pg18.admin_url.set(database=name))
    insert = text(
        "INSERT INTO training_rows (id, tenant, entity_key, f1, f2, f3, label, updated_at) "
        "VALUES (:id, :tenant, :entity_key, :f1, :f2, :f3, :label, :updated_at)"
    )
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE training_rows (id bigint PRIMARY KEY, tenant text NOT NULL, entity_key text NOT NULL, "
            "f1 double precision, f2 numeric(12, 4), f3 integer, label integer NOT NULL, updated_at timestamptz NOT NULL)"
        ))
        conn.execute(text("CREATE INDEX ON training_rows (tenant, updated_at)"))
        conn.execute(insert, ROWS)

    def add(row):
        with engine.begin() as conn:
            conn.execute(insert, row)

    # No key_column: the tiebreak comes from the table's primary key.
    seeded = Seeded("postgres", source_from_url(url), add, url)
    seeded.cleanups.append(lambda: drop_database(pg18, name))
    return seeded


def seed_mysql(port: int) -> Seeded:
    from sqlalchemy import create_engine, text

    from maestro_pipelines.platform_db.connection import dispose_engines

    name = _unique("src")
    admin = create_engine(f"mysql+pymysql://root@127.0.0.1:{port}/mysql")
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine = create_engine(f"mysql+pymysql://root@127.0.0.1:{port}/{name}")
    insert = text(
        "INSERT INTO training_rows (id, tenant, entity_key, f1, f2, f3, label, updated_at) "
        "VALUES (:id, :tenant, :entity_key, :f1, :f2, :f3, :label, :updated_at)"
    )

    def naive(row):  # DATETIME has no zone: store UTC wall time
        return {**row, "updated_at": row["updated_at"].astimezone(timezone.utc).replace(tzinfo=None)}

    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE training_rows (id BIGINT PRIMARY KEY, tenant VARCHAR(64) NOT NULL, "
            "entity_key VARCHAR(64) NOT NULL, f1 DOUBLE, f2 DECIMAL(12, 4), f3 INT, label INT NOT NULL, "
            "updated_at DATETIME(6) NOT NULL, KEY tenant_updated (tenant, updated_at))"
        ))
        conn.execute(insert, [naive(r) for r in ROWS])

    def add(row):
        with engine.begin() as conn:
            conn.execute(insert, naive(row))

    def cleanup():
        dispose_engines()
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()

    url = f"mysql://root@127.0.0.1:{port}/{name}"
    seeded = Seeded("mysql", source_from_url(url), add, url)
    seeded.cleanups.append(cleanup)
    return seeded


SNOWFLAKE_PASSWORD = "Pa55-w0rd-fs"  # fakesnow accepts any: this one shows if it leaks


def snowflake_connect(port: int, **kwargs):
    import snowflake.connector

    return snowflake.connector.connect(
        account="fakesnow", user="maestro", password=SNOWFLAKE_PASSWORD, host="127.0.0.1", port=port, protocol="http",
        session_parameters={"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False}, **kwargs,
    )


def seed_snowflake(port: int) -> Seeded:
    """fakesnow's server mode has no `write_pandas`: rows go in with a bound executemany."""
    database = _unique("src").upper()
    insert = (
        "INSERT INTO training_rows (id, tenant, entity_key, f1, f2, f3, label, updated_at) "
        "VALUES (%(id)s, %(tenant)s, %(entity_key)s, %(f1)s, %(f2)s, %(f3)s, %(label)s, %(updated_at)s)"
    )

    def naive(row):  # TIMESTAMP_NTZ: UTC wall time
        return {**row, "updated_at": row["updated_at"].astimezone(timezone.utc).replace(tzinfo=None)}

    with snowflake_connect(port) as conn:
        cursor = conn.cursor()
        cursor.execute(f"CREATE DATABASE {database}")
        cursor.execute(f"CREATE SCHEMA {database}.rows")
        cursor.execute(f"USE SCHEMA {database}.rows")
        cursor.execute(
            "CREATE TABLE training_rows (id INTEGER, tenant VARCHAR, entity_key VARCHAR, f1 FLOAT, f2 NUMBER(12, 4), "
            "f3 INTEGER, label INTEGER, updated_at TIMESTAMP_NTZ)"
        )
        cursor.executemany(insert, [naive(r) for r in ROWS])

    def add(row):
        with snowflake_connect(port, database=database, schema="ROWS") as conn:
            conn.cursor().execute(insert, naive(row))

    def cleanup():  # fakesnow cannot DROP DATABASE (a parser error): drop what it holds
        with snowflake_connect(port) as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {database}.rows.training_rows")

    url = (f"snowflake://maestro:{SNOWFLAKE_PASSWORD}@fakesnow/{database}/ROWS?host=127.0.0.1&port={port}&protocol=http"
           "&warehouse=COMPUTE_WH&key_column=id")
    seeded = Seeded("snowflake", source_from_url(url, connect_timeout_seconds=10), add, url)
    seeded.cleanups.append(cleanup)
    return seeded


def bigquery_client(port: int):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(
        project="test-project", credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=f"http://127.0.0.1:{port}"),
    )


def seed_bigquery(port: int) -> Seeded:
    """bqemulator: `load_table_from_dataframe`/`_json` fail, so rows go in with `insert_rows_json`."""
    from google.cloud import bigquery

    client = bigquery_client(port)
    dataset = _unique("src")
    client.create_dataset(dataset)
    schema = [
        bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("tenant", "STRING"),
        bigquery.SchemaField("entity_key", "STRING"), bigquery.SchemaField("f1", "FLOAT64"),
        bigquery.SchemaField("f2", "NUMERIC"), bigquery.SchemaField("f3", "INT64"),
        bigquery.SchemaField("label", "INT64"), bigquery.SchemaField("updated_at", "TIMESTAMP"),
    ]
    table = client.create_table(bigquery.Table(f"test-project.{dataset}.training_rows", schema=schema))

    def as_json(row):
        return {**row, "f2": str(row["f2"]), "updated_at": row["updated_at"].isoformat()}

    def add(row):
        errors = client.insert_rows_json(table, [as_json(row)])
        assert not errors, errors

    add_all = client.insert_rows_json(table, [as_json(r) for r in ROWS])
    assert not add_all, add_all
    url = f"bigquery://test-project/{dataset}?api_endpoint=http://127.0.0.1:{port}&key_column=id"
    seeded = Seeded("bigquery", source_from_url(url, retry_timeout_seconds=10), add, url)
    seeded.cleanups.append(lambda: (client.delete_dataset(dataset, delete_contents=True), client.close()))
    return seeded


def _seed_mongo(name: str, client, source_for: Callable[[str], DataSource]) -> Seeded:
    database = _unique("src")
    collection = client[database]["training_rows"]
    collection.insert_many([dict(r) for r in ROWS])
    collection.create_index([("tenant", 1), ("updated_at", 1)])
    seeded = Seeded(name, source_for(database), lambda row: collection.insert_one(dict(row)), sql=False)
    seeded.cleanups.append(lambda: client.drop_database(database))
    return seeded


def seed_nx(port: int) -> Seeded:
    import pymongo

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", tz_aware=True)
    url_for = lambda db: f"mongodb://127.0.0.1:{port}/{db}?directConnection=true"  # noqa: E731
    seeded = _seed_mongo("mongodb", client, lambda db: source_from_url(url_for(db)))
    seeded.url = seeded.source.url
    seeded.cleanups.insert(0, client.close)
    return seeded


class MongomockReader(MongoReader):
    """`MongoReader` over an in-process mongomock client: the query logic, without a
    server, for what nx-27017 gets wrong (`$max` of dates in `$group`)."""

    def _new_client(self, parsed):
        return MONGOMOCK_CLIENT


class MongomockDataSource(MongoDataSource):
    """`MongoDataSource` whose reader is a `MongomockReader`."""

    def _open(self):
        return MongomockReader(**self._reader_fields())


def _mongomock_client():
    try:
        import mongomock
    except ImportError:
        return None
    return mongomock.MongoClient(tz_aware=True)


MONGOMOCK_CLIENT = _mongomock_client()


def seed_mongomock() -> Seeded:
    if MONGOMOCK_CLIENT is None:
        missing_service("mongomock", "pip install mongomock")
    return _seed_mongo(
        "mongomock", MONGOMOCK_CLIENT, lambda db: MongomockDataSource(url=f"mongodb://mongomock.invalid/{db}")
    )


BACKENDS = ("postgres", "mysql", "snowflake", "bigquery", "mongodb", "mongomock")
SQL_BACKENDS = ("postgres", "mysql", "snowflake", "bigquery")
MONGO_BACKENDS = ("mongodb", "mongomock")


def seed(request, backend: str) -> Seeded:
    if backend == "postgres":
        return seed_postgres(request.getfixturevalue("pg18"))
    if backend == "mysql":
        return seed_mysql(request.getfixturevalue("mariadb_server"))
    if backend == "snowflake":
        return seed_snowflake(request.getfixturevalue("fakesnow_server"))
    if backend == "bigquery":
        return seed_bigquery(request.getfixturevalue("bqemulator_server"))
    if backend == "mongodb":
        return seed_nx(request.getfixturevalue("nx_server"))
    if backend == "mongomock":
        return seed_mongomock()
    raise ValueError(backend)


def backend_params(names=BACKENDS):
    """Each backend's tests stay on one xdist worker (one server start per backend)."""
    return [pytest.param(name, id=name, marks=pytest.mark.xdist_group(f"sources-{name}")) for name in names]


@pytest.fixture(params=backend_params())
def seeded(request) -> Iterator[Seeded]:
    """Every backend in turn, holding ROWS in a fresh database (dataset, collection)."""
    backend = seed(request, request.param)
    yield backend
    backend.close()


@pytest.fixture(params=backend_params(SQL_BACKENDS))
def seeded_sql(request) -> Iterator[Seeded]:
    backend = seed(request, request.param)
    yield backend
    backend.close()


@pytest.fixture(params=backend_params(MONGO_BACKENDS))
def seeded_mongo(request) -> Iterator[Seeded]:
    backend = seed(request, request.param)
    yield backend
    backend.close()
