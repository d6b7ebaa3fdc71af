"""The ML graph end to end on the embedded PostgreSQL and a real MLflow backend."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.ml.registry import registry_name

ML_ASSETS = ["training_data", "features", "trained_model", "model_evaluation", "registered_model", "deployment", "batch_predictions"]
WEAK_MODEL = {"ops": {"trained_model": {"config": {"model_type": "random_forest", "n_estimators": 1, "max_depth": 1}}}}


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def check_results(result) -> dict[str, object]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_two_tenants_through_the_whole_graph(ml_env):
    rows = dict(ml_env.sql("SELECT tenant, count(*) FROM training_rows GROUP BY tenant"))
    for tenant in ("acme", "globex"):
        result = ml_env.run(tenant)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert materialized(result) == set(ML_ASSETS)
        checks = check_results(result)
        assert checks["metric_floors"].passed and checks["no_regression_vs_production"].passed

        evaluation = result.asset_materializations_for_node("model_evaluation")[0].metadata
        assert 0.8 < evaluation["accuracy"].value <= 1.0
        assert {"f1", "roc_auc"} <= evaluation.keys()
        for picture in ("confusion_matrix", "roc_curve"):
            assert evaluation[picture].value.startswith("![") and "data:image/png;base64," in evaluation[picture].value

        registry = ml_env.registry()
        live = registry.production_version(tenant)
        assert live is not None and live.version == 1
        assert live.tags["tenant"] == tenant and live.tags["dagster_run_id"] == result.run_id
        assert len(live.tags["data_hash"]) == 64
        run = registry.client.get_run(live.run_id)
        assert {"n_estimators", "model_type"} <= run.data.params.keys()
        assert {"test_accuracy", "test_f1", "test_roc_auc"} <= run.data.metrics.keys()

        (experiment_status, mlflow_run), = ml_env.sql(
            "SELECT e.status, e.mlflow_run_id FROM experiments e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = :t", t=tenant)
        assert experiment_status == "succeeded" and mlflow_run == live.run_id
        deployments = ml_env.sql(
            "SELECT v.version, d.status, d.environment, d.replicas FROM deployments d JOIN model_versions v ON v.id = d.model_version_id "
            "JOIN tenants t ON t.id = d.tenant_id WHERE t.name = :t", t=tenant)
        assert deployments == [(1, "active", "production", 2)]
        (predicted,), = ml_env.sql(
            "SELECT count(*) FROM predictions p JOIN tenants t ON t.id = p.tenant_id WHERE t.name = :t", t=tenant)
        assert predicted == rows[tenant]
        scored = result.asset_materializations_for_node("batch_predictions")[0].metadata
        assert scored["rows_scored"].value == rows[tenant] and scored["rows_per_second"].value > 0

    # Each tenant has its own model in the registry.
    names = {m.name for m in ml_env.registry().client.search_registered_models()}
    assert {registry_name("acme"), registry_name("globex")} <= names


def test_a_failed_gate_blocks_registration_and_deployment(ml_env):
    assert ml_env.run("acme").success
    ml_env.sql("UPDATE tenants SET settings = '{\"gates\": {\"accuracy\": 0.999}}' WHERE name = 'acme'")
    before = ml_env.sql("SELECT id, status FROM deployments ORDER BY id")

    result = ml_env.run("acme", run_config=WEAK_MODEL)
    assert not result.success
    done = materialized(result)
    assert {"trained_model", "model_evaluation"} <= done
    assert not done & {"registered_model", "deployment", "batch_predictions"}
    floors = check_results(result)["metric_floors"]
    assert not floors.passed and "accuracy" in floors.description and "< floor 0.999" in floors.description

    assert ml_env.registry().production_version("acme").version == 1
    assert ml_env.sql("SELECT id, status FROM deployments ORDER BY id") == before
    assert ml_env.sql("SELECT count(*) FROM model_versions")[0][0] == 1
    assert len(ml_env.registry().client.search_model_versions(f"name='{registry_name('acme')}'")) == 1


def test_a_regression_against_production_blocks_deployment(ml_env):
    assert ml_env.run("acme").success
    ml_env.sql("UPDATE tenants SET settings = '{\"gates\": {\"accuracy\": 0.1, \"f1\": 0.1, \"roc_auc\": 0.1}, \"regression_tolerance\": 0.0}' WHERE name = 'acme'")
    result = ml_env.run("acme", run_config=WEAK_MODEL)
    checks = check_results(result)
    assert checks["metric_floors"].passed
    regression = checks["no_regression_vs_production"]
    assert not regression.passed and "production" in regression.description
    assert "deployment" not in materialized(result)
    assert ml_env.registry().production_version("acme").version == 1


def test_rollback_moves_the_alias_back_and_records_it(ml_env):
    assert ml_env.run("acme").success
    assert ml_env.run("acme").success
    registry = ml_env.registry()
    assert registry.production_version("acme").version == 2

    result = ml_env.run("acme", job="rollback_deployment",
                        run_config={"ops": {"roll_back_deployment": {"config": {"tenant": "acme"}}}})
    assert result.success
    assert registry.production_version("acme").version == 1
    rows = ml_env.sql("SELECT v.version, d.status FROM deployments d JOIN model_versions v ON v.id = d.model_version_id ORDER BY d.id")
    assert rows == [(1, "retired"), (2, "rolled_back"), (1, "active")]
    recorded = ml_env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("deployment"), asset_partitions=["acme"]), limit=1
    ).records[0].asset_materialization
    assert recorded.metadata["rollback"].value is True and recorded.metadata["version"].value == 1


def test_rollback_with_a_single_version_is_refused_clearly(ml_env):
    assert ml_env.run("acme").success
    result = ml_env.run("acme", job="rollback_deployment",
                        run_config={"ops": {"roll_back_deployment": {"config": {"tenant": "acme"}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "the only one ever deployed" in failure.step_failure_data.error.message
    assert ml_env.registry().production_version("acme").version == 1


def test_batch_predictions_score_only_new_rows(ml_env):
    assert ml_env.run("acme").success
    (total,), = ml_env.sql("SELECT count(*) FROM predictions")

    def score_again():
        from maestro_pipelines.assets.ml import ml_assets

        return dg.materialize(ml_assets, selection=["batch_predictions"], partition_key="acme",
                              instance=ml_env.instance, resources=ml_env.resources)

    assert score_again().asset_materializations_for_node("batch_predictions")[0].metadata["rows_scored"].value == 0
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    ml_env.sql(
        "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
        "SELECT tenant, entity_key || '-new', features, label, :later FROM training_rows WHERE tenant = 'acme' LIMIT 7",
        later=later,
    )
    assert score_again().asset_materializations_for_node("batch_predictions")[0].metadata["rows_scored"].value == 7
    (after,), = ml_env.sql("SELECT count(*) FROM predictions")
    assert after == total + 7
