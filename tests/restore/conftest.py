"""Real servers and stores for the restore tests: nothing here is a mock.

Reuses the backup tests' servers, stores and database helpers (tests/backup/conftest.py,
tests/stores/conftest.py). What is added here:

- `Installation`: Maestro's databases as a user has them (a migrated platform database with
  tenants, MLflow's `<platform>_mlflow`, Dagster's storage), the settings naming them, and
  the backup and restore destinations those settings give (`backup_targets`,
  `database_targets`), so the tests go through the same resolution as the CLI.
- `contents`: everything a restore must bring back, compared exactly: every table's rows
  (COPY, in a fixed order), every sequence's position and the schema-only dump.
- Teardown drops whatever restores left next to a test's databases (`restore_cleanup`).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maestro_pipelines.backup import (
    DatabaseTarget,
    backup_targets,
    create_backup,
    database_targets,
    restore_cleanup,
    restore_leftovers,
)
from maestro_pipelines.backup.consistency import list_tables
from maestro_pipelines.backup.manifest import BackupManifest
from maestro_pipelines.backup.pgtools import libpq_environment, program
from maestro_pipelines.platform_db.admin import quote_ident
from maestro_pipelines.platform_db.connection import dispose_engines
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.settings import Settings
from tests.backup.conftest import (  # noqa: F401  (fixtures, re-exported for this folder)
    Databases,
    case,
    databases,
    local_case,
    pg18_databases,
)
from tests.backup.test_create import make_mlflow_and_dagster, seed_platform


@pytest.fixture
def pg15_databases(pg15) -> Iterator[Databases]:
    """Databases on Debian's PostgreSQL 15 only (cross-version restores)."""
    made = Databases(pg15)
    try:
        yield made
    finally:
        made.drop_all()


# ---- an installation ------------------------------------------------------------------------


@dataclass
class Installation:
    dbs: Databases
    platform: str
    mlflow: str
    dagster: str | None
    settings: Settings
    location: DatabaseLocation
    backups: list[BackupManifest] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name in (self.platform, self.mlflow, self.dagster) if name]

    def targets(self) -> list[DatabaseTarget]:
        """What `maestro backup run` backs up."""
        return backup_targets(self.settings, self.location)[0]

    def destinations(self) -> list[DatabaseTarget]:
        """What `maestro restore` restores into (the live databases, existing or not)."""
        return database_targets(self.settings, self.location)[0]

    def backup(self, store) -> BackupManifest:
        manifest = create_backup(store, self.targets())
        self.backups.append(manifest)
        return manifest

    def leftovers(self) -> list[str]:
        return [leftover.name for leftover in restore_leftovers(self.destinations())]


def install(dbs: Databases, home: Path, templates: Templates, real_mlflow: bool = False) -> Installation:
    """A migrated platform database with three tenants and their models, an MLflow backend
    (`<platform>_mlflow`) and Dagster's storage, on `dbs`' server. With `real_mlflow`: a
    real MLflow backend with a registered model aliased `production`, and no Dagster database."""
    platform = templates.clone(dbs, "platform", f"bk_{fresh_suffix()}")
    if real_mlflow:
        mlflow, dagster = templates.clone(dbs, "mlflow", f"{platform}_mlflow"), None
    else:
        mlflow, dagster = make_mlflow_and_dagster(dbs, platform)
    settings = Settings(
        home=home, database_url=dbs.server.libpq_url(platform),
        dagster_database_url=dbs.server.libpq_url(dagster) if dagster else None,
    )
    return Installation(dbs, platform, mlflow, dagster, settings, dbs.location(platform))


def _make_platform(dbs: Databases, name: str) -> None:
    upgrade(dbs.location(name))
    seed_platform(dbs, name)


def _make_mlflow(dbs: Databases, name: str) -> None:
    from mlflow.tracking import MlflowClient

    uri = dbs.url(name).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates MLflow's schema
    client.create_registered_model("churn")
    version = client.create_model_version("churn", source="mlflow-artifacts:/1/0123abcd/artifacts/model")
    client.set_registered_model_alias("churn", "production", version.version)
    client.create_registered_model("unaliased")


class Templates:
    """Databases made once per server and test process, copied for each test (CREATE
    DATABASE ... TEMPLATE takes a fraction of the migrations' time):

    - `platform`: the platform database migrated by Maestro (alembic) with `seed_platform`'s
      tenants, models, versions, deployments and predictions;
    - `mlflow`: a real MLflow backend made by MLflow itself: the model `churn`, version 1
      from a dummy source, aliased `production`, and a model without aliases."""

    BUILDERS = {"platform": _make_platform, "mlflow": _make_mlflow}

    def __init__(self):
        self.made: dict[tuple[str, str], tuple[Databases, str]] = {}

    def clone(self, dbs: Databases, kind: str, name: str) -> str:
        key = (dbs.server.name, kind)
        if key not in self.made:
            owner = Databases(dbs.server)
            template = owner.create(f"template_{kind}_{fresh_suffix()}")
            self.BUILDERS[kind](owner, template)
            self.made[key] = (owner, template)
        owner, template = self.made[key]
        # Pooled sessions (alembic's, MLflow's) would make the copy fail: a template has none.
        dispose_engines()
        owner.execute("postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{template}'")
        dbs.execute("postgres", f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}")
        dbs.names.append(name)
        return name

    def drop(self) -> None:
        for owner, _template in self.made.values():
            try:
                owner.drop_all()
            except Exception:  # the server stopped first: its databases went with it
                pass


