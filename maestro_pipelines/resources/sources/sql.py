"""PostgreSQL and MySQL/MariaDB sources through SQLAlchemy 2 (psycopg 3, PyMySQL).

Values are bound with `text()` `:name` parameters; rows stream through server-side cursors
(`yield_per`: a named cursor on PostgreSQL, an unbuffered `SSCursor` on MySQL). Sessions run
in UTC (`SET LOCAL TIME ZONE` per transaction on PostgreSQL, `time_zone` at connect on MySQL),
so timestamp columns without a zone are read and compared as UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

from pydantic import Field, PrivateAttr

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.sources.base import (
    CONNECT_TIMEOUT_SECONDS,
    SECRET,
    SOURCE_URL_VARIABLE,
    URL_FIELDS,
    DataFingerprint,
    DataSource,
    SQLDialect,
    check_driver,
    check_identifier,
    empty_frame,
    finish_frame,
    first_line,
    fingerprint_sql,
    malformed,
    read_request,
    redact,
    resolve,
    select_sql,
    to_utc,
    url_fields,
)

if TYPE_CHECKING:
    from datetime import datetime

    import pandas as pd
    from sqlalchemy.engine import URL, Connection, Engine

    from maestro_pipelines.platform_db.location import DatabaseLocation

MYSQL_URL_FORM = "mysql://USER:PASSWORD@HOST:3306/DATABASE"
POSTGRES_URL_FORM = "postgresql://USER:PASSWORD@HOST:5432/DATABASE"


class SQLAlchemySource(DataSource):
    """What PostgreSQL and MySQL share: SQLAlchemy engines, `text()` queries, `read_query`."""

    _order_keys_cache: Optional[tuple[str, ...]] = PrivateAttr(default=None)

    # ---- per backend ----

    def _engine(self) -> "Engine":
        raise NotImplementedError

    def _dialect(self) -> SQLDialect:
        raise NotImplementedError

    def _translate(self, exc: BaseException) -> MaestroError:
        raise NotImplementedError

    def _prepare(self, conn: "Connection") -> None:
        """Per-transaction session settings."""

    def _since_value(self, since: "datetime"):
        return since

    # ---- shared ----

    @contextmanager
    def _connection(self) -> Iterator["Connection"]:
        """A read transaction; driver errors leave as one-line `MaestroError`s."""
        from sqlalchemy.exc import DBAPIError, NoSuchTableError

        engine = self._engine()
        try:
            conn = engine.connect()
        except DBAPIError as exc:
            raise self._translate(exc) from None
        try:
            with conn.begin():
                self._prepare(conn)
                yield conn
        except DBAPIError as exc:
            raise self._translate(exc) from None
        except NoSuchTableError:
            raise self._no_table() from None
        finally:
            conn.close()

    def _server(self) -> str:
        """host:port/database (or socket folder/database), for error messages."""
        raise NotImplementedError

    def _no_table(self) -> MaestroError:
        return MaestroError(
            f"{self._variable}: table '{self.table}' does not exist at {self._server()}",
            "Create it, or set the source's table",
        )

    def _table_sql(self) -> str:
        return self._dialect().quote(self._checked_names()[0])

    def _order_keys(self, conn: "Connection") -> tuple[str, ...]:
        """The tiebreak after the timestamp: key_column, else the table's primary key."""
        table, _, _, key = self._checked_names()
        if key:
            return (key,)
        if self._order_keys_cache is None:
            from sqlalchemy import inspect

            schema, _, name = table.rpartition(".")
            primary = inspect(conn).get_pk_constraint(name, schema=schema or None)
            columns = tuple(primary.get("constrained_columns") or ())
            try:
                columns = tuple(check_identifier(c, "primary key column") for c in columns)
            except MaestroError:
                columns = ()  # a name we cannot quote safely: order by the timestamp alone
            self._order_keys_cache = columns
        return self._order_keys_cache

    def _select(self, conn: "Connection", request) -> tuple[str, dict]:
        _, tenant_column, timestamp_column, _ = self._checked_names()
        since = self._since_value(request.since) if request.since is not None else None
        return select_sql(
            self._dialect(), self._table_sql(), tenant_column, timestamp_column, self._order_keys(conn), request, since
        )

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None) -> "pd.DataFrame":
        import pandas as pd
        from sqlalchemy import text

        request = read_request(tenant, columns, since, limit)
        self._checked_names()
        with self._connection() as conn:
            sql, params = self._select(conn, request)
            result = conn.execute(text(sql), params)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        return finish_frame(frame, self.timestamp_column)

    def _batches(self, request, batch_size: int) -> Iterator["pd.DataFrame"]:
        import pandas as pd
        from sqlalchemy import text

        with self._connection() as conn:
            sql, params = self._select(conn, request)
            result = conn.execution_options(yield_per=batch_size).execute(text(sql), params)
            keys = list(result.keys())
            for rows in result.partitions(batch_size):
                yield finish_frame(pd.DataFrame(rows, columns=keys), self.timestamp_column)

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        from sqlalchemy import text

        request = read_request(tenant)
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = fingerprint_sql(self._dialect(), self._table_sql(), tenant_column, timestamp_column)
        with self._connection() as conn:
            count, newest = conn.execute(text(sql), {"tenant": request.tenant}).one()
        return DataFingerprint(row_count=int(count), newest=to_utc(newest) if count else None)

    def read_query(self, sql: str, params: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """Run your own SELECT with `:name` placeholders; every value in `params` is bound.

        It runs in a read-only transaction. Tenant isolation is yours here: filter on the
        tenant with a bound `:tenant`.
        """
        import pandas as pd
        from sqlalchemy import text

        if not isinstance(sql, str) or not sql.strip():
            raise MaestroError("read_query needs the SQL text as a non-empty string")
        if params is not None and not isinstance(params, Mapping):
            raise MaestroError(
                f"read_query params must be a mapping of names to values, not {type(params).__name__}",
                "Write :name in the SQL and pass {'name': value}",
            )
        with self._connection() as conn:
            result = conn.execute(text(sql), dict(params or {}))
            if not result.returns_rows:
                return empty_frame(None)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        return finish_frame(frame, self.timestamp_column)


# ---- PostgreSQL ---------------------------------------------------------------------------------


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


class PostgresDataSource(SQLAlchemySource):
    """Training rows in PostgreSQL: an external server, or by default the platform database
    itself (the embedded PostgreSQL 18 under MAESTRO_HOME, or MAESTRO_DATABASE_URL)."""

    url: Optional[str] = Field(
        default=None,
        description="postgresql://USER:PASSWORD@HOST:5432/DATABASE, passed as dg.EnvVar(\"MAESTRO_SOURCE_URL\"). "
        "Empty: the platform database (MAESTRO_DATABASE_URL, or the embedded PostgreSQL under `home`).",
        json_schema_extra=SECRET,
    )
    home: Optional[str] = Field(
        default=None,
        description="MAESTRO_HOME of the embedded platform database, used when `url` is empty "
        "(empty: the MAESTRO_HOME setting).",
    )

    _location: Optional["DatabaseLocation"] = PrivateAttr(default=None)

    def _where(self) -> tuple["URL", str]:
        """(URL, name of the setting it came from)."""
        url = resolve(self.url)
        if url:
            return parse_postgres_source_url(url, self._variable)[0], self._variable
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

    def _table_exists(self) -> bool:
        from sqlalchemy import text

        with self._connection() as conn:
            return conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": self._table_sql()}).scalar_one()

    def describe(self) -> str:
        url, _ = self._where()
        where = self._location.where if self._location is not None and not resolve(self.url) else self._server()
        return f"PostgreSQL {where}, table {self.table}"


# ---- MySQL / MariaDB ----------------------------------------------------------------------------

MYSQL_BACKENDS = ("mysql", "mariadb")



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
)


class MySQLDataSource(SQLAlchemySource):
    """Training rows in MySQL or MariaDB, through PyMySQL (`pip install 'maestro-pipelines[mysql]'`)."""

    url: str = Field(
        description="mysql://USER:PASSWORD@HOST:3306/DATABASE (or mysql+pymysql://, mariadb://), passed as "
        "dg.EnvVar(\"MAESTRO_SOURCE_URL\").",
        json_schema_extra=SECRET,
    )
    connect_timeout_seconds: int = Field(
        default=CONNECT_TIMEOUT_SECONDS, description="Seconds to wait for the server to accept a connection."
    )

    def _url(self) -> "URL":
        return parse_mysql_url(resolve(self.url), self._variable)[0]

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


def mysql_url_kwargs(raw: str, variable: str) -> dict[str, Any]:
    """Non-secret settings from a MySQL URL, for `source_spec_for_url`."""
    return parse_mysql_url(raw, variable)[1]


def postgres_url_kwargs(raw: str, variable: str) -> dict[str, Any]:
    return parse_postgres_source_url(raw, variable)[1]


__all__ = [
    "MySQLDataSource",
    "PostgresDataSource",
    "SQLAlchemySource",
    "parse_mysql_url",
    "parse_postgres_source_url",
]
