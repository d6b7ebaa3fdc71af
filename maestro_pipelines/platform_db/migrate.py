"""Running the alembic migrations from code (CLI, Dagster asset, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.admin import ensure_database
from maestro_pipelines.platform_db.connection import (
    check_server,
    connect,
    translate_error,
)
from maestro_pipelines.platform_db.location import DatabaseLocation

# Held for the duration of a migration so two processes (two workers, the CLI and a Dagster
# run) never migrate the same database at once; the second waits, then finds nothing to do.
MIGRATION_LOCK_KEY = 0x6D61657374726F  # "maestro"


@dataclass
class MigrationResult:
    before: str | None
    after: str | None
    created_database: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _alembic_config(connection: Connection | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "maestro_pipelines:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def revision_history() -> list[str]:
    """Every revision id, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def current_revision(conn: Connection) -> str | None:
    exists = conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
    if not exists:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def prepare_database(location: DatabaseLocation) -> bool:
    """Make sure the server is usable and the platform database exists; return if created."""
    if location.embedded is not None:
        created = ensure_database(location.admin_url, location.database, location.source)
        check_server(location.platform_url, location.source)
        return created
    try:
        check_server(location.platform_url, location.source)
        return False
    except MaestroError:
        # Only a missing database is ours to fix; any other problem is re-raised as it was.
        try:
            with connect(location.admin_url, location.source) as conn:
                exists = conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": location.database}
                ).scalar()
        except MaestroError:
            exists = True
        if exists:
            raise
        created = ensure_database(location.admin_url, location.database, location.source)
        check_server(location.platform_url, location.source)
        return created


def _run(location: DatabaseLocation, action: str, revision: str) -> MigrationResult:
    from alembic import command

    created = prepare_database(location) if action == "upgrade" else False
    with connect(location.platform_url, location.source) as conn:
        try:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()
            before = current_revision(conn)
            conn.commit()
            config = _alembic_config(conn)
            getattr(command, action)(config, revision)
            conn.commit()
            after = current_revision(conn)
            return MigrationResult(before, after, created, list(config.attributes.get("warnings", [])))
        except DBAPIError as exc:
            conn.rollback()
            raise translate_error(exc, location.platform_url, location.source) from None
        finally:
            # The lock is the session's: closing the connection releases it too, so a
            # failure here (connection lost) leaves nothing held.
            try:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()
            except DBAPIError:
                conn.invalidate()


def upgrade(location: DatabaseLocation, revision: str = "head") -> MigrationResult:
    """Bring the platform database to `revision` (creating the database if needed)."""
    return _run(location, "upgrade", revision)


def downgrade(location: DatabaseLocation, revision: str) -> MigrationResult:
    """Take the platform database back to `revision` (`base` drops every Maestro object)."""
    return _run(location, "downgrade", revision)
