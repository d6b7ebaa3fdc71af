"""`PlatformDatabase`: the platform PostgreSQL as a Dagster resource."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from maestro_pipelines.resources.secret_fields import SECRET_FIELD
from maestro_pipelines.settings import DEFAULT_HOME, Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from maestro_pipelines.platform_db.location import DatabaseLocation
    from maestro_pipelines.platform_db.migrate import MigrationResult
    from maestro_pipelines.platform_db.status import DatabaseStatus


class PlatformDatabase(dg.ConfigurableResource):
    """The platform database (tenants, models, experiments, deployments, predictions).

    With no `database_url` it is the embedded PostgreSQL 18 under `home`, started on first
    use (or attached to when already running); with one, any PostgreSQL 13+.
    """

    database_url: Optional[str] = Field(
        default=None,
        description=(
            "URL of an external PostgreSQL 13+ (postgresql://USER:PASSWORD@HOST:5432/DB), "
            "set from the MAESTRO_DATABASE_URL environment variable so the password never "
            "shows in the UI. Empty: the embedded PostgreSQL 18 under `home`."
        ),
        json_schema_extra=SECRET_FIELD,
    )
    home: str = Field(
        default=DEFAULT_HOME,
        description="MAESTRO_HOME: folder of the embedded server's data and local state.",
    )

    _location: Optional["DatabaseLocation"] = PrivateAttr(default=None)

    def location(self) -> "DatabaseLocation":
        """Where the database lives; starts the embedded server on first call."""
        if self._location is None:
            self._location = locate_configured_database(self.home, self.database_url)
        return self._location

    def get_engine(self) -> "Engine":
        from maestro_pipelines.platform_db.connection import engine_for

        return engine_for(self.location().platform_url)

    @contextmanager
    def get_connection(self) -> Iterator["Connection"]:
        """A connection inside a transaction: committed on success, rolled back on error."""
        from maestro_pipelines.platform_db.connection import connect

        location = self.location()
        with connect(location.platform_url, location.source) as conn:
            with conn.begin():
                yield conn

    def upgrade(self, revision: str = "head") -> "MigrationResult":
        """Run the alembic migrations (creating the database if needed)."""
        from maestro_pipelines.platform_db.migrate import upgrade

        return upgrade(self.location(), revision)

    def status(self) -> "DatabaseStatus":
        from maestro_pipelines.platform_db.status import database_status

        return database_status(self.location())


def locate_configured_database(home: str, database_url: str | None) -> "DatabaseLocation":
    """The platform database a resource's `home` and `database_url` name (PlatformDatabase's,
    MLflowRegistry's): the one place a resource's fields become what the library takes."""
    from pathlib import Path

    from maestro_pipelines.platform_db import locate_platform_database

    home_path = Path(home).expanduser().resolve()
    return locate_platform_database(Settings(home=home_path, database_url=database_url or None, store_environment={}))
