"""The ML graph end to end on the embedded PostgreSQL and a real MLflow backend."""

from __future__ import annotations

import re
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
    assert recorded.metadata["rollback"].value is True and recorded.metadata["production_version"].value == 1


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


def deployment_page(ml_env, tenant: str = "acme"):
    """The metadata of the `deployment` materialization the tenant's partition page shows."""
    return ml_env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("deployment"), asset_partitions=[tenant]), limit=1
    ).records[0].asset_materialization.metadata


def test_the_deployment_page_says_which_model_is_live_and_where_it_came_from(ml_env, monkeypatch):
    """What an ML engineer reads on `deployment`'s partition page, after a first and a second
    training: the production version, its MLflow run (the one that logged the model), the
    Dagster run that trained it, data hash, metrics, gates, when, and what it replaced."""
    monkeypatch.delenv("MAESTRO_MLFLOW_UI_URL", raising=False)
    first = ml_env.run("acme")
    assert first.success
    page = deployment_page(ml_env)
    assert page["production_version"].value == 1
    assert "replaced_version" not in page  # nothing replaced: left out, not a -1
    assert "mlflow_run" not in page and "mlflow_model_version" not in page  # no MLflow UI configured

    monkeypatch.setenv("MAESTRO_MLFLOW_UI_URL", "http://127.0.0.1:5000/")
    second = ml_env.run("acme")
    assert second.success
    page = deployment_page(ml_env)
    registry = ml_env.registry()
    live = registry.production_version("acme")
    logged = registry.client.get_run(live.run_id)
    assert page["production_version"].value == live.version == 2 and page["replaced_version"].value == 1
    assert page["mlflow_run_id"].value == live.run_id == logged.info.run_id
    assert page["trained_by_dagster_run"].value == second.run_id
    assert page["model_uri"].value == registry.model_version("acme", 2).source
    assert page["served_as"].value == "models:/maestro-acme@production"
    (data_hash, metrics), = ml_env.sql(
        "SELECT data_hash, metrics FROM model_versions v JOIN tenants t ON t.id = v.tenant_id "
        "WHERE t.name = 'acme' AND v.version = 2")
    assert page["data_hash"].value == data_hash and len(data_hash) == 64
    assert page["metrics"].value["accuracy"] == round(metrics["accuracy"], 4) > 0.8
    assert page["gates"].value["metric_floors"]["passed"] is True
    assert abs(page["deployed_at"].value - datetime.now(timezone.utc).timestamp()) < 600
    assert page["mlflow_run"].value == (
        f"http://127.0.0.1:5000/#/experiments/{logged.info.experiment_id}/runs/{live.run_id}")
    assert page["mlflow_model_version"].value == "http://127.0.0.1:5000/#/models/maestro-acme/versions/2"
    registered = second.asset_materializations_for_node("registered_model")[0].metadata
    assert registered["mlflow_run_id"].value == live.run_id

    # MLflow's run is named for the tenant and the Dagster run that trained it.
    assert logged.info.run_name == f"acme-{second.run_id}"


def test_a_rollback_shows_the_same_page_for_the_version_it_restores(ml_env):
    first = ml_env.run("acme")
    assert first.success and ml_env.run("acme").success
    result = ml_env.run("acme", job="rollback_deployment",
                        run_config={"ops": {"roll_back_deployment": {"config": {"tenant": "acme"}}}})
    assert result.success
    page = deployment_page(ml_env)
    live = ml_env.registry().production_version("acme")
    assert page["rollback"].value is True
    assert page["production_version"].value == live.version == 1 and page["replaced_version"].value == 2
    assert page["mlflow_run_id"].value == live.run_id
    assert page["trained_by_dagster_run"].value == first.run_id
    assert len(page["data_hash"].value) == 64 and "accuracy" in page["metrics"].value


def test_no_metadata_is_a_sentinel_and_no_description_a_tag(ml_env):
    """A first training: no production model to compare with, nothing replaced. The UI plots
    numbers over time, so a `-1` standing for "none" would draw as a version; the markdown
    renderer takes `<tenant>` for an HTML tag and shows "registry (maestro-)"."""
    from maestro_pipelines.definitions import defs

    result = ml_env.run("acme")
    assert result.success
    for event in result.get_asset_materialization_events():
        for key, value in event.materialization.metadata.items():
            assert value.value != -1, f"{event.asset_key.to_user_string()}: {key} is -1"
    for evaluation in result.get_asset_check_evaluations():
        for key, value in evaluation.metadata.items():
            assert value.value != -1, f"{evaluation.check_name}: {key} is -1"
    assert "production_version" not in check_results(result)["no_regression_vs_production"].metadata

    graph = defs.resolve_asset_graph()
    for node in graph.asset_nodes:
        assert not re.search(r"<[A-Za-z/]", node.description or ""), f"{node.key.to_user_string()}: {node.description}"
    for key in graph.asset_check_keys:
        description = graph.get_check_spec(key).description or ""
        assert not re.search(r"<[A-Za-z/]", description), f"{key.to_user_string()}: {description}"


def test_check_evaluations_are_recorded_under_the_tenants_partition(ml_env):
    """The UI shows a check's result on a partition's page only when the evaluation carries it."""
    result = ml_env.run("acme")
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert evaluations and {e.partition for e in evaluations} == {"acme"}
    for check in ("metric_floors", "no_regression_vs_production", "duration_within_2x_median"):
        key = dg.AssetCheckKey(dg.AssetKey("model_evaluation"), check)
        storage = ml_env.instance.event_log_storage
        [info] = storage.get_asset_check_partition_info([key], partition_keys=["acme"])
        assert info.partition_key == "acme" and info.latest_execution_status.value == "SUCCEEDED", check


def test_deploying_or_scoring_a_tenant_with_nothing_before_says_what_to_materialize_first(ml_env):
    """deployment and batch_predictions read their inputs from the platform database (no stored
    value): for a tenant never trained, each fails at once with one line, without retries."""
    from maestro_pipelines.assets.ml import ml_assets

    for asset, first in (("batch_predictions", "deployment"), ("deployment", "registered_model")):
        result = dg.materialize(ml_assets, selection=[asset], partition_key="globex", instance=ml_env.instance,
                                resources=ml_env.resources, raise_on_error=False)
        events = [e.event_type for e in result.all_events]
        assert dg.DagsterEventType.STEP_UP_FOR_RETRY not in events
        (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        message = failure.step_failure_data.user_failure_data.description
        assert message.startswith("tenant 'globex' has no ") and message.endswith(f"Materialize {first} for globex first")
