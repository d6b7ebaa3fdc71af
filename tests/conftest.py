"""Real PostgreSQL servers for the tests: nothing here is a mock.

- `pg18`: the embedded PostgreSQL 18 from the wheel, started once per test session (per
  xdist worker) in a temporary MAESTRO_HOME, through Maestro's own `EmbeddedPostgres`.
- `pg15`: Debian's PostgreSQL 15, started by `scripts/test` as the `postgres` user on a
  loopback port, with password authentication; its admin URL arrives in
  MAESTRO_TEST_PG15_URL. Without it the pg15 cases are skipped, except under CI, where a
  missing server is an error rather than a silent skip.

Each test that needs a database gets a fresh one (`fresh_database`), dropped afterwards.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from maestro_pipelines.platform_db.connection import dispose_engines, engine_for
from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.platform_db.urls import parse_postgres_url
from tests.services import free_port, wait_for_port


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Tests marked `xdist_group` share one module fixture (a `dagster dev`, a connector's
    server) and must run in one worker: `scripts/test` runs `--dist loadgroup`, whose workers
    give a grouped test the id `<id>@<group>`. With pytest 9.2 and pytest-xdist 3.8 the
    grouping silently stops (pytest-dev/pytest-xdist#1386: xdist edits the node id, which
    pytest 9.2 no longer reads), one module's tests go to both workers, each starts its own
    fixture, and a test that needs the one before it fails half the time. Then each grouped
    test fails at once with this one line, before its fixtures start, instead of at random."""
    if item.config.getoption("loadgroup", default=False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail(
            "pytest-xdist did not keep this xdist_group test with its group: this pytest and pytest-xdist "
            "do not work together (pytest-dev/pytest-xdist#1386); install the versions the dev extra of "
            "pyproject.toml allows", pytrace=False)


SLOW_FIRST = (
    "tests/test_daemon_runs.py", "tests/test_automation.py", "tests/test_production_instance.py",
    "tests/test_two_machines.py", "tests/test_daemon_tenant_sensor.py", "tests/test_managed_role.py",
    "tests/test_runbooks.py", "tests/pitr/test_pitr_graph.py",
)
"""Modules whose tests take half a minute to five: collected first, so that xdist hands them
out early and the two workers finish together, instead of one worker starting a five-minute
test when the other has nothing left (the suite's wall time is the busier worker's)."""


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(SLOW_FIRST))  # stable: order kept otherwise


PG15_URL_VARIABLE = "MAESTRO_TEST_PG15_URL"


@dataclass
class ServerUnderTest:
    name: str
    admin_url: URL
    major_version: int

    def location(self, database: str) -> DatabaseLocation:
        return DatabaseLocation(platform_url=self.admin_url.set(database=database), source=f"test server {self.name}")

    def libpq_url(self, database: str) -> str:
        """The URL as a user writes it in MAESTRO_DATABASE_URL (password included)."""
        return self.admin_url.set(drivername="postgresql", database=database).render_as_string(hide_password=False)


def _major_version(url: URL) -> int:
    with engine_for(url).connect() as conn:
        return int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000


@pytest.fixture(scope="session")
def pg18(tmp_path_factory) -> Iterator[ServerUnderTest]:
    # No WAL archiving (MAESTRO_WAL_ARCHIVING=off): every test's CREATE DATABASE writes half a
    # WAL segment, which nothing here recovers from; tests/pitr/ starts servers that archive.
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("maestro_home"), wal_archiving=False)
    url = embedded.start()
    # A test server needs no protection from an operating-system crash (fsync and full-page
    # writes are about that alone, a killed process loses nothing): each test's CREATE
    # DATABASE checkpoints, and the shutdown checkpoint took 40 s at the end of a worker.
    with engine_for(url).connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for setting in ("fsync", "full_page_writes"):
            conn.execute(text(f"ALTER SYSTEM SET {setting} = off"))
        conn.execute(text("SELECT pg_reload_conf()"))
    yield ServerUnderTest("pg18-embedded", url, _major_version(url))
    dispose_engines()
    embedded.stop()


@pytest.fixture(scope="session")
def pg15() -> ServerUnderTest:
    raw = os.environ.get(PG15_URL_VARIABLE)
    if not raw:
        if os.environ.get("CI"):
            pytest.fail(f"{PG15_URL_VARIABLE} is not set: scripts/test should have started PostgreSQL 15")
        pytest.skip(f"{PG15_URL_VARIABLE} not set (run the suite through scripts/test to start PostgreSQL 15)")
    url = parse_postgres_url(raw, PG15_URL_VARIABLE)
    return ServerUnderTest("pg15-debian", url, _major_version(url))


@pytest.fixture(params=["pg18", "pg15"])
def server(request) -> ServerUnderTest:
    """Each test using this runs against both servers."""
    return request.getfixturevalue(request.param)


def create_database(server: ServerUnderTest, prefix: str = "test", template: str | None = None) -> str:
    """A new database, empty or a copy of `template` (which nothing may be connected to)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with engine_for(server.admin_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f'CREATE DATABASE "{name}"{copy}'))
    return name


def drop_database(server: ServerUnderTest, name: str) -> None:
    engine_for(server.admin_url.set(database=name)).dispose()
    with engine_for(server.admin_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        )


@pytest.fixture
def fresh_database(server) -> Iterator[DatabaseLocation]:
    """An empty database on `server` (both servers, by parametrization)."""
    name = create_database(server)
    yield server.location(name)
    drop_database(server, name)


@pytest.fixture
def pg18_database(pg18) -> Iterator[DatabaseLocation]:
    """An empty database on the embedded server only."""
    name = create_database(pg18)
    yield pg18.location(name)
    drop_database(pg18, name)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP on 127.0.0.1 (the store and backup tests use it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port, None, None, deadline_s=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
