"""The ML graph, one partition per tenant: data -> features -> model -> evaluation (gated)
-> registry -> deployment -> batch predictions.

Each asset is a thin Dagster wrapper: the work is in `maestro_pipelines.ml` (features,
training, evaluation, MLflow) and `maestro_pipelines.platform_db` (the records), imported
inside the functions so loading the definitions stays cheap.

Values between the assets go through the `io_manager` (`StoredValuesIOManager`: the object
store's `values/`, so any machine's step reads them): training rows and features as Parquet,
the trained model and its evaluation as JSON records (the model itself is MLflow's, loaded by
its URI). `registered_model`, `deployment` and `batch_predictions` store no value: their
consumers read the registered version and the active deployment from the platform database
(their home), so a restore of the databases and the stored values never disagree.
"""

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.dagster_support import NETWORK_RETRY, PLATFORM_DATABASE_POOL, frame_table
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.ml.gates import METRIC_FLOORS_CHECK, NO_REGRESSION_CHECK
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.profiling import profile_when_tagged
from maestro_pipelines.resources import MLflowRegistry, PlatformDatabase
from maestro_pipelines.resources.cache import CacheResource
from maestro_pipelines.resources.sources import DataSource

ML_GROUP = "ml"
PREVIEW_ROWS = 10


def ml_asset(**kwargs):
    """An asset of the ML graph: group `ml`, one partition per tenant, user errors fail fast,
    profiled when its run has the tag `maestro/profile` (see `maestro_pipelines.profiling`)."""

    def decorate(fn):
        body = fail_fast_on_user_errors(profile_when_tagged(fn))
        return dg.asset(group_name=ML_GROUP, partitions_def=tenant_partitions, **kwargs)(body)

    return decorate


class FeatureConfig(dg.Config):
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.9, description="Share of rows held out for evaluation (by a hash of each row's key, so stable as data grows).")
    label_column: str = Field(default="label", description="Column holding the class to predict.")


class TrainingConfig(dg.Config):
    model_type: Literal["random_forest", "gradient_boosting", "logistic_regression"] = Field(
        default="random_forest", description="scikit-learn estimator (after a StandardScaler)."
    )
    n_estimators: int = Field(default=100, ge=1, le=5000, description="Trees (random_forest, gradient_boosting).")
    max_depth: Optional[int] = Field(default=None, ge=1, description="Tree depth limit; empty = unlimited (gradient_boosting: 3).")
    learning_rate: float = Field(default=0.1, gt=0, description="gradient_boosting only.")
    regularization_c: float = Field(default=1.0, gt=0, description="Inverse regularization strength (logistic_regression).")
    random_state: int = Field(default=42, description="Seed: the same data and config give the same model.")


class DeploymentConfig(dg.Config):
    environment: str = Field(default="production", description="Deployment environment recorded in `deployments`.")
    replicas: int = Field(default=2, ge=0, le=1000, description="Serving replicas recorded for this deployment.")


@dataclass
class TrainedModel:
    """What `trained_model` stores (JSON): the model itself is in MLflow, at `model_uri`."""

    tenant: str
    mlflow_run_id: str
    model_uri: str
    params: dict
    data_hash: str
    feature_names: list[str]


@dataclass
class ModelEvaluation:
    """What `model_evaluation` stores (JSON; a metric that is not a number is stored as null)."""

    tenant: str
    mlflow_run_id: str
    metrics: dict[str, Optional[float]]
    gates: dict[str, dict] = field(default_factory=dict)


def _tenant(context, platform_db: PlatformDatabase):
    from maestro_pipelines.platform_db.tenants import get_tenant

    with platform_db.get_connection() as conn:
        tenant = get_tenant(conn, context.partition_key)
    if tenant.status != "active":
        from maestro_pipelines.errors import MaestroError

        raise MaestroError(f"tenant '{tenant.name}' is {tenant.status}", "Reactivate it before training")
    return tenant


