"""The driver layer under every connection Maestro opens: pooled SQLAlchemy engines, dedicated
psycopg connections (and the libpq parameters pg_dump and pg_restore get too), and driver
errors translated into one clear line naming the setting. `connection.py` builds on it (and
re-exports it for its callers), and so does `admin.py`."""

from __future__ import annotations

import re
import threading

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine

from maestro_pipelines.errors import MaestroError, TransientError
from maestro_pipelines.platform_db.urls import describe
from maestro_pipelines.redaction import hide_secret

CONNECT_TIMEOUT_SECONDS = 10

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
    # In this order: a message can match several (a refused SSL connection "closed unexpectedly").
    for translate in (_login_refused, _server_unreachable, _missing_database_or_user, _not_postgres):
        found = translate(message, message.lower(), url, source)
        if found is not None:
            return found
    first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return MaestroError(f"{source}: cannot use the database at {describe(url)} ({first_line})")


def _login_refused(message: str, lowered: str, url: URL, source: str) -> MaestroError | None:
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return MaestroError(
            f"{source}: password authentication failed for user '{url.username or 'the current user'}' at "
            f"{describe(url)}",
            f"Check the user and password in {source}",
        )
    return None


_SERVER_NOT_READY = (
    "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "the database system is not yet accepting connections",
)


def _server_unreachable(message: str, lowered: str, url: URL, source: str) -> MaestroError | None:
    """A name that does not resolve, or (transient) a server that is not there or not ready yet."""
    where = describe(url)
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return MaestroError(f"{source}: the host '{url.host}' cannot be resolved", f"Check the host name in {source}")
    if "connection refused" in lowered or "no such file or directory" in lowered:
        # Transient: a server restarting or failing over refuses connections for a while
        # (a wrong port too: it fails after the step's retries, with the same message).
        return TransientError(f"{source}: nothing accepts connections at {where}",
                              f"Start the server or fix the host and port in {source}")
    if any(sign in lowered for sign in _SERVER_NOT_READY):
        return TransientError(f"{source}: the server at {where} is starting, stopping or recovering",
                              "Wait for it (a restart or failover) and try again")
    if "server closed the connection unexpectedly" in lowered and "ssl" not in lowered:
        return TransientError(
            f"{source}: the server at {where} closed the connection (a restart or failover?) "
            "or did not answer as PostgreSQL",
            f"Try again once it is back; if it persists, check that the host and port in {source} are a PostgreSQL server's",
        )
    if "timeout expired" in lowered or "timed out" in lowered:
        return TransientError(f"{source}: no answer from {where} within {CONNECT_TIMEOUT_SECONDS} s",
                              f"Check the host, port and firewall for {source}")
    return None


def _missing_database_or_user(message: str, lowered: str, url: URL, source: str) -> MaestroError | None:
    match = re.search(r'database "([^"]+)" does not exist', message)
    if match:
        return MaestroError(
            f"{source}: database '{match.group(1)}' does not exist at {describe(url)}",
            "New install: run `maestro db upgrade`, which creates it when the user may. Lost it: "
            "`maestro restore --target live` brings it back from the latest backup "
            "(docs/runbooks/total-database-loss.md)",
        )
    if "role" in lowered and "does not exist" in lowered:
        return MaestroError(f"{source}: user '{url.username or 'the current user'}' does not exist at {describe(url)}",
                            f"Check the user in {source}")
    return None


_NOT_POSTGRES = (
    "invalid response to ssl negotiation",
    "expected authentication request",
    "server closed the connection unexpectedly",
    "unsupported frontend protocol",
    "invalid length of startup packet",
    "lost synchronization",
    "received invalid response",
)


def _not_postgres(message: str, lowered: str, url: URL, source: str) -> MaestroError | None:
    if any(sign in lowered for sign in _NOT_POSTGRES):
        return MaestroError(f"{source}: the server at {describe(url)} did not answer as PostgreSQL",
                            f"Check that the host and port in {source} are a PostgreSQL server's")
    return None


# libpq settings a URL's query may carry, and the environment variable each one is in libpq.
LIBPQ_QUERY_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}


def libpq_host_and_port(url: URL) -> tuple[str | None, str | None]:
    """libpq's host and port lists for `url`. A multi-host URL (`?host=a:5432&host=b:5433`,
    how a Patroni cluster or a managed failover pair is often given) becomes host `a,b` and
    port `5432,5433`: libpq reads `a:5432` as a host name, not a host and a port."""
    raw = url.host or url.query.get("host")
    if raw is None:
        return None, str(url.port) if url.port else None
    entries = list(raw) if isinstance(raw, tuple) else [raw]
    hosts, ports = [], []
    for entry in entries:
        name, sep, port = entry.rpartition(":")
        if sep and port.isdigit() and not entry.startswith("/"):
            hosts.append(name)
            ports.append(port)
        else:
            hosts.append(entry)
            ports.append(str(url.port) if url.port else "")
    if not any(ports):
        return ",".join(hosts), None
    # libpq takes one port for all hosts, or one per host; an empty entry means the default.
    return ",".join(hosts), ",".join(ports)


LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", **LIBPQ_QUERY_ENV}
"""The environment variable of each of `libpq_params`' parameters (for pg_dump and pg_restore)."""


def libpq_params(url: URL) -> dict[str, str]:
    """libpq's connection parameters for `url` but the database: host, port, user, password
    (when the URL has them) and the query's SSL and session settings."""
    params: dict[str, str] = {}
    host, port = libpq_host_and_port(url)
    if host:
        params["host"] = host
    if port:
        params["port"] = port
    if url.username:
        params["user"] = url.username
    if url.password is not None:
        params["password"] = str(url.password)
    for name in LIBPQ_QUERY_ENV:
        value = url.query.get(name)
        if value:
            params[name] = value if isinstance(value, str) else value[0]
    return params


def psycopg_connect(url: URL, *, options: str | None = None, autocommit: bool = False, source: str = "database",
                    application_name: str = "maestro-backup"):
    """A dedicated psycopg 3 connection (not pooled): for snapshots held across a dump, for
    CREATE/ALTER/DROP DATABASE and for statements that must run outside a transaction."""
    import psycopg

    params: dict[str, object] = {"dbname": url.database or "postgres", "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                                 **libpq_params(url)}
    params["application_name"] = application_name  # what pg_stat_activity shows the DBA
    if options:
        params["options"] = options
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        raise translate_error(exc, url, source) from None
