"""A migrated platform database on the embedded PostgreSQL 18 (pg_stat_statements loaded)
with tenants, models, a deployment and predictions, and a local object store. Real servers
only: the refreshes, partition moves and archives are real DDL on real tables."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from maestro_pipelines.platform_db.connection import engine_for, psycopg_connect
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.tenants import add_tenant

from ..conftest import ServerUnderTest, create_database, drop_database

TENANTS = ("acme", "globex", "initech")


@dataclass
class Platform:
    server: ServerUnderTest
    database: str
    store_dir: Path

    @property
    def url(self):
        return self.server.admin_url.set(database=self.database)

    def connect(self, autocommit: bool = True):
        return psycopg_connect(self.url, autocommit=autocommit, source="test")

    def scalar(self, sql: str, params=None):
        with self.connect() as conn:
            return conn.execute(sql, params).fetchone()[0]

    def store(self):
        from maestro_pipelines.storage.local import LocalObjectStore

        return LocalObjectStore(self.store_dir)

    def resources(self) -> dict:
        from maestro_pipelines.resources import ObjectStoreResource, PlatformDatabase

        return {
            "platform_db": PlatformDatabase(database_url=self.server.libpq_url(self.database)),
            "store": ObjectStoreResource(url=self.store_dir.as_uri()),
        }

    def add_predictions(self, tenant: str, created_at: list[datetime], entity_keys: list[str] | None = None) -> None:
        """Predictions of `tenant`'s model version 1 at the given times (whatever partition
        they land in, the default one included)."""
        keys = entity_keys or [f"{tenant}-{i}" for i in range(len(created_at))]
        with self.connect() as conn:
            tenant_id, version_id = conn.execute(
                "SELECT t.id, v.id FROM tenants t JOIN model_versions v ON v.tenant_id = t.id WHERE t.name = %s", [tenant]
            ).fetchone()
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO predictions (tenant_id, model_version_id, entity_key, features_hash, label, score, created_at) "
                    "VALUES (%s, %s, %s, 'h', '1', 0.5, %s)",
                    [(tenant_id, version_id, key, at) for key, at in zip(keys, created_at)],
                )


@pytest.fixture
def platform(pg18, tmp_path) -> Iterator[Platform]:
    """Three tenants, each with a model, version 1 deployed to production."""
    from maestro_pipelines.platform_db import ml_records
    from maestro_pipelines.platform_db.tenants import get_tenant

    database = create_database(pg18, "upkeep")
    location = pg18.location(database)
    upgrade(location)
    with engine_for(location.platform_url).begin() as conn:
        for name in TENANTS:
            add_tenant(conn, name, name.title())
            tenant = get_tenant(conn, name)
            model_id = ml_records.ensure_model(conn, tenant)
            ml_records.record_model_version(conn, tenant, model_id, 1, f"run-{name}", "hash", {"accuracy": 0.9}, {})
            ml_records.deploy_version(conn, tenant, model_id, 1, "production", 2, f"dagster-{name}")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    yield Platform(pg18, database, store_dir)
    drop_database(pg18, database)
