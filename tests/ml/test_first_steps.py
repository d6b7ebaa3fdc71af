"""A new tenant's first steps end to end, as a user takes them: `maestro tenants add`, `maestro
tenants load` of a spreadsheet export (wide CSV), the tenant sensor's first training, and the
production version in `maestro tenants list`."""

from __future__ import annotations

import json

from maestro_pipelines.sensors.tenants import tenant_partitions_sensor

from ..test_cli import run_maestro
from .test_sensors import apply_partition_requests, evaluate, platform_source


def test_add_load_a_csv_and_the_first_training_deploys(ml_env, tmp_path):
    import sklearn.datasets

    wine = sklearn.datasets.load_wine(as_frame=True).frame.rename(columns={"target": "label"})
    wine.insert(0, "bottle", [f"b{i:03d}" for i in range(len(wine))])
    wine.to_csv(tmp_path / "wine.csv", index=False)  # one numeric column per feature, label, a key
    env = {"MAESTRO_DATABASE_URL": ml_env.platform_url, "MAESTRO_HOME": str(tmp_path / "home")}
    assert run_maestro("tenants", "add", "umbrella", env=env).returncode == 0
    loaded = run_maestro("tenants", "load", "umbrella", str(tmp_path / "wine.csv"), "--key", "bottle", env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded {len(wine)} rows of wine.csv into tenant umbrella" in loaded.stdout

    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    sensed, _ = evaluate(tenant_partitions_sensor, ml_env, cursor="2", platform_db=platform_db, source=source)
    (request,) = sensed.run_requests
    apply_partition_requests(ml_env, sensed)
    result = ml_env.run(request.partition_key, tags=request.tags)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    features = result.asset_materializations_for_node("features")[0].metadata
    assert features["features"].value == len(wine.columns) - 2  # every column but the key and the label

    listed = {t["name"]: t for t in json.loads(run_maestro("tenants", "list", "--json", env=env).stdout)}
    umbrella = listed["umbrella"]
    assert (umbrella["rows"], umbrella["production_version"]) == (len(wine), 1)
    assert umbrella["last_training"]["status"] == "succeeded"
    assert umbrella["last_training"]["dagster_run_id"] == result.run_id