@ml_asset(
    kinds={"python", "pandas"},
    retry_policy=NETWORK_RETRY,
    description="The tenant's training rows, read from the configured data source (MAESTRO_SOURCE_URL).",
)
def training_data(context: dg.AssetExecutionContext, source: DataSource, platform_db: PlatformDatabase):
    tenant = _tenant(context, platform_db)
    started = time.perf_counter()
    # Counted before the read: the data version names rows at least as old as those read, so
    # rows changing meanwhile bring one more retraining (retraining_sensor), never none.
    fingerprint = source.tenant_fingerprint(tenant.name)
    rows = source.read_tenant_rows(tenant.name)
    seconds = time.perf_counter() - started
    if rows.empty:
        from maestro_pipelines.errors import MaestroError

        raise MaestroError(
            f"the data source has no rows for tenant '{tenant.name}'",
            f"Load them with `maestro tenants load {tenant.name} FILE` (CSV or Parquet: feature columns and `label`), "
            "or, with MAESTRO_SOURCE_URL, add the tenant's rows to that table",
        )
    context.log.info(f"read {len(rows):,} rows for {tenant.name} in {seconds:.2f} s")
    schema = dg.TableSchema(columns=[dg.TableColumn(str(c), str(t)) for c, t in rows.dtypes.items()])
    preview = rows.head(PREVIEW_ROWS).copy()
    if "features" in preview.columns:  # one JSON object per row: show it as text
        preview["features"] = preview["features"].map(lambda v: str(v)[:120])
    return dg.Output(
        rows,
        data_version=dg.DataVersion(fingerprint.tag),
        metadata={
            "dagster/row_count": len(rows),
            "dagster/column_schema": schema,
            "preview": frame_table(preview),
            "read_seconds": round(seconds, 3),
        },
    )


@ml_asset(kinds={"python", "pandas"},
          description="Deterministic train/test split of the tenant's rows, with feature statistics.")
def features(context: dg.AssetExecutionContext, config: FeatureConfig, training_data):
    from maestro_pipelines.ml.features import build_feature_set, feature_statistics

    feature_set = build_feature_set(context.partition_key, training_data, config.label_column, config.test_fraction)
    return dg.Output(
        feature_set,
        metadata={
            "train_rows": len(feature_set.X_train),
            "test_rows": len(feature_set.X_test),
            "features": len(feature_set.feature_names),
            "classes": dg.MetadataValue.json([str(c) for c in feature_set.classes]),
            "data_hash": feature_set.data_hash,
            "feature_statistics": frame_table(feature_statistics(feature_set.X_train)),
        },
    )


# No pool: its two short writes hold no connection during the fit and the MLflow logging, and
# with the pool's one slot concurrent trainings took turns on the fit (29-68 s waits measured).
@ml_asset(kinds={"scikitlearn", "mlflow"},
          retry_policy=NETWORK_RETRY,
          description="A scikit-learn model trained on the split; the MLflow run and an `experiments` row record it.")
def trained_model(context: dg.AssetExecutionContext, config: TrainingConfig, features,
                  platform_db: PlatformDatabase, mlflow: MLflowRegistry):
    from maestro_pipelines.ml.registry import training_run_name
    from maestro_pipelines.ml.training import ModelParams, build_estimator
    from maestro_pipelines.platform_db import ml_records

    tenant = _tenant(context, platform_db)
    params = ModelParams(**config.model_dump())
    run_name = training_run_name(tenant.name, context.run.run_id)
    with platform_db.get_connection() as conn:
        model_id = ml_records.ensure_model(conn, tenant)
        experiment_id = ml_records.start_experiment(
            conn, tenant, model_id, run_name, context.run.run_id, params.as_params()
        )
    try:
        started = time.perf_counter()
        model = build_estimator(params).fit(features.X_train, features.y_train)
        fit_seconds = time.perf_counter() - started
        train_accuracy = float(model.score(features.X_train, features.y_train))
        run_id, model_uri = mlflow.registry().log_training_run(
            tenant.name, model, params.as_params(), features.X_train.head(5),
            tags={"tenant": tenant.name, "data_hash": features.data_hash, "dagster_run_id": context.run.run_id},
            metrics={"train_accuracy": train_accuracy, "fit_seconds": fit_seconds}, run_name=run_name,
        )
    except Exception as exc:
        with platform_db.get_connection() as conn:
            ml_records.finish_experiment(conn, experiment_id, "failed", error=str(exc)[:2000])
        raise
    with platform_db.get_connection() as conn:
        ml_records.finish_experiment(conn, experiment_id, "succeeded", run_id, {"train_accuracy": train_accuracy})
    return dg.Output(
        TrainedModel(tenant.name, run_id, model_uri, params.as_params(), features.data_hash, features.feature_names),
        metadata={
            "mlflow_run_id": run_id,
            "mlflow_run_name": run_name,
            **_mlflow_run_link(mlflow.registry(), run_id),
            "model_uri": model_uri,
            "train_accuracy": round(train_accuracy, 4),
            "fit_seconds": round(fit_seconds, 3),
            "params": dg.MetadataValue.json(params.as_params()),
            "experiment_id": experiment_id,
        },
    )


