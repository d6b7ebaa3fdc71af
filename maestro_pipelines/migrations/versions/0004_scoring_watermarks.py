"""scoring_watermarks: how far `batch_predictions` has scored each tenant's rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

One row per tenant: the production model version that scored last and the newest source
row time (`updated_at`) it scored. The next scoring by the same version reads only newer rows;
a new version scores them all again. It lives here, next to the predictions it describes and
written in their transaction, so a restore of the platform database brings back the two
together: the next scoring then scores exactly the rows the restored predictions lack. (It
was in Dagster's event log, which a restore of the platform database alone does not rewind.)
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE scoring_watermarks (
            tenant_id       bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
            -- The MLflow registry version that scored (NULL: the version was unknown, so
            -- nothing is incremental after it).
            model_version   integer,
            -- The newest source row time scored; NULL: none had one, score everything next.
            scored_through  timestamptz,
            updated_at      timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE scoring_watermarks")
