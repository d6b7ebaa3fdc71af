"""Backups through Dagster on real servers: the platform database (migrated, a few tenants)
and an empty MLflow database beside it on the embedded PostgreSQL, a local object store per
test, a temporary Dagster instance with a limit on the backup pool, and a webhook receiver
on 127.0.0.1. No mocks: backups are real pg_dumps, alerts real HTTP POSTs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.tenants import add_tenant

from ..conftest import create_database, drop_database
from ..webhook import Webhook, webhook_receiver

WEBHOOK_SECRET = "XoXb7SeCrEtT0kEn42"
"""The token in the webhook's path: a Slack webhook URL is its own credential."""


@dataclass
class BackupDatabases:
    platform_url: str
    platform: str


@pytest.fixture(scope="session")
def backup_databases(pg18) -> Iterator[BackupDatabases]:
    """A migrated platform database with rows, and `<it>_mlflow` (empty) beside it."""
    platform = create_database(pg18, "bk")
    location = pg18.location(platform)
    upgrade(location)
    with engine_for(location.platform_url).begin() as conn:
        for name in ("acme", "globex", "initech"):
            add_tenant(conn, name, name.title())
    with engine_for(pg18.admin_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f'CREATE DATABASE "{platform}_mlflow"'))
    yield BackupDatabases(pg18.libpq_url(platform), platform)
    drop_database(pg18, f"{platform}_mlflow")
    drop_database(pg18, platform)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        yield receiver


@dataclass
class BackupEnvironment:
    databases: BackupDatabases
    store_dir: Path
    resources: dict
    instance: dg.DagsterInstance

    def store(self):
        return self.resources["store"].get_store()

    def take_backup(self, at: datetime | None = None, verify: bool = True):
        """A backup through the library, as `maestro backup run` takes one; `at` fakes its start time."""
        from maestro_pipelines.backup import backup_targets, create_backup, verify_backup
        from maestro_pipelines.settings import Settings

        platform_db = self.resources["platform_db"]
        settings = Settings(home=Path(platform_db.home), database_url=platform_db.database_url)
        targets, notes = backup_targets(settings, platform_db.location())
        with (mock.patch("maestro_pipelines.backup.create.utcnow", return_value=at) if at else _nothing()):
            manifest = create_backup(self.store(), targets, notes=notes)
        if verify:
            assert verify_backup(self.store(), manifest.backup_id).ok
        return manifest

    def run(self, job: str, partition_key: str | None = None, run_config: dict | None = None, **resources):
        from maestro_pipelines.definitions import defs

        return defs.resolve_job_def(job).execute_in_process(
            partition_key=partition_key, instance=self.instance, resources={**self.resources, **resources},
            run_config=run_config or {}, raise_on_error=False,
        )


@contextmanager
def _nothing():
    yield


@pytest.fixture
def backup_env(backup_databases, tmp_path: Path) -> Iterator[BackupEnvironment]:
    from maestro_pipelines.resources import AlertResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    resources = {
        "platform_db": PlatformDatabase(database_url=backup_databases.platform_url, home=str(tmp_path / "home")),
        "mlflow": MLflowRegistry(database_url=backup_databases.platform_url),
        "store": ObjectStoreResource(url=store_dir.as_uri()),
        "alerts": AlertResource(),
    }
    (tmp_path / "dagster").mkdir()
    # The deployment's pool limit (see maestro_pipelines.assets.backups), set on this instance.
    overrides = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster"), overrides=overrides) as instance:
        yield BackupEnvironment(backup_databases, store_dir, resources, instance)
