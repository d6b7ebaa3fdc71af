"""Where the platform database lives: the embedded server or an external PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import URL

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
from maestro_pipelines.platform_db.urls import describe, parse_postgres_url, redact
from maestro_pipelines.settings import DEFAULT_PLATFORM_DATABASE, Settings

DATABASE_URL_VARIABLE = "MAESTRO_DATABASE_URL"
MLFLOW_DATABASE_SUFFIX = "_mlflow"


@dataclass
class DatabaseLocation:
    """A PostgreSQL server and the platform database on it.

    `url_for(name)` gives a sibling database on the same server: MLflow's backend, restore
    scratch databases. `source` names the setting the URL came from, for error messages.
    """

    platform_url: URL
    source: str
    embedded: EmbeddedPostgres | None = field(default=None, repr=False)

    @property
    def database(self) -> str:
        return self.platform_url.database or DEFAULT_PLATFORM_DATABASE

    @property
    def mlflow_database(self) -> str:
        """MLflow's default backend database, beside the platform database."""
        return f"{self.database}{MLFLOW_DATABASE_SUFFIX}"

    @property
    def admin_url(self) -> URL:
        """The maintenance database `postgres`, for CREATE/DROP/RENAME DATABASE."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> URL:
        return self.platform_url.set(database=database)

    @property
    def where(self) -> str:
        """Where the data lives, for humans (no secrets)."""
        if self.embedded is not None:
            return f"embedded PostgreSQL, data in {self.embedded.pgdata}"
        return f"{describe(self.platform_url)} (from {self.source})"

    @property
    def redacted_url(self) -> str:
        return redact(self.platform_url)


def locate_platform_database(settings: Settings) -> DatabaseLocation:
    """Resolve the configured platform database, starting the embedded server if needed."""
    if settings.database_url is not None:
        url = parse_postgres_url(settings.database_url, DATABASE_URL_VARIABLE)
        return DatabaseLocation(platform_url=url, source=DATABASE_URL_VARIABLE)
    embedded = EmbeddedPostgres(settings.home, wal_archiving=settings.wal_archiving,
                                backup_keys=settings.backup_keys_identity)
    server_url = embedded.start()
    return DatabaseLocation(
        platform_url=server_url.set(database=DEFAULT_PLATFORM_DATABASE),
        source="embedded PostgreSQL",
        embedded=embedded,
    )
