"""PostgreSQL connector through SQLAlchemy 2 and psycopg 3 (part of the base install).

    postgresql://USER:PASSWORD@HOST:5432/DATABASE   (also postgres://, postgresql+psycopg2://)

With no URL it reads the platform database itself (the embedded PostgreSQL 18 under
MAESTRO_HOME, or MAESTRO_DATABASE_URL), located the way `PlatformDatabase` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from maestro_pipelines.connectors.base import (
    SOURCE_URL_VARIABLE,
    URL_FIELDS,
    ConnectorDeclaration,
    NO_ROWS,
    DataFingerprint,
    SQLDialect,
    check_tenant,
    first_line,
    malformed,
    redact,
    url_fields,
)
from maestro_pipelines.connectors.sql import SQLAlchemyReader
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

    from maestro_pipelines.platform_db.location import DatabaseLocation

POSTGRES_URL_FORM = "postgresql://USER:PASSWORD@HOST:5432/DATABASE"


def _postgres_quote(part: str) -> str:
    return f'"{part}"'


POSTGRES_DIALECT = SQLDialect(quote_part=_postgres_quote, placeholder=lambda name: f":{name}")


def parse_postgres_source_url(raw: str, variable: str) -> tuple["URL", dict[str, str]]:
    """(SQLAlchemy URL for psycopg 3 without Maestro's parameters, Maestro's fields)."""
    from maestro_pipelines.platform_db.urls import parse_postgres_url

    try:
        url = parse_postgres_url(raw, variable)
    except ValueError:  # SQLAlchemy parses the port lazily: postgresql://h:xx/db
        raise malformed(variable, POSTGRES_URL_FORM) from None
    ours = {k: v for k, v in url.query.items() if k in URL_FIELDS}
    if any(isinstance(v, tuple) for v in ours.values()):
        raise malformed(variable, POSTGRES_URL_FORM, "repeats a Maestro parameter")
    return url.difference_update_query(URL_FIELDS), url_fields(ours, variable)


@dataclass(kw_only=True, eq=False, repr=False)
class PostgresReader(SQLAlchemyReader):
    """Training rows in PostgreSQL: an external server, or by default the platform database
    itself (the embedded PostgreSQL 18 under MAESTRO_HOME, or MAESTRO_DATABASE_URL)."""

    url: Optional[str] = None  # empty: the platform database
    home: Optional[str] = None  # MAESTRO_HOME of the embedded platform database, when url is empty

    _location: Optional["DatabaseLocation"] = field(default=None, init=False)

    def _where(self) -> tuple["URL", str]:
        """(URL, name of the setting it came from)."""
        if self.url:
            return parse_postgres_source_url(self.url, self._variable)[0], self._variable
        if self._location is None:
            from dataclasses import replace
            from pathlib import Path

            from maestro_pipelines.platform_db import locate_platform_database
            from maestro_pipelines.settings import load_settings

            settings = load_settings()
            if self.home:
                settings = replace(settings, home=Path(self.home).expanduser().resolve())
            self._location = locate_platform_database(settings)
        return self._location.platform_url, self._location.source

    def _engine(self) -> "Engine":
        from maestro_pipelines.platform_db.connection import engine_for

        return engine_for(self._where()[0])

    def _dialect(self) -> SQLDialect:
        return POSTGRES_DIALECT

    def _prepare(self, conn: "Connection") -> None:
        from sqlalchemy import text

        # A source is only ever read: even read_query cannot write. Timestamps in UTC.
        conn.execute(text("SET TRANSACTION READ ONLY"))
        conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))

    def _translate(self, exc: BaseException) -> MaestroError:
        from maestro_pipelines.platform_db.connection import translate_error
        from maestro_pipelines.platform_db.urls import describe

        url, source = self._where()
        sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
        detail = redact(first_line(exc), url.password)
        if sqlstate == "42P01":
            return MaestroError(f"{source}: {detail} at {describe(url)}", "Create the table, or set the source's table")
        if sqlstate == "42703":
            return MaestroError(
                f"{source}: {detail} in table '{self.table}' at {describe(url)}",
                "Set the source's tenant_column/timestamp_column, or ask for existing columns",
            )
        error = translate_error(exc, url, source)
        if "does not exist" in error.problem and "database" in error.problem:
            return MaestroError(error.problem, f"Check the database name in {source}")
        return error

    def _server(self) -> str:
        from maestro_pipelines.platform_db.urls import describe

        return describe(self._where()[0])

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        if self._variable != SOURCE_URL_VARIABLE and not self._table_exists():
            # The platform database's training_rows is created by the first load (`maestro
            # tenants load`, `maestro demo`): before that, every tenant has no rows yet.
            return DataFingerprint(row_count=0, newest=None)
        return super().tenant_fingerprint(tenant)

    def tenant_fingerprints(self, tenants, *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        if self._variable != SOURCE_URL_VARIABLE and not self._table_exists():
            return {check_tenant(t): NO_ROWS for t in tenants}  # no load yet: no rows (as above)
        return super().tenant_fingerprints(tenants, deadline=deadline)

    def _table_exists(self) -> bool:
        from sqlalchemy import text

        with self._connection() as conn:
            return conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": self._table_sql()}).scalar_one()

    def describe(self) -> str:
        url, _ = self._where()
        where = self._location.where if self._location is not None and not self.url else self._server()
        return f"PostgreSQL {where}, table {self.table}"


def postgres_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """Maestro's settings from the URL (`?table=`...): the rest holds the password."""
    return parse_postgres_source_url(raw, variable)[1]


CONNECTOR = ConnectorDeclaration(
    name="postgresql",
    label="PostgreSQL",
    schemes=("postgresql", "postgres"),
    url_form=POSTGRES_URL_FORM,
    url_settings=postgres_url_settings,
    open=PostgresReader,
    drivers=("psycopg",),
)
