"""Restores and drills through Dagster on real servers: a migrated platform database with a
few tenants and an MLflow database (MLflow's own schema, a model whose `production` alias
resolves) beside it on the embedded PostgreSQL, a local object store and a temporary Dagster
instance per test, a webhook receiver on 127.0.0.1. No mocks: backups are real pg_dumps,
restores real pg_restores, alerts real HTTP POSTs.

Restores leave databases on the server (`<db>_restore_<time>`, `<db>_pre_restore_<time>`):
every test ends by dropping whatever its restores left, so the next one starts clean."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import dispose_engines, engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.tenants import add_tenant

from ..conftest import create_database, drop_database
from ..webhook import Webhook, webhook_receiver

TENANTS = ("acme", "globex", "initech")
MODEL = "acme-churn"
WEBHOOK_SECRET = "XoXbDr1llT0kEn77"
CONFIGURED_NODE = {
    "restore_database": "restore_from_backup",
    "restore_cleanup_job": "drop_restore_leftovers",
    "dr_drill_job": "dr_drill",
}
"""The op (or asset) whose config a job's launchpad shows."""


@dataclass
class DrillDatabases:
    server: object
    platform: str
    platform_url: str

    @property
    def mlflow(self) -> str:
        return f"{self.platform}_mlflow"


def _mlflow_with_a_production_model(url: str) -> None:
    """MLflow creates its schema on first use; one model version carries the `production` alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source="s3://maestro-test/models/acme-churn/1")
    client.set_registered_model_alias(MODEL, "production", version.version)


@pytest.fixture(scope="session")
def drill_databases(pg18) -> Iterator[DrillDatabases]:
    platform = create_database(pg18, "dr")
    location = pg18.location(platform)
    upgrade(location)
    with engine_for(location.platform_url).begin() as conn:
        for name in TENANTS:
            add_tenant(conn, name, name.title())
    with engine_for(pg18.admin_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f'CREATE DATABASE "{platform}_mlflow"'))
    _mlflow_with_a_production_model(pg18.admin_url.set(database=f"{platform}_mlflow").render_as_string(hide_password=False))
    yield DrillDatabases(pg18, platform, pg18.libpq_url(platform))
    dispose_engines()
    drop_database(pg18, f"{platform}_mlflow")
    drop_database(pg18, platform)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        yield receiver


@dataclass
class DrillEnvironment:
    databases: DrillDatabases
    store_dir: Path
    resources: dict
    instance: dg.DagsterInstance

    def store(self):
        return self.resources["store"].get_store()

    def destinations(self):
        from maestro_pipelines.assets.drills import live_destinations

        return live_destinations(self.resources["platform_db"], self.resources["mlflow"])[0]

    def take_backup(self):
        """A verified backup through the library, as `maestro backup run` + verify take one."""
        from maestro_pipelines.backup import backup_targets, create_backup, verify_backup
        from maestro_pipelines.settings import Settings

        platform_db = self.resources["platform_db"]
        settings = Settings(home=Path(platform_db.home), database_url=platform_db.database_url)
        targets, notes = backup_targets(settings, platform_db.location())
        manifest = create_backup(self.store(), targets, notes=notes)
        assert verify_backup(self.store(), manifest.backup_id).ok
        return manifest

    def run(self, job: str, config: dict | None = None, **resources):
        """Launch `job` in process as the launchpad would, `config` being the one op's/asset's config."""
        from maestro_pipelines.definitions import defs

        return defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, resources={**self.resources, **resources},
            run_config={"ops": {CONFIGURED_NODE[job]: {"config": config or {}}}}, raise_on_error=False,
        )

    def database_names(self) -> set[str]:
        with engine_for(self.databases.server.admin_url).connect() as conn:
            return set(conn.execute(text("SELECT datname FROM pg_database")).scalars())

    def leftovers(self) -> list[str]:
        from maestro_pipelines.backup import restore_leftovers

        return sorted(leftover.name for leftover in restore_leftovers(self.destinations()))

    def tenants(self, database: str) -> list[str]:
        engine = engine_for(self.databases.server.admin_url.set(database=database))
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(text("SELECT name FROM tenants")).scalars())
        finally:
            engine.dispose()


@pytest.fixture
def drill_env(drill_databases, tmp_path: Path) -> Iterator[DrillEnvironment]:
    from maestro_pipelines.backup import restore_cleanup
    from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    resources = {
        "platform_db": PlatformDatabase(database_url=drill_databases.platform_url, home=str(tmp_path / "home")),
        "mlflow": MLflowRegistry(database_url=drill_databases.platform_url),
        "store": ObjectStoreResource(url=store_dir.as_uri()),
        "alerts": AlertResource(),
    }
    (tmp_path / "dagster").mkdir()
    overrides = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster"), overrides=overrides) as instance:
        env = DrillEnvironment(drill_databases, store_dir, resources, instance)
        try:
            yield env
        finally:
            restore_cleanup(env.destinations())
