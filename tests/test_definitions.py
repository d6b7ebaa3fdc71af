"""The code location as Dagster sees it: names, resources, import cost, the schema asset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from maestro_pipelines.assets.platform import platform_schema
from maestro_pipelines.environment import resources_for_environment
from maestro_pipelines.platform_db.migrate import head_revision
from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.resources import sources
from maestro_pipelines.settings import Settings

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
REPO_ROOT = Path(__file__).parent.parent


def definitions_snapshot(defs: dg.Definitions) -> dict[str, list[str]]:
    repo = defs.get_repository_def()
    return {
        "assets": sorted(key.to_user_string() for key in defs.resolve_all_asset_keys()),
        "asset_checks": sorted(
            f"{key.asset_key.to_user_string()}:{key.name}"
            for key in defs.resolve_asset_graph().asset_check_keys
        ),
        "jobs": sorted(job.name for job in repo.get_all_jobs() if not job.name.startswith("__")),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_every_asset_job_schedule_and_sensor_name_matches_the_snapshot():
    """A rename breaks run history, schedules' ticks and people's bookmarks: make it visible.

    After an intended change, rewrite the snapshot with MAESTRO_UPDATE_SNAPSHOTS=1 and commit it.
    """
    from maestro_pipelines.definitions import defs

    current = definitions_snapshot(defs)
    if os.environ.get("MAESTRO_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_embedded_default_and_production_pick_their_resources(tmp_path):
    embedded = resources_for_environment(Settings(home=tmp_path, database_url=None))["platform_db"]
    assert embedded.database_url is None and embedded.home == str(tmp_path)

    production = resources_for_environment(
        Settings(home=tmp_path, database_url="postgresql://u:secret@db:5432/maestro")
    )["platform_db"]
    # Passed by name, resolved at run time: the UI shows the variable, never its value.
    assert isinstance(production.database_url, dg.EnvVar)
    assert production.database_url == "MAESTRO_DATABASE_URL"

    everything = resources_for_environment(
        Settings(home=tmp_path, database_url="postgresql://u:hunter2@db:5432/maestro",
                 store_url="s3://bucket/maestro", source_url="mysql+pymysql://u:hunter2@src:3306/shop",
                 mlflow_tracking_uri="https://mlflow.internal")
    )
    assert isinstance(everything["source"], sources.MySQLDataSource)
    assert everything["source"].url == "MAESTRO_SOURCE_URL" and isinstance(everything["source"].url, dg.EnvVar)
    assert everything["mlflow"].tracking_uri == "MLFLOW_TRACKING_URI"
    assert everything["store"].url == "s3://bucket/maestro"
    assert "hunter2" not in repr(everything)


@pytest.mark.parametrize(
    "resource_class",
    [PlatformDatabase, MLflowRegistry, ObjectStoreResource, sources.PostgresDataSource, sources.MySQLDataSource,
     sources.MongoDataSource, sources.SnowflakeDataSource, sources.BigQueryDataSource],
)
def test_every_resource_field_is_described(resource_class):
    for name, field in resource_class.model_fields.items():
        assert field.description, f"{resource_class.__name__}.{name} has no description for the UI"


def test_loading_the_definitions_imports_nothing_heavy_beyond_dagster():
    """Every Dagster process loads this module: connectors and drivers must load lazily."""
    probe = (
        "import sys, dagster\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import maestro_pipelines.definitions\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["maestro_pipelines"]


def test_platform_schema_asset_migrates_and_reports(fresh_database, server):
    url = fresh_database.platform_url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = dg.materialize([platform_schema], resources={"platform_db": PlatformDatabase(database_url=url)})
    assert result.success
    metadata = result.asset_materializations_for_node("platform_schema")[0].metadata
    assert metadata["revision"].value == head_revision()
    assert metadata["previous_revision"].value == "base"
    assert metadata["server_version"].value.startswith(str(server.major_version))
    tables = {row.data["table"]: row.data for row in metadata["tables"].value.records}
    assert tables["predictions"]["partitions"] == 4
    # the password never reaches metadata
    assert (fresh_database.platform_url.password or "\0") not in json.dumps(
        {k: str(v.value) for k, v in metadata.items()}
    )


def test_dagster_finds_the_code_location_through_pyproject(tmp_path):
    """`dagster dev` with no arguments relies on [tool.dagster]; `dg` on [tool.dg]."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "MAESTRO_HOME": str(tmp_path / "home")}
    env.pop("MAESTRO_DATABASE_URL", None)
    bin_dir = Path(sys.executable).parent
    validated = subprocess.run(
        [str(bin_dir / "dagster"), "definitions", "validate"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert validated.returncode == 0, validated.stderr
    assert "Validation successful for code location maestro" in validated.stdout + validated.stderr
    checked = subprocess.run(
        [str(bin_dir / "dg"), "check", "defs"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
