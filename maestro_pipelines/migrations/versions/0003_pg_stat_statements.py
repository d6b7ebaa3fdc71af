"""pg_stat_statements, where the server has it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

The slow-query asset reads it. Creating the extension needs the module on the server and a
privileged user; its statistics need `shared_preload_libraries`. The embedded server is set up
for both. On an external server that lacks either, the migration succeeds with a warning:
the platform works, only the slow-query view stays empty.

Downgrade leaves the extension in place: it belongs to the server's administrators as much as
to Maestro, and other tools may read it.
"""

import logging

from alembic import op
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("maestro.migrations")


def warn(message: str) -> None:
    """Hand the warning to whoever runs the migration (the CLI and the Dagster asset print
    it once themselves); logged only for the `alembic` command, which prints nothing else."""
    attributes = op.get_context().config.attributes
    if "connection" in attributes:  # run by maestro_pipelines.platform_db.migrate
        attributes.setdefault("warnings", []).append(message)
    else:
        log.warning(message)


def upgrade() -> None:
    conn = op.get_bind()
    available = conn.execute(
        text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'")
    ).scalar()
    if not available:
        warn(
            "pg_stat_statements is not installed on this server: slow-query statistics are "
            "off (install the PostgreSQL contrib package to turn them on)"
        )
        return
    try:
        with conn.begin_nested():
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0]
        warn(
            f"pg_stat_statements could not be created ({reason}): slow-query statistics are "
            "off (an administrator can run CREATE EXTENSION pg_stat_statements)"
        )
        return
    # Not `SHOW shared_preload_libraries`: a managed database's user may not read it (an
    # administrator may have created the extension, making the CREATE above a no-op).
    from maestro_pipelines.platform_db.status import pg_stat_statements_state

    if pg_stat_statements_state(conn) == "created but not in shared_preload_libraries":
        warn(
            "pg_stat_statements is created but not loaded: add it to shared_preload_libraries "
            "and restart the server to collect slow-query statistics"
        )


def downgrade() -> None:
    pass
