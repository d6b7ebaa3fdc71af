"""Connecting to Maestro's databases: a pooled connection with its errors in one line
(`connect`), the server's version checked (`check_server`), the database created when missing
(`ensure_database`, `admin.py`'s). The engines, psycopg connections and error translation
underneath are `driver.py`'s, re-exported here for the callers that import them from here."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.admin import ensure_database
from maestro_pipelines.platform_db.driver import (
    CONNECT_TIMEOUT_SECONDS,
    LIBPQ_ENV,
    LIBPQ_QUERY_ENV,
    dispose_engines,
    engine_for,
    libpq_host_and_port,
    libpq_params,
    psycopg_connect,
    translate_error,
)
from maestro_pipelines.platform_db.urls import describe

MINIMUM_SERVER_VERSION = 130000

__all__ = [
    "CONNECT_TIMEOUT_SECONDS", "LIBPQ_ENV", "LIBPQ_QUERY_ENV", "MINIMUM_SERVER_VERSION", "check_server", "connect",
    "dispose_engines", "engine_for", "ensure_database", "libpq_host_and_port", "libpq_params", "psycopg_connect",
    "translate_error",
]


def connect(url: URL, source: str) -> Connection:
    """Open a connection, translating failures to a `MaestroError`."""
    try:
        return engine_for(url).connect()
    except DBAPIError as exc:
        raise translate_error(exc, url, source) from None


def check_server(url: URL, source: str) -> int:
    """Connect and refuse servers older than PostgreSQL 13; return `server_version_num`."""
    with connect(url, source) as conn:
        version_num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
        if version_num < MINIMUM_SERVER_VERSION:
            version = conn.execute(text("SHOW server_version")).scalar_one()
            raise MaestroError(
                f"{source}: the server at {describe(url)} runs PostgreSQL {version}",
                "Maestro needs PostgreSQL 13 or newer",
            )
        return version_num