def tenant_check_spec(name: str, asset: str, **kwargs) -> dg.AssetCheckSpec:
    """A check of one tenant's partition: without the asset's partitions, Dagster records the
    evaluation with no partition and the UI shows it on none of the tenants' pages."""
    with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, asset=asset, partitions_def=tenant_partitions, **kwargs)


@ml_asset(
    kinds={"scikitlearn", "mlflow"},
    retry_policy=NETWORK_RETRY,
    description="Held-out accuracy, F1 and ROC AUC with confusion matrix and ROC curve; the quality gates.",
    check_specs=[
        tenant_check_spec(METRIC_FLOORS_CHECK, "model_evaluation", blocking=True,
                          description="Every metric reaches the tenant's floor (tenants.settings.gates)."),
        tenant_check_spec(NO_REGRESSION_CHECK, "model_evaluation", blocking=True,
                          description="No metric falls below the production model's by more than the tenant's tolerance."),
    ],
)
def model_evaluation(context: dg.AssetExecutionContext, trained_model: TrainedModel, features,
                     platform_db: PlatformDatabase, mlflow: MLflowRegistry):
    from maestro_pipelines.ml.evaluation import evaluate, markdown_image
    from maestro_pipelines.ml.gates import judge_gates
    from maestro_pipelines.platform_db import ml_records

    tenant = _tenant(context, platform_db)
    registry = mlflow.registry()
    # From MLflow's artifacts (the object store), where trained_model logged it: not pickled beside it.
    model = registry.load_model(trained_model.model_uri, f"trained_model for {tenant.name}")
    evaluation = evaluate(model, features.X_test, features.y_test, features.classes)
    registry.log_evaluation(trained_model.mlflow_run_id, evaluation.metrics, evaluation.pictures)
    with platform_db.get_connection() as conn:
        ml_records.add_experiment_metrics(conn, trained_model.mlflow_run_id, {f"test_{k}": v for k, v in evaluation.metrics.items() if not math.isnan(v)})

    production = registry.production_version(tenant.name)
    verdict = judge_gates(
        evaluation.metrics, tenant.gates, tenant.regression_tolerance,
        production.version if production else None,
        registry.run_metrics(production.run_id) if production and production.run_id else None,
    )
    metrics_md = {k: (round(v, 4) if not math.isnan(v) else "n/a") for k, v in evaluation.metrics.items()}
    yield dg.Output(
        ModelEvaluation(tenant.name, trained_model.mlflow_run_id, evaluation.metrics, verdict.results()),
        metadata={
            **{k: dg.MetadataValue.float(v) for k, v in evaluation.metrics.items() if not math.isnan(v)},
            "test_rows": evaluation.test_rows,
            "confusion_matrix": dg.MetadataValue.md(markdown_image(evaluation.pictures["confusion_matrix"], "confusion matrix")),
            "roc_curve": dg.MetadataValue.md(markdown_image(evaluation.pictures["roc_curve"], "ROC curve")),
            "metrics": dg.MetadataValue.json(metrics_md),
        },
    )
    yield dg.AssetCheckResult(
        check_name=METRIC_FLOORS_CHECK,
        passed=verdict.floors_passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.floors_summary(),
        metadata={"floors": dg.MetadataValue.json(verdict.floors), "metrics": dg.MetadataValue.json(metrics_md)},
    )
    yield dg.AssetCheckResult(
        check_name=NO_REGRESSION_CHECK,
        passed=verdict.no_regression,
        severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.regression_summary(),
        # No production model yet: no version at all (a -1 would be plotted as one).
        metadata={**({"production_version": production.version} if production else {}),
                  "production_metrics": dg.MetadataValue.json({k: round(v, 4) for k, v in verdict.baseline.items()}),
                  "tolerance": tenant.regression_tolerance},
    )