@pytest.fixture(scope="session")
def templates() -> Iterator[Templates]:
    made = Templates()
    yield made
    made.drop()


@pytest.fixture
def installations() -> Iterator[list[Installation]]:
    """Tests append the installations they make; teardown drops what restores left beside
    them (`_pre_restore_` and `_restore_` databases), before the databases themselves go."""
    made: list[Installation] = []
    yield made
    for installation in made:
        restore_cleanup(installation.destinations())
        # Also what restore_cleanup cannot recognise (names PostgreSQL truncated to 63 bytes).
        for name in database_names(installation.dbs, f"{installation.platform}_"):
            if name not in installation.names:
                installation.dbs.execute("postgres", f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


@pytest.fixture
def installation(databases, installations, templates, tmp_path) -> Installation:
    """An installation on each server in turn (PostgreSQL 18 and 15)."""
    made = install(databases, tmp_path, templates)
    installations.append(made)
    return made


@pytest.fixture
def mlflow_installation(databases, installations, templates, tmp_path) -> Installation:
    """An installation with a real MLflow backend, on each server in turn."""
    made = install(databases, tmp_path, templates, real_mlflow=True)
    installations.append(made)
    return made


@pytest.fixture
def pg18_mlflow_installation(pg18_databases, installations, templates, tmp_path) -> Installation:
    """An installation with a real MLflow backend on the embedded PostgreSQL 18 only."""
    made = install(pg18_databases, tmp_path, templates, real_mlflow=True)
    installations.append(made)
    return made


@pytest.fixture
def pg18_installation(pg18_databases, installations, templates, tmp_path) -> Installation:
    """An installation on the embedded PostgreSQL 18 only."""
    made = install(pg18_databases, tmp_path, templates)
    installations.append(made)
    return made


# ---- what a restore must bring back --------------------------------------------------------

_DUMP_NOISE = re.compile(r"^(\\restrict|\\unrestrict|-- Dumped (from|by))")


def schema_dump(dbs: Databases, database: str) -> str:
    """pg_dump --schema-only, without the lines that differ between two runs."""
    result = subprocess.run(
        [program("pg_dump"), "--schema-only", "--no-owner", "--no-privileges", "--no-password"],
        env=libpq_environment(dbs.url(database)), capture_output=True, text=True, check=True,
    )
    return "\n".join(line for line in result.stdout.splitlines() if not _DUMP_NOISE.match(line))


def contents(dbs: Databases, database: str, schema: bool = True) -> dict:
    """Every table's rows in COPY text format (sorted), every sequence's position, and the
    schema-only dump: two databases with equal `contents` hold the same data."""
    tables: dict[str, bytes] = {}
    sequences: dict[str, tuple] = {}
    with dbs.connect(database) as conn:
        with conn.cursor() as cursor:
            names = list_tables(cursor)
        for schema_name, name in names:
            relation = f"{quote_ident(schema_name)}.{quote_ident(name)}"
            data = bytearray()
            with conn.cursor().copy(f'COPY (SELECT * FROM {relation} t ORDER BY t::text COLLATE "C") TO STDOUT') as copy:
                for block in copy:
                    data += block
            tables[f"{schema_name}.{name}"] = bytes(data)
        for schema_name, name in conn.execute(
            "SELECT schemaname, sequencename FROM pg_sequences ORDER BY 1, 2"
        ).fetchall():
            relation = f"{quote_ident(schema_name)}.{quote_ident(name)}"
            sequences[f"{schema_name}.{name}"] = conn.execute(f"SELECT last_value, is_called FROM {relation}").fetchone()
    found = {"tables": tables, "sequences": sequences}
    if schema:
        found["schema"] = schema_dump(dbs, database)
    return found


def database_names(dbs: Databases, prefix: str) -> list[str]:
    """Databases on the server whose names start with `prefix` (other tests' are not ours)."""
    with dbs.connect("postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", [prefix]
        ).fetchall()
    return [r[0] for r in rows]


def tenants(dbs: Databases, database: str) -> list[str]:
    with dbs.connect(database) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM tenants ORDER BY id").fetchall()]


def fresh_suffix() -> str:
    return uuid.uuid4().hex[:8]
