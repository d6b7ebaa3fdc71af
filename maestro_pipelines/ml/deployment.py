"""Deploying a registered version: the platform database's `deployments` rows and MLflow's
`production` alias, moved together. The `deployment` asset and the rollback job both deploy
through `deploy`, so a rollback records and serves a version exactly as a deployment does."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from maestro_pipelines.platform_db import ml_records
from maestro_pipelines.platform_db.tenants import Tenant


def deploy(
    conn: Connection, registry, tenant: Tenant, model_id: int, version: int, environment: str, replicas: int,
    dagster_run_id: str, retire_status: str = "retired",
) -> tuple[ml_records.DeploymentRecord, ml_records.VersionLineage]:
    """Make `version` the tenant's active deployment in `environment` (the previous one
    becomes `retire_status`) and, in production, point MLflow's alias `production` at it.
    The alias moves last, inside the caller's transaction: if it fails, the rows roll back.
    Returns the deployment record and the version's lineage (what its page shows)."""
    record = ml_records.deploy_version(
        conn, tenant, model_id, version, environment, replicas, dagster_run_id, retire_status=retire_status
    )
    lineage = ml_records.version_lineage(conn, model_id, record.version)
    if environment == "production":
        registry.set_production(tenant.name, version)
    return record, lineage