@ml_asset(kinds={"mlflow"}, retry_policy=NETWORK_RETRY,
          description="A new version of the tenant's model in the MLflow registry (`maestro-` and the tenant's name), "
                      "tagged with tenant, data hash and Dagster run id, and its `model_versions` row. Stores no "
                      "value: the registry and the platform database are its home.")
def registered_model(context: dg.AssetExecutionContext, trained_model: TrainedModel, model_evaluation: ModelEvaluation,
                     platform_db: PlatformDatabase, mlflow: MLflowRegistry) -> dg.MaterializeResult:
    from maestro_pipelines.platform_db import ml_records

    tenant = _tenant(context, platform_db)
    registry = mlflow.registry()
    tags = {"tenant": tenant.name, "data_hash": trained_model.data_hash, "dagster_run_id": context.run.run_id}
    version = registry.register(tenant.name, trained_model.model_uri, trained_model.mlflow_run_id, tags)
    with platform_db.get_connection() as conn:
        model_id = ml_records.ensure_model(conn, tenant)
        model_version_id = ml_records.record_model_version(
            conn, tenant, model_id, version.version, trained_model.mlflow_run_id, trained_model.data_hash,
            _numbers(model_evaluation.metrics), model_evaluation.gates,
        )
    metadata: dict[str, Any] = {
        "registered_model": version.name, "version": version.version, "mlflow_run_id": trained_model.mlflow_run_id,
        **_mlflow_run_link(registry, trained_model.mlflow_run_id, tenant.name, version.version),
        "tags": dg.MetadataValue.json(tags),
    }
    return dg.MaterializeResult(metadata={**metadata, "model_version_id": model_version_id})


def _numbers(metrics: dict[str, Optional[float]]) -> dict[str, float]:
    """The metrics that are numbers (a stored evaluation keeps NaN as null)."""
    return {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}


@ml_asset(kinds={"mlflow", "postgres"},
          retry_policy=NETWORK_RETRY, pool=PLATFORM_DATABASE_POOL,
          description="The tenant's live model: alias `production` moved to the new version and a `deployments` row "
                      "written (the previous one retired). Each partition's page tells which version is live and "
                      "where it came from: MLflow run, training Dagster run, data hash, metrics, gates, what it replaced. "
                      "Deploys the version registered_model recorded last (platform database); stores no value.",
          deps=[registered_model])
def deployment(context: dg.AssetExecutionContext, config: DeploymentConfig,
               platform_db: PlatformDatabase, mlflow: MLflowRegistry, cache: CacheResource) -> dg.MaterializeResult:
    from maestro_pipelines.ml.deployment import deploy
    from maestro_pipelines.platform_db import ml_records

    tenant = _tenant(context, platform_db)
    registry = mlflow.registry()
    # One transaction: if moving the alias fails, the deployment rows roll back with it.
    with platform_db.get_connection() as conn:
        model_id = ml_records.ensure_model(conn, tenant)
        version = ml_records.newest_registered_version(conn, model_id)
        if version is None:
            raise MaestroError(f"tenant '{tenant.name}' has no registered model version in the platform database",
                               f"Materialize registered_model for {tenant.name} first")
        record, lineage = deploy(
            conn, registry, tenant, model_id, version, config.environment, config.replicas, context.run.run_id,
        )
    context.log.info(f"{tenant.registry_name}: production {record.previous_version} -> {record.version}")
    invalidated = 0
    if config.environment == "production":  # the alias moved
        invalidated = cache.invalidate_tenant(tenant.name, context.log)
    return dg.MaterializeResult(
        metadata={**deployment_metadata(registry, tenant.name, record, lineage), "cache_invalidated": invalidated},
    )


