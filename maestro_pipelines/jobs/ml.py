"""Jobs of the ML graph: train-and-deploy one tenant, and roll its deployment back."""

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.ml import deployment_metadata, ml_assets
from maestro_pipelines.dagster_support import NETWORK_RETRY, PLATFORM_DATABASE_POOL, run_tags
from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.resources import MLflowRegistry, PlatformDatabase
from maestro_pipelines.resources.cache import CacheResource

# One tenant's graph is a chain of small steps: they run one after another in the run's own
# process (the run worker), which has imported the code location, MLflow and scikit-learn
# once. The multiprocess executor started a process per step (14 for one tenant, each
# importing all that again): 65 s instead of about 10 s through the daemon. Tenants train in
# parallel as concurrent runs (the queued run coordinator's `maestro/kind: training` limit),
# each in a run worker process or a Kubernetes pod. See benchmarks/daemon_path.py.
train_and_deploy_job = dg.define_asset_job(
    "train_and_deploy",
    selection=dg.AssetSelection.assets(*ml_assets),
    description="The whole ML graph for one tenant: data to batch predictions, gated by the quality checks.",
    tags=run_tags("training"),
    executor_def=dg.in_process_executor,
)


class RollbackConfig(dg.Config):
    tenant: str = Field(description="Tenant whose production model goes back to the version deployed before.")
    environment: str = Field(default="production", description="Deployment environment to roll back.")
    replicas: int = Field(default=2, ge=0, description="Replicas recorded for the restored deployment.")


@dg.op(retry_policy=NETWORK_RETRY, pool=PLATFORM_DATABASE_POOL)
@fail_fast_on_user_errors
def roll_back_deployment(context: dg.OpExecutionContext, config: RollbackConfig,
                         platform_db: PlatformDatabase, mlflow: MLflowRegistry, cache: CacheResource) -> None:
    """Move alias `production` back to the previous version and record the rollback."""
    from maestro_pipelines.ml.deployment import deploy
    from maestro_pipelines.platform_db import ml_records
    from maestro_pipelines.platform_db.tenants import get_tenant

    registry = mlflow.registry()
    with platform_db.get_connection() as conn:
        tenant = get_tenant(conn, config.tenant)
        model_id = ml_records.ensure_model(conn, tenant)
        target = ml_records.rollback_target(conn, model_id, config.environment)
        record, lineage = deploy(
            conn, registry, tenant, model_id, target, config.environment, config.replicas, context.run.run_id,
            retire_status="rolled_back",
        )
    context.log.info(f"{tenant.registry_name}: production {record.previous_version} -> {target} (rollback)")
    # As after a deployment: what was cached for the tenant described the version rolled back.
    invalidated = cache.invalidate_tenant(tenant.name, context.log)
    # The deployment asset's state changed: say so on its partition, so Dagit tells the truth.
    context.log_event(
        dg.AssetMaterialization(
            asset_key="deployment",
            partition=tenant.name,
            description=f"rolled back from version {record.previous_version} to {target}",
            # The same page as after a deployment: the version now live and where it came from.
            metadata={**deployment_metadata(registry, tenant.name, record, lineage), "rollback": True,
                      "cache_invalidated": invalidated},
        )
    )


@dg.job(tags=run_tags("deployment"), description="Roll a tenant's production model back to the version deployed before it.")
def rollback_deployment():
    roll_back_deployment()
