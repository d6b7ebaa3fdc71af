"""Engines, connection checks and the translation of driver errors into one clear line."""

from __future__ import annotations

import re
import threading

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from maestro_pipelines.errors import MaestroError, TransientError
from maestro_pipelines.platform_db.urls import describe
from maestro_pipelines.redaction import hide_secret

CONNECT_TIMEOUT_SECONDS = 10
MINIMUM_SERVER_VERSION = 130000

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: URL, connect_args: dict | None = None, **options) -> Engine:
    """One pooled engine per URL (and options) per process: SQLAlchemy engines are meant to be
    shared. PostgreSQL URLs get a connect timeout and `application_name` by default."""
    if connect_args is None and url.get_backend_name() in ("postgresql", "postgres"):
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "application_name": "maestro"}
    key = repr((url.render_as_string(hide_password=False), sorted((connect_args or {}).items()), sorted(options.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                connect_args=connect_args or {},
                **options,
            )
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (before dropping or renaming a database)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def translate_error(exc: BaseException, url: URL, source: str) -> MaestroError:
    """Turn a driver error into one line naming the setting, without the password."""
    message = hide_secret(str(getattr(exc, "orig", None) or exc), url.password)
    where = describe(url)
    user = url.username or "the current user"
    lowered = message.lower()

    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return MaestroError(
            f"{source}: password authentication failed for user '{user}' at {where}",
            f"Check the user and password in {source}",
        )
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return MaestroError(
            f"{source}: the host '{url.host}' cannot be resolved",
            f"Check the host name in {source}",
        )
    if "connection refused" in lowered or "no such file or directory" in lowered:
        # Transient: a server restarting or failing over refuses connections for a while
        # (a wrong port too: it fails after the step's retries, with the same message).
        return TransientError(
            f"{source}: nothing accepts connections at {where}",
            f"Start the server or fix the host and port in {source}",
        )
    if any(sign in lowered for sign in (
        "the database system is starting up", "the database system is shutting down",
        "the database system is in recovery mode", "the database system is not yet accepting connections",
    )):
        return TransientError(
            f"{source}: the server at {where} is starting, stopping or recovering",
            "Wait for it (a restart or failover) and try again",
        )
    if "server closed the connection unexpectedly" in lowered and "ssl" not in lowered:
        return TransientError(
            f"{source}: the server at {where} closed the connection (a restart or failover?) "
            "or did not answer as PostgreSQL",
            f"Try again once it is back; if it persists, check that the host and port in {source} are a PostgreSQL server's",
        )
    if "timeout expired" in lowered or "timed out" in lowered:
        return TransientError(
            f"{source}: no answer from {where} within {CONNECT_TIMEOUT_SECONDS} s",
            f"Check the host, port and firewall for {source}",
        )
    match = re.search(r'database "([^"]+)" does not exist', message)
    if match:
        return MaestroError(
            f"{source}: database '{match.group(1)}' does not exist at {where}",
            "New install: run `maestro db upgrade`, which creates it when the user may. Lost it: "
            "`maestro restore --target live` brings it back from the latest backup "
            "(docs/runbooks/total-database-loss.md)",
        )
    if "role" in lowered and "does not exist" in lowered:
        return MaestroError(
            f"{source}: user '{user}' does not exist at {where}", f"Check the user in {source}"
        )
    if any(
        sign in lowered
        for sign in (
            "invalid response to ssl negotiation",
            "expected authentication request",
            "server closed the connection unexpectedly",
            "unsupported frontend protocol",
            "invalid length of startup packet",
            "lost synchronization",
            "received invalid response",
        )
    ):
        return MaestroError(
            f"{source}: the server at {where} did not answer as PostgreSQL",
            f"Check that the host and port in {source} are a PostgreSQL server's",
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return MaestroError(f"{source}: cannot use the database at {where} ({first_line})")


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


def ensure_database(admin_url: URL, database: str, source: str) -> bool:
    """Create `database` on the server if it does not exist; return whether it was created."""
    try:
        with engine_for(admin_url).connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            ).scalar()
            if exists:
                return False
            conn.rollback()
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text(f'CREATE DATABASE "{_identifier(database)}"')
            )
            return True
    except DBAPIError as exc:
        if "already exists" in str(exc):  # another process created it a moment ago
            return False
        if "permission denied" in str(exc).lower():
            raise MaestroError(
                f"{source}: database '{database}' does not exist at {describe(admin_url)} "
                "and this user may not create it",
                "Create it (CREATE DATABASE) as an administrator, then run `maestro db upgrade` again",
            ) from None
        raise translate_error(exc, admin_url, source) from None


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}", name):
        raise MaestroError(f"'{name}' is not a usable database name", "Use letters, digits, _ and -")
    return name