def deployment_metadata(registry, tenant: str, record, lineage) -> dict[str, Any]:
    """What a deployment's partition page shows: the version live in its environment and where
    it came from. Written by the `deployment` asset and by a rollback, so the page is the same
    after either. A value that does not exist (nothing replaced) is left out, not a sentinel."""
    registered = registry.model_version(tenant, record.version)
    run_id = registered.run_id or lineage.mlflow_run_id
    metadata: dict[str, Any] = {f"{record.environment}_version": record.version}
    if record.previous_version is not None:
        metadata["replaced_version"] = record.previous_version
    if run_id:
        metadata["mlflow_run_id"] = run_id
        metadata.update(_mlflow_run_link(registry, run_id, tenant, record.version))
    if registered.source:
        metadata["model_uri"] = registered.source
    if record.environment == "production":
        metadata["served_as"] = f"models:/{registered.name}@production"
    if lineage.trained_by_dagster_run_id:
        metadata["trained_by_dagster_run"] = dg.MetadataValue.dagster_run(lineage.trained_by_dagster_run_id)
    if lineage.data_hash:
        metadata["data_hash"] = lineage.data_hash
    metadata["metrics"] = dg.MetadataValue.json(
        {k: round(v, 4) for k, v in lineage.metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
    )
    metadata["gates"] = dg.MetadataValue.json(lineage.gate_results)
    metadata["deployed_at"] = dg.MetadataValue.timestamp(record.deployed_at)
    metadata.update({"environment": record.environment, "replicas": record.replicas, "deployment_id": record.id})
    return metadata


def _mlflow_run_link(registry, run_id: str, tenant: Optional[str] = None, version: Optional[int] = None) -> dict:
    """Links to the MLflow UI's run page (and the model version's) when its address is known
    (MAESTRO_MLFLOW_UI_URL, or an http(s) tracking server); nothing otherwise."""
    from maestro_pipelines.ml.registry import model_version_page
    from maestro_pipelines.settings import load_settings

    ui_url = registry.ui_url(load_settings().mlflow_ui_url)
    if ui_url is None:
        return {}
    links = {"mlflow_run": dg.MetadataValue.url(registry.run_page(ui_url, run_id))}
    if version is not None:
        links["mlflow_model_version"] = dg.MetadataValue.url(model_version_page(ui_url, tenant, version))
    return links


@ml_asset(kinds={"postgres"},
          retry_policy=NETWORK_RETRY, pool=PLATFORM_DATABASE_POOL,
          description="The tenant's new rows scored with its production model (`models:/maestro-TENANT@production`), "
                      "written to `predictions` with COPY, under its active deployment (platform database).",
          deps=[deployment])
def batch_predictions(context: dg.AssetExecutionContext, source: DataSource,
                      platform_db: PlatformDatabase, mlflow: MLflowRegistry, cache: CacheResource) -> dg.MaterializeResult:
    from maestro_pipelines.ml.scoring import prediction_cache_prefix, score_and_copy
    from maestro_pipelines.platform_db import ml_records

    tenant = _tenant(context, platform_db)
    with platform_db.get_connection() as conn:
        _active_deployment(conn, tenant)  # before loading a model: none deployed is one line, not MLflow's error
    cached = cache.cache(context.log)
    model, model_source, live = _production_model(mlflow.registry(), cached, tenant.name)
    live_version = live.version if live else None
    started = time.perf_counter()
    with platform_db.get_connection() as conn:
        previous = _scored_through(conn, tenant.id, live_version)
        active = _active_deployment(conn, tenant)
        batches = source.iter_tenant_batches(tenant.name, since=previous)
        scored = score_and_copy(
            conn, model, batches, tenant.id, active.model_version_id, active.id, cache=cached,
            cache_prefix=prediction_cache_prefix(tenant.name, live.version, live.run_id) if live else None,
        )
        # In the predictions' transaction: a restore of the platform database brings both back together.
        ml_records.record_scoring_watermark(conn, tenant.id, live_version, scored.watermark or previous)
    seconds = time.perf_counter() - started
    counters = cached.counters()
    cached.close()
    context.log.info(
        f"scored {scored.written:,} rows for {tenant.name} with version {live_version or '?'} in {seconds:.2f} s "
        f"({scored.predicted:,} predicted, {scored.from_cache:,} from the cache; model {model_source}; "
        f"cache hit rate {counters.hit_rate:.0%}, redis {cached.redis_state})"
    )
    through = scored.watermark or previous
    return dg.MaterializeResult(
        metadata={
            "rows_scored": scored.written,
            **({"model_version": live_version} if live else {}),  # no sentinel: it would be plotted
            "seconds": round(seconds, 3),
            "rows_per_second": round(scored.written / seconds, 1) if seconds > 0 else 0.0,
            "scored_through": through.isoformat() if through else "",
            "incremental_since": previous.isoformat() if previous else "all rows",
            "rows_predicted": scored.predicted,
            "rows_from_cache": scored.from_cache,
            "model_from": model_source,
            **_cache_metadata(cache, cached, counters),
        }
    )


def _active_deployment(conn, tenant):
    """The tenant's active production deployment (platform database: its home, not a stored value)."""
    from maestro_pipelines.platform_db import ml_records

    active = ml_records.active_deployment(conn, ml_records.ensure_model(conn, tenant))
    if active is None:
        raise MaestroError(f"tenant '{tenant.name}' has no active production deployment in the platform database",
                           f"Materialize deployment for {tenant.name} first")
    return active


def _production_model(registry, cached, tenant: str):
    """(the tenant's production model, where it came from: `l1`, `l2` or `loaded`, its
    registered version or None). A version's model is loaded from MLflow once, then served
    from the cache."""
    from maestro_pipelines.ml.scoring import load_model_cached, model_cache_key

    live = registry.production_version(tenant)
    if live is None:
        return registry.load_production_model(tenant), "loaded", None
    key = model_cache_key(tenant, live.version, live.run_id)
    model, model_source = load_model_cached(cached, key, lambda: registry.load_production_model(tenant))
    if model_source == "loaded":
        moved = registry.production_version(tenant)
        if moved is None or moved.version != live.version:  # the alias moved while loading
            cached.delete(key)
            live = moved
    return model, model_source, live


def _cache_metadata(cache: CacheResource, cached, counters) -> dict[str, Any]:
    return {
        "cache_l1_hits": counters.l1_hits,
        "cache_l2_hits": counters.l2_hits,
        "cache_misses": counters.misses,
        "cache_hit_rate": dg.MetadataValue.float(round(counters.hit_rate, 4)),
        "cache_l1_hit_rate": dg.MetadataValue.float(round(counters.l1_hit_rate, 4)),
        "cache_l2_hit_rate": dg.MetadataValue.float(round(counters.l2_hit_rate, 4)),
        "cache_redis": cached.redis_state,
        "cache_redis_at": cache.redis_location(),
        "cache_redis_errors": counters.redis_errors,
        "cache": dg.MetadataValue.json(counters.as_dict()),
    }


def _scored_through(conn, tenant_id: int, live_version: Optional[int]):
    """Where this scoring starts: after the rows the same model version scored last (the
    platform database's `scoring_watermarks`, next to the predictions); None scores every row
    (the first scoring, a new version, or predictions from before migration 0004: scoring them
    all once again adds duplicates of old predictions, where guessing from Dagster's event log
    could skip rows after a restore of the platform database alone)."""
    from maestro_pipelines.platform_db import ml_records

    watermark = ml_records.scoring_watermark(conn, tenant_id)
    return watermark.since_for(live_version) if watermark is not None else None


ml_assets = [training_data, features, trained_model, model_evaluation, registered_model, deployment, batch_predictions]
