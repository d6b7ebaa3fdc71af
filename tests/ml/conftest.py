"""A complete ML environment on real servers: platform database and MLflow backend on the
embedded PostgreSQL, artifacts in a temporary folder, demo rows in `training_rows`, and a
temporary Dagster instance. No mocks of MLflow or PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.tenants import add_tenant

from ..conftest import create_database, drop_database

TENANTS = ("acme", "globex")  # binary (breast cancer) and three-class (wine)


@dataclass
class MLEnvironment:
    platform_url: str
    mlflow_uri: str
    artifact_root: str
    resources: dict
    instance: dg.DagsterInstance

    def sql(self, statement: str, **params):
        with engine_for(self.resources["platform_db"].location().platform_url).begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else None

    def run(self, tenant: str, run_config: dict | None = None, job: str = "train_and_deploy", tags: dict | None = None):
        from maestro_pipelines.definitions import defs
        from maestro_pipelines.jobs import ml as ml_jobs

        # Op jobs run unbound (resources given here); the asset job is resolved from defs.
        definition = ml_jobs.rollback_deployment if job == "rollback_deployment" else defs.resolve_job_def(job)
        return definition.execute_in_process(
            partition_key=tenant if job == "train_and_deploy" else None,
            instance=self.instance, resources=self.resources, run_config=run_config or {}, raise_on_error=False,
            tags=tags,
        )

    def registry(self):
        return self.resources["mlflow"].registry()


# MLflow makes its schema on first use, in a child process so that no connection of ours is left
# on the database (a template must have none).
MAKE_MLFLOW_SCHEMA = """
import sys
from mlflow.tracking import MlflowClient
MlflowClient(tracking_uri=sys.argv[1], registry_uri=sys.argv[1]).search_registered_models(max_results=1)
"""


@pytest.fixture(scope="session")
def ml_templates(pg18) -> Iterator[tuple[str, str]]:
    """(platform, mlflow): a platform database migrated with the demo tenants and their rows,
    and a database with MLflow's schema as MLflow makes it on first use, made once per worker:
    each ml_env's databases are copies of them (CREATE DATABASE ... TEMPLATE). MLflow's first
    use is its migrations, 3-6 s on 2 busy cores, which every ML test paid."""
    from maestro_pipelines.ml.demo import seed_demo_tenant

    platform = create_database(pg18, "mltemplate")
    location = pg18.location(platform)
    upgrade(location)
    with engine_for(location.platform_url).begin() as conn:
        for tenant in TENANTS:
            seed_demo_tenant(conn, tenant)
            add_tenant(conn, tenant, tenant.title())
    engine_for(location.platform_url).dispose()
    mlflow_db = create_database(pg18, "mlflowtemplate")
    uri = pg18.admin_url.set(database=mlflow_db).render_as_string(hide_password=False)
    made = subprocess.run([sys.executable, "-c", MAKE_MLFLOW_SCHEMA, uri], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    yield platform, mlflow_db
    drop_database(pg18, platform)
    drop_database(pg18, mlflow_db)


@pytest.fixture
def ml_env(pg18, ml_templates, tmp_path: Path) -> Iterator[MLEnvironment]:
    from maestro_pipelines.partitions import tenant_partitions
    from maestro_pipelines.resources import CacheResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase
    from maestro_pipelines.resources.values_io import StoredValuesIOManager
    from maestro_pipelines.resources.sources import PostgresDataSource

    platform = create_database(pg18, "ml", template=ml_templates[0])
    mlflow_db = create_database(pg18, "mlflow", template=ml_templates[1])
    platform_url = pg18.libpq_url(platform)
    mlflow_uri = pg18.admin_url.set(database=mlflow_db).render_as_string(hide_password=False)
    artifact_root = (tmp_path / "artifacts").as_uri()
    resources = {
        "platform_db": PlatformDatabase(database_url=platform_url),
        "mlflow": MLflowRegistry(tracking_uri=mlflow_uri, artifact_root=artifact_root),
        "source": PostgresDataSource(url=platform_url, table="training_rows"),
        "cache": CacheResource(),  # the in-process LRU alone (tests/ml/test_cache_in_graph.py adds Redis)
        # Values between the assets in a local store of the test's own (MAESTRO_HOME/store's layout).
        "io_manager": StoredValuesIOManager(store=ObjectStoreResource(home=str(tmp_path / "values_home"))),
    }
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(tenant_partitions.name, list(TENANTS))
        yield MLEnvironment(platform_url, mlflow_uri, artifact_root, resources, instance)
    drop_database(pg18, platform)
    drop_database(pg18, mlflow_db)
