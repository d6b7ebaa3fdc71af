"""Snowflake connector through snowflake-connector-python (`pip install 'maestro-pipelines[snowflake]'`).

The connection is opened inside the methods (so loading the definitions never imports the
connector) from the reader's fields, or from a URL that holds them all:

    snowflake://USER[:PASSWORD]@ACCOUNT/DATABASE/SCHEMA?warehouse=WH&role=ROLE

`host`, `port` and `protocol` (query parameters or fields) reach the connector through
the connector's own arguments: for private endpoints and for the fakesnow test server. Values are bound with the connector's `pyformat` style (`%(name)s`); results come
through `fetch_pandas_all` / `fetch_pandas_batches` (Arrow). The session runs in UTC.

Names: Snowflake folds unquoted names to upper case, so validated names are upper-cased and
quoted (`training_rows` reads TRAINING_ROWS); columns come back lower-cased, or spelled as
you asked for them in `columns`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote, urlsplit

from maestro_pipelines.connectors.base import (
    SOURCE_PASSWORD_VARIABLE,
    ConnectorDeclaration,
    DataFingerprint,
    SQLDialect,
    SourceReader,
    check_query,
    check_tenant,
    fingerprint_sql,
    fingerprints_from_groups,
    finish_frame,
    first_line,
    grouped_fingerprint_sql,
    import_driver,
    malformed,
    read_request,
    rebatch,
    redact,
    select_sql,
    split_query,
    to_utc,
    url_fields,
)
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    import pandas as pd

SNOWFLAKE_URL_FORM = "snowflake://USER:PASSWORD@ACCOUNT/DATABASE/SCHEMA?warehouse=WAREHOUSE"
_CONNECTION_KEYS = ("account", "user", "database", "schema_name", "warehouse", "role", "host", "port", "protocol")


def parse_snowflake_url(raw: str, variable: str) -> tuple[dict[str, Any], str | None, dict[str, str]]:
    """(connection settings without the password, the password or None, Maestro's fields)."""
    try:
        parts = urlsplit(raw.strip())
        port_in_netloc = parts.port  # noqa: F841  (a non-numeric port fails here)
    except ValueError:
        raise malformed(variable, SNOWFLAKE_URL_FORM) from None
    if parts.scheme.lower() != "snowflake":
        raise malformed(variable, SNOWFLAKE_URL_FORM)
    if not parts.hostname:
        raise malformed(variable, SNOWFLAKE_URL_FORM, "names no account")
    if not parts.username:
        raise malformed(variable, SNOWFLAKE_URL_FORM, "names no user")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if len(segments) > 2:
        raise malformed(variable, SNOWFLAKE_URL_FORM, "has more than DATABASE/SCHEMA in its path")
    ours, query = split_query(parts.query)
    unknown = sorted(set(query) - {"warehouse", "role", "host", "port", "protocol"})
    if unknown:
        raise malformed(variable, SNOWFLAKE_URL_FORM, f"has unknown parameters ({', '.join(unknown)})")
    settings: dict[str, Any] = {
        # urlsplit lower-cases the host; Snowflake account identifiers are case-insensitive
        "account": parts.netloc.rpartition("@")[2].split(":")[0],
        "user": unquote(parts.username),
        "database": segments[0] if segments else None,
        "schema_name": segments[1] if len(segments) > 1 else None,
        "warehouse": query.get("warehouse") or None,
        "role": query.get("role") or None,
        "host": query.get("host") or None,
        "port": None,
        "protocol": query.get("protocol") or None,
    }
    if query.get("port"):
        if not query["port"].isdigit():
            raise malformed(variable, SNOWFLAKE_URL_FORM, "has a port that is not a number")
        settings["port"] = int(query["port"])
    if settings["protocol"] not in (None, "http", "https"):
        raise malformed(variable, SNOWFLAKE_URL_FORM, "has a protocol other than http or https")
    password = unquote(parts.password) if parts.password else None
    return settings, password, url_fields(ours, variable)


def snowflake_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """The connection settings and Maestro's from the URL: never the password."""
    settings, _, fields = parse_snowflake_url(raw, variable)
    return {**{k: v for k, v in settings.items() if v is not None}, **fields}


def _quote(part: str) -> str:
    return f'"{part.upper()}"'


SNOWFLAKE_DIALECT = SQLDialect(quote_part=_quote, placeholder=lambda name: f"%({name})s")


@dataclass(kw_only=True, eq=False, repr=False)
class SnowflakeReader(SourceReader):
    """Training rows in a Snowflake table or view. Fields set here override the URL's."""

    url: Optional[str] = None
    account: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = None  # when the URL has none
    database: Optional[str] = None
    schema_name: Optional[str] = None  # Snowflake's default: PUBLIC
    warehouse: Optional[str] = None
    role: Optional[str] = None
    host: Optional[str] = None  # instead of ACCOUNT.snowflakecomputing.com (private link, test server)
    port: Optional[int] = None
    protocol: Optional[str] = None  # https (default) or http (test server only)
    connect_timeout_seconds: int = 60

    # ---- connection ----

    def _settings(self) -> tuple[dict[str, Any], str | None]:
        """Connection settings (fields over URL) and the password."""
        from_url: dict[str, Any] = {}
        url_password = None
        if self.url:
            from_url, url_password, _ = parse_snowflake_url(self.url, self._variable)
        settings = {key: getattr(self, key) if getattr(self, key) is not None else from_url.get(key) for key in _CONNECTION_KEYS}
        password = self.password or url_password
        return settings, password

    def _connection_arguments(self) -> dict[str, Any]:
        """What `snowflake.connector.connect` gets: the session runs in UTC."""
        settings, password = self._settings()
        for needed in ("account", "user"):
            if not settings[needed]:
                raise MaestroError(f"{self._variable} names no Snowflake {needed}", f"Write it as {SNOWFLAKE_URL_FORM}")
        if not password:
            raise MaestroError(
                f"{self._variable} has no password and none is configured",
                f"Put it in the URL or in {SOURCE_PASSWORD_VARIABLE}",
            )
        arguments: dict[str, Any] = {
            "account": settings["account"], "user": settings["user"], "password": password,
            "database": settings["database"], "schema": settings["schema_name"], "warehouse": settings["warehouse"],
            "role": settings["role"], "timezone": "UTC", "login_timeout": self.connect_timeout_seconds,
        }
        arguments = {k: v for k, v in arguments.items() if v is not None}
        arguments.update({k: settings[k] for k in ("host", "port", "protocol") if settings[k] is not None})
        if settings["host"]:
            # A non-default endpoint: no out-of-band telemetry to Snowflake's own servers.
            arguments["session_parameters"] = {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False}
        return arguments

    @contextmanager
    def _cursor(self):
        connector = import_driver("snowflake.connector", "snowflake", self._variable, "Snowflake")
        from snowflake.connector.errors import Error

        arguments = self._connection_arguments()
        try:
            conn = connector.connect(**arguments)
            try:
                cursor = conn.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
            finally:
                conn.close()
        except Error as exc:
            raise self._translate(exc) from None

    def _where(self) -> str:
        settings, _ = self._settings()
        where = f"{settings['account']}/{settings['database'] or '?'}/{settings['schema_name'] or 'PUBLIC'}"
        if settings["host"]:
            where += f" via {settings['host']}:{settings['port'] or 443}"
        return where

    def _translate(self, exc: BaseException) -> MaestroError:
        settings, password = self._settings()
        source, where = self._variable, self._where()
        errno = getattr(exc, "errno", None)
        message = redact(getattr(exc, "raw_msg", None) or first_line(exc), password)
        message = re.sub(r"^\d{6} \(\w+\): ", "", message.strip()) or type(exc).__name__  # "002003 (42S02): ..."
        if errno in (250001, 250003) or "could not connect" in message.lower():
            return MaestroError(
                f"{source}: cannot reach Snowflake for {where}", f"Check the account (and host/port) in {source}"
            )
        if errno in (390100, 390101, 390102, 390144) or "incorrect username or password" in message.lower():
            return MaestroError(
                f"{source}: login failed for user '{settings['user']}' at {where}", f"Check the user and password in {source}"
            )
        if errno == 2003:
            return MaestroError(
                f"{source}: {message} ({where})", "Check the database, schema and table, and the role's grants"
            )
        if errno == 904:
            return MaestroError(
                f"{source}: {message} in table {self.table} ({where})",
                "Set the source's tenant_column/timestamp_column, or ask for existing columns",
            )
        return MaestroError(f"{source}: Snowflake refused the query at {where} ({message.splitlines()[0]})")

    # ---- queries ----

    def _table_sql(self) -> str:
        return SNOWFLAKE_DIALECT.quote(self._checked_names()[0])

    def _select(self, request) -> tuple[str, dict]:
        _, tenant_column, timestamp_column, key = self._checked_names()
        return select_sql(
            SNOWFLAKE_DIALECT, self._table_sql(), tenant_column, timestamp_column,
            (key,) if key else (), request, request.since_naive_utc,
        )

    def _names(self, frame: "pd.DataFrame", columns, description=None) -> "pd.DataFrame":
        """Columns as the caller spelled them (`columns`), else lower-case."""
        import pandas as pd

        if frame.shape[1] == 0 and description:
            frame = pd.DataFrame(columns=[d[0] for d in description])
        if columns is not None and len(columns) == frame.shape[1]:
            frame.columns = list(columns)
        else:
            frame.columns = [str(c).lower() for c in frame.columns]
        return finish_frame(frame, self.timestamp_column)

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None) -> "pd.DataFrame":
        request = read_request(tenant, columns, since, limit)
        sql, params = self._select(request)
        with self._cursor() as cursor:
            cursor.execute(sql, params)
            frame = cursor.fetch_pandas_all()
            return self._names(frame, request.columns, cursor.description)

    def _batches(self, request, batch_size: int) -> Iterator["pd.DataFrame"]:
        sql, params = self._select(request)
        with self._cursor() as cursor:
            cursor.execute(sql, params)
            # The server decides its result chunks' sizes: cut them to batch_size.
            for frame in rebatch(cursor.fetch_pandas_batches(), batch_size):
                yield self._names(frame, request.columns)

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        request = read_request(tenant)
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = fingerprint_sql(SNOWFLAKE_DIALECT, self._table_sql(), tenant_column, timestamp_column)
        with self._cursor() as cursor:
            cursor.execute(sql, {"tenant": request.tenant})
            count, newest = cursor.fetchone()
        return DataFingerprint(row_count=int(count or 0), newest=to_utc(newest) if count else None)

    def tenant_fingerprints(self, tenants, *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """Every tenant's fingerprint from one GROUP BY query."""
        tenants = [check_tenant(t) for t in tenants]
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = grouped_fingerprint_sql(SNOWFLAKE_DIALECT, self._table_sql(), tenant_column, timestamp_column)
        with self._cursor() as cursor:
            cursor.execute(sql)
            return fingerprints_from_groups(cursor.fetchall(), tenants)

    def read_query(self, sql: str, params: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """Run your own SELECT with `%(name)s` placeholders (write a literal % as %%); every
        value in `params` is bound by the connector. Tenant isolation is yours here."""
        check_query(sql, params, "%(name)s")
        with self._cursor() as cursor:
            cursor.execute(sql, dict(params) if params else None)
            frame = cursor.fetch_pandas_all()
            return self._names(frame, None, cursor.description)

    def describe(self) -> str:
        return f"Snowflake {self._where()}, table {self.table}"


def snowflake_password_variable(raw: str, variable: str) -> str | None:
    """A URL without a password takes it from MAESTRO_SOURCE_PASSWORD."""
    return SOURCE_PASSWORD_VARIABLE if parse_snowflake_url(raw, variable)[1] is None else None


CONNECTOR = ConnectorDeclaration(
    name="snowflake",
    label="Snowflake",
    schemes=("snowflake",),
    url_form=SNOWFLAKE_URL_FORM,
    url_settings=snowflake_url_settings,
    open=SnowflakeReader,
    extra="snowflake",
    drivers=("snowflake.connector",),
    password_variable=snowflake_password_variable,
)
