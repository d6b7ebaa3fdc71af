"""Materialized views model_statistics and tenant_usage_statistics.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Each has a unique index, which `REFRESH MATERIALIZED VIEW CONCURRENTLY` requires: the upkeep
assets refresh them without a lock that blocks readers.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MODEL_STATISTICS = """
CREATE MATERIALIZED VIEW model_statistics AS
SELECT
    m.id                                  AS model_id,
    m.tenant_id,
    t.name                                AS tenant_name,
    m.name                                AS model_name,
    m.status,
    coalesce(v.versions, 0)               AS versions,
    v.latest_version,
    live.model_version_id                 AS production_version_id,
    live_version.version                  AS production_version,
    live.deployed_at                      AS production_since,
    coalesce(e.experiments, 0)            AS experiments,
    coalesce(e.failed_experiments, 0)     AS failed_experiments,
    e.last_experiment_at,
    coalesce(p.predictions, 0)            AS predictions,
    p.last_prediction_at,
    now()                                 AS refreshed_at
FROM models m
JOIN tenants t ON t.id = m.tenant_id
LEFT JOIN (
    SELECT model_id, count(*) AS versions, max(version) AS latest_version
    FROM model_versions GROUP BY model_id
) v ON v.model_id = m.id
LEFT JOIN deployments live
    ON live.model_id = m.id AND live.environment = 'production' AND live.status = 'active'
LEFT JOIN model_versions live_version ON live_version.id = live.model_version_id
LEFT JOIN (
    SELECT model_id,
           count(*)                                   AS experiments,
           count(*) FILTER (WHERE status = 'failed')  AS failed_experiments,
           max(created_at)                            AS last_experiment_at
    FROM experiments WHERE model_id IS NOT NULL GROUP BY model_id
) e ON e.model_id = m.id
LEFT JOIN (
    SELECT mv.model_id, count(*) AS predictions, max(pr.created_at) AS last_prediction_at
    FROM predictions pr JOIN model_versions mv ON mv.id = pr.model_version_id
    GROUP BY mv.model_id
) p ON p.model_id = m.id;

CREATE UNIQUE INDEX model_statistics_model_id_key ON model_statistics (model_id);
CREATE INDEX model_statistics_tenant_idx ON model_statistics (tenant_id);
"""

TENANT_USAGE_STATISTICS = """
CREATE MATERIALIZED VIEW tenant_usage_statistics AS
SELECT
    t.id                                       AS tenant_id,
    t.name                                     AS tenant_name,
    t.status,
    coalesce(m.models, 0)                      AS models,
    coalesce(m.active_models, 0)               AS active_models,
    coalesce(v.model_versions, 0)              AS model_versions,
    coalesce(e.experiments, 0)                 AS experiments,
    coalesce(e.failed_experiments, 0)          AS failed_experiments,
    coalesce(d.active_deployments, 0)          AS active_deployments,
    coalesce(p.predictions, 0)                 AS predictions,
    coalesce(p.predictions_last_30_days, 0)    AS predictions_last_30_days,
    p.last_prediction_at,
    now()                                      AS refreshed_at
FROM tenants t
LEFT JOIN (
    SELECT tenant_id, count(*) AS models, count(*) FILTER (WHERE status = 'active') AS active_models
    FROM models GROUP BY tenant_id
) m ON m.tenant_id = t.id
LEFT JOIN (
    SELECT tenant_id, count(*) AS model_versions FROM model_versions GROUP BY tenant_id
) v ON v.tenant_id = t.id
LEFT JOIN (
    SELECT tenant_id, count(*) AS experiments,
           count(*) FILTER (WHERE status = 'failed') AS failed_experiments
    FROM experiments GROUP BY tenant_id
) e ON e.tenant_id = t.id
LEFT JOIN (
    SELECT tenant_id, count(*) AS active_deployments
    FROM deployments WHERE status = 'active' GROUP BY tenant_id
) d ON d.tenant_id = t.id
LEFT JOIN (
    SELECT tenant_id,
           count(*) AS predictions,
           count(*) FILTER (WHERE created_at >= now() - interval '30 days') AS predictions_last_30_days,
           max(created_at) AS last_prediction_at
    FROM predictions GROUP BY tenant_id
) p ON p.tenant_id = t.id;

CREATE UNIQUE INDEX tenant_usage_statistics_tenant_id_key ON tenant_usage_statistics (tenant_id);
"""


def upgrade() -> None:
    op.execute(MODEL_STATISTICS)
    op.execute(TENANT_USAGE_STATISTICS)


def downgrade() -> None:
    op.execute("DROP MATERIALIZED VIEW tenant_usage_statistics")
    op.execute("DROP MATERIALIZED VIEW model_statistics")
