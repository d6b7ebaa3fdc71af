"""The scoring watermark of `batch_predictions` lives next to the predictions it describes.

The rows come from a data source outside the platform database (MAESTRO_SOURCE_URL's
case), so restoring the platform database alone rewinds the predictions but not the rows:
the next scoring must score exactly the rows the restored predictions lack.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import dispose_engines, engine_for

from ..conftest import create_database, drop_database
from ..test_cli import run_maestro


@pytest.fixture
def external_source(ml_env, pg18):
    """acme's rows in a database of their own; the graph reads them from there."""
    from maestro_pipelines.ml.demo import seed_demo_tenant
    from maestro_pipelines.resources.sources import PostgresDataSource

    name = create_database(pg18, "source")
    url = pg18.libpq_url(name)
    with engine_for(pg18.admin_url.set(database=name)).begin() as conn:
        seed_demo_tenant(conn, "acme")
    ml_env.resources["source"] = PostgresDataSource(url=url, table="training_rows")

    def sql(statement: str, **params):
        with engine_for(pg18.admin_url.set(database=name)).begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else None

    yield sql
    drop_database(pg18, name)


def _score(ml_env) -> dict:
    from maestro_pipelines.assets.ml import ml_assets

    result = dg.materialize(ml_assets, selection=["batch_predictions"], partition_key="acme",
                            instance=ml_env.instance, resources=ml_env.resources)
    assert result.success
    return result.asset_materializations_for_node("batch_predictions")[0].metadata


def _predictions(ml_env) -> dict[int, str]:
    return dict(ml_env.sql("SELECT p.id, p.entity_key FROM predictions p JOIN tenants t ON t.id = p.tenant_id "
                           "WHERE t.name = 'acme'"))


def test_restoring_only_the_platform_database_scores_exactly_the_rows_its_predictions_lack(
    ml_env, external_source, pg18, tmp_path
):
    """Train and score acme, back up, add rows and score them, then restore the platform
    database (alone, with `maestro restore --target live`) to the backup: its predictions
    no longer hold the new rows, and the next batch_predictions scores those rows, and only
    those (Dagster's event log, which was not restored, says they were scored already)."""
    assert ml_env.run("acme").success
    platform = ml_env.resources["platform_db"].location().platform_url.database
    (tmp_path / "store").mkdir()
    env = {"MAESTRO_DATABASE_URL": ml_env.platform_url, "MAESTRO_HOME": str(tmp_path / "home"),
           "MAESTRO_STORE_URL": (tmp_path / "store").as_uri()}
    backup = run_maestro("backup", "run", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    assert "platform" in json.loads(backup.stdout)["databases"]

    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    external_source(
        "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
        "SELECT tenant, entity_key || '-new', features, label, :later FROM training_rows WHERE tenant = 'acme' "
        "ORDER BY entity_key LIMIT 7",
        later=later,
    )
    assert _score(ml_env)["rows_scored"].value == 7

    dispose_engines()  # the restore ends every session on the platform database
    restored = run_maestro("restore", "--target", "live", "--databases", "platform", "--confirm", platform,
                           "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    dispose_engines()
    try:
        before = _predictions(ml_env)
        source_keys = {key for (key,) in external_source("SELECT entity_key FROM training_rows WHERE tenant = 'acme'")}
        missing = source_keys - set(before.values())
        assert len(missing) == 7 and all(key.endswith("-new") for key in missing)

        metadata = _score(ml_env)

        scored = [key for id_, key in _predictions(ml_env).items() if id_ not in before]
        assert sorted(scored) == sorted(missing), "the scoring after the restore did not score exactly the rows it lacked"
        assert metadata["rows_scored"].value == 7
        assert _score(ml_env)["rows_scored"].value == 0, "the rows scored after the restore were scored again"
    finally:
        cleanup = run_maestro("restore", "cleanup", "--confirm", platform, env=env)
        assert cleanup.returncode == 0, cleanup.stderr
