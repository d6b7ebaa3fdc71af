"""MySQL / MariaDB connector through SQLAlchemy 2 and PyMySQL (`pip install 'maestro-pipelines[mysql]'`).

    mysql://USER:PASSWORD@HOST:3306/DATABASE   (also mysql+pymysql://, mariadb://)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from maestro_pipelines.connectors.base import (
    CONNECT_TIMEOUT_SECONDS,
    URL_FIELDS,
    ConnectorDeclaration,
    SQLDialect,
    check_driver,
    first_line,
    malformed,
    redact,
    url_fields,
)
from maestro_pipelines.connectors.sql import SQLAlchemyReader
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

MYSQL_URL_FORM = "mysql://USER:PASSWORD@HOST:3306/DATABASE"
MYSQL_BACKENDS = ("mysql", "mariadb")  # also its schemes: SQLAlchemy names the backend as the scheme


def parse_mysql_url(raw: str, variable: str) -> tuple["URL", dict[str, str]]:
    """`mysql://`, `mysql+pymysql://`, `mariadb://`: (URL for PyMySQL, Maestro's fields)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw.strip())
        port = url.port  # noqa: F841  (a non-numeric port fails here)
    except (ArgumentError, ValueError):
        raise malformed(variable, MYSQL_URL_FORM) from None
    if url.get_backend_name() not in MYSQL_BACKENDS:
        raise malformed(variable, MYSQL_URL_FORM, f"is a '{url.get_backend_name()}' URL, not MySQL")
    if not url.host and "unix_socket" not in url.query:
        raise malformed(variable, MYSQL_URL_FORM, "names no host")
    if not url.database:
        raise malformed(variable, MYSQL_URL_FORM, "names no database")
    ours = {k: v for k, v in url.query.items() if k in URL_FIELDS}
    if any(isinstance(v, tuple) for v in ours.values()):
        raise malformed(variable, MYSQL_URL_FORM, "repeats a Maestro parameter")
    url = url.difference_update_query(URL_FIELDS).set(drivername="mysql+pymysql")
    if "charset" not in url.query:
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url, url_fields(ours, variable)


def _mysql_engine(url: "URL", timeout: int) -> "Engine":
    from maestro_pipelines.platform_db.connection import engine_for

    return engine_for(
        url,
        connect_args={"connect_timeout": timeout, "init_command": "SET time_zone = '+00:00'"},
        pool_recycle=3600,
    )


def _mysql_quote(part: str) -> str:
    return f"`{part}`"


# MySQL's default collations ignore case and trailing spaces ('ACME ' = 'acme'): the second
# comparison makes the tenant match byte for byte; the first keeps the index usable.
MYSQL_DIALECT = SQLDialect(
    quote_part=_mysql_quote,
    placeholder=lambda name: f":{name}",
    tenant_predicate="{column} = {value} AND CAST({column} AS BINARY) = CAST({value} AS BINARY)",
    group_key="CAST({column} AS BINARY)",
)


@dataclass(kw_only=True, eq=False, repr=False)
class MySQLReader(SQLAlchemyReader):
    """Training rows in MySQL or MariaDB, through PyMySQL (`pip install 'maestro-pipelines[mysql]'`)."""

    url: str
    connect_timeout_seconds: int = CONNECT_TIMEOUT_SECONDS

    def _url(self) -> "URL":
        return parse_mysql_url(self.url, self._variable)[0]

    def _engine(self) -> "Engine":
        check_driver("pymysql", "mysql", self._variable, "MySQL")
        return _mysql_engine(self._url(), self.connect_timeout_seconds)

    def _dialect(self) -> SQLDialect:
        return MYSQL_DIALECT

    def _prepare(self, conn: "Connection") -> None:
        from sqlalchemy import text

        # A source is only ever read: even read_query cannot write (the session runs in UTC).
        conn.execute(text("SET TRANSACTION READ ONLY"))

    def _since_value(self, since):
        return since.replace(tzinfo=None)  # the session runs in UTC

    def _translate(self, exc: BaseException) -> MaestroError:
        url = self._url()
        source, where = self._variable, _mysql_where(url)
        orig = getattr(exc, "orig", exc)
        args = getattr(orig, "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
        message = redact(str(args[1]) if len(args) > 1 else first_line(exc), url.password)
        lowered = message.lower()
        user = url.username or "the current user"
        if code in (1045, 1698):
            return MaestroError(
                f"{source}: access denied for user '{user}' at {where}", f"Check the user and password in {source}"
            )
        if code in (1044, 1142, 1143):
            return MaestroError(f"{source}: {message}", f"Grant the user in {source} SELECT on the table")
        if code == 1049:
            return MaestroError(
                f"{source}: database '{url.database}' does not exist at {where}", f"Check the database name in {source}"
            )
        if code == 1146:
            return self._no_table()
        if code == 1054:
            return MaestroError(
                f"{source}: {message} in table '{self.table}' at {where}",
                "Set the source's tenant_column/timestamp_column, or ask for existing columns",
            )
        if code in (2003, 2005, 2006, 2013):
            if "name or service not known" in lowered or "nodename nor servname" in lowered or code == 2005:
                return MaestroError(f"{source}: the host '{url.host}' cannot be resolved", f"Check the host in {source}")
            if "timed out" in lowered:
                return MaestroError(
                    f"{source}: no answer from {where} within {self.connect_timeout_seconds} s",
                    f"Check the host, port and firewall for {source}",
                )
            return MaestroError(
                f"{source}: nothing accepts MySQL connections at {where}", f"Start the server or fix the host and port in {source}"
            )
        return MaestroError(f"{source}: cannot read from MySQL at {where} ({message})")

    def _server(self) -> str:
        return _mysql_where(self._url())

    def describe(self) -> str:
        return f"MySQL {self._server()}, table {self.table}"


def _mysql_where(url: "URL") -> str:
    host = url.host or url.query.get("unix_socket") or "localhost"
    return f"{host}:{url.port or 3306}/{url.database}"


def mysql_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """Maestro's settings from the URL (`?table=`...): the rest holds the password."""
    return parse_mysql_url(raw, variable)[1]


CONNECTOR = ConnectorDeclaration(
    name="mysql",
    label="MySQL",
    schemes=MYSQL_BACKENDS,
    url_form=MYSQL_URL_FORM,
    url_settings=mysql_url_settings,
    open=MySQLReader,
    extra="mysql",
    drivers=("pymysql",),
)
