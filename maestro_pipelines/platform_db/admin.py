"""Administering databases on a PostgreSQL server: create, drop, rename, end sessions, list.

One module for every caller (restore and its swap, the drill, cleanup, `maestro db upgrade`
creating the platform database, upkeep quoting its relations), so a name is quoted one way
and "a user that may not end another role's session" is handled one way. Statements run on
a dedicated psycopg connection to the server's `postgres` database (CREATE, DROP and ALTER
DATABASE cannot run in a transaction block nor on the database they change).

The errors say what the server refused; callers with more context (a restore's swap: where
the verified copy is) catch the specific ones and say it their way.
"""

from __future__ import annotations

import re

from sqlalchemy.engine import URL

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.driver import dispose_engines, psycopg_connect
from maestro_pipelines.platform_db.urls import describe


class DatabaseAdminError(MaestroError):
    """The server refused a CREATE, DROP or ALTER DATABASE; `detail` is its first line."""

    def __init__(self, problem: str, hint: str | None = None, detail: str = ""):
        super().__init__(problem, hint)
        self.detail = detail


class DatabaseExists(DatabaseAdminError):
    """CREATE DATABASE of a name someone else took."""


class NotPermitted(DatabaseAdminError):
    """The connecting user lacks the privilege (CREATEDB, ownership)."""


class DatabaseInUse(DatabaseAdminError):
    """A database kept open by sessions the connecting user may not end (another role's);
    `sessions` describes them ("2 sessions of postgres")."""

    def __init__(self, problem: str, hint: str | None = None, sessions: list[str] | None = None):
        super().__init__(problem, hint)
        self.sessions = sessions or []


class ClientsKeepReconnecting(DatabaseAdminError):
    """Sessions this user may end came back between ending them and the statement, every time."""


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted (any name, quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def server_url(url: URL) -> URL:
    """The same server's `postgres` database: where database-level statements run."""
    return url.set(database="postgres")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _connect(url: URL, source: str):
    return psycopg_connect(server_url(url), autocommit=True, source=source)


def server_version(url: URL, source: str) -> int:
    """`server_version_num` of the server `url` names (e.g. 180001)."""
    with _connect(url, source) as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0])


def database_names(url: URL, source: str) -> set[str]:
    """Every database on the server."""
    with _connect(url, source) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def database_sizes(url: URL, source: str) -> list[tuple[str, int | None]]:
    """(name, bytes) of every database, by name; None where the user may not connect
    (pg_database_size needs CONNECT)."""
    with _connect(url, source) as conn:
        return conn.execute(
            "SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT') THEN pg_database_size(oid) END "
            "FROM pg_database ORDER BY datname"
        ).fetchall()


def create_database(url: URL, name: str, source: str) -> None:
    """CREATE DATABASE `name`; DatabaseExists when it is taken, NotPermitted without CREATEDB."""
    import psycopg

    with _connect(url, source) as conn:
        try:
            conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation) as exc:
            # Two processes creating it at the same moment: the loser gets "already exists", or
            # when both passed the catalog check, the unique index of pg_database's names.
            raise DatabaseExists(f"Database '{name}' already exists at {describe(url)}", detail=first_line(exc)) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise NotPermitted(f"Cannot create database '{name}' at {describe(url)}: {first_line(exc)}",
                               "The user needs CREATEDB", detail=first_line(exc)) from None
        except psycopg.Error as exc:
            raise DatabaseAdminError(f"Cannot create database '{name}' at {describe(url)}: {first_line(exc)}",
                                     "The user needs CREATEDB and the server free disk space",
                                     detail=first_line(exc)) from None


def drop_database(url: URL, name: str, source: str = "database") -> None:
    """DROP DATABASE, ending its sessions first. WITH (FORCE) ends them all, but only for a
    user that may end every one of them: a managed database's user (LOGIN CREATEDB) may not
    end a superuser's session nor an autovacuum worker's. It then ends its own role's, lets
    plain DROP DATABASE stop autovacuum (the server does), and raises DatabaseInUse naming
    any other role's sessions, dropping nothing."""
    import psycopg

    dispose_engines()  # pooled connections of this process would keep it busy
    quoted = quote_ident(name)
    with _connect(url, source) as conn:
        try:
            conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            return
        except psycopg.errors.InsufficientPrivilege:
            pass  # FORCE checks every session before ending any: nothing was ended
        others: list[str] = []
        for _attempt in range(3):  # a client of ours may reconnect in between
            others = end_sessions(conn, [name])
            try:
                # Waits up to 5 s for sessions to end (one just closed is still exiting).
                conn.execute(f"DROP DATABASE IF EXISTS {quoted}")
                return
            except psycopg.errors.ObjectInUse:
                if others:
                    break
            except psycopg.Error as exc:
                raise DatabaseAdminError(f"Cannot drop '{name}' at {describe(url)}: {first_line(exc)}",
                                         "Drop it as its owner or an administrator", detail=first_line(exc)) from None
    user = url.username or "the connecting user"
    raise DatabaseInUse(
        f"'{name}' at {describe(url)} is in use by {', '.join(others) or 'clients that keep reconnecting'}, "
        f"which {user} may not end",
        "Ask them to disconnect (or an administrator to end them), then run it again",
        sessions=others,
    )


def rename_databases(url: URL, renames: list[tuple[str, str]], source: str, attempts: int = 10) -> None:
    """ALTER DATABASE ... RENAME TO for each (old, new) of `renames`, in one transaction, after
    ending the sessions on every old name (retried: a client may reconnect in between).
    DatabaseInUse: another role's sessions hold one open; ClientsKeepReconnecting: ours came
    back `attempts` times; DatabaseAdminError: the server refused (rights, a name taken)."""
    import psycopg

    dispose_engines()  # pooled connections of this process would keep them busy
    last: Exception | None = None
    for _attempt in range(attempts):
        with _connect(url, source) as conn:
            try:
                others = end_sessions(conn, [old for old, _new in renames])
                with conn.transaction():
                    for old, new in renames:
                        conn.execute(f"ALTER DATABASE {quote_ident(old)} RENAME TO {quote_ident(new)}")
                return
            except psycopg.errors.ObjectInUse as exc:  # someone reconnected between terminate and rename
                if others:  # or another role's session, which this user may not end
                    raise DatabaseInUse(f"{', '.join(others)} hold the databases open at {describe(url)}",
                                        sessions=others) from None
                last = exc
            except psycopg.Error as exc:
                raise DatabaseAdminError(f"Cannot rename databases at {describe(url)}: {first_line(exc)}",
                                         detail=first_line(exc)) from None
    raise ClientsKeepReconnecting(f"Clients keep reconnecting to the databases at {describe(url)}", detail=str(last))


def ensure_database(admin_url: URL, database: str, source: str) -> bool:
    """Create `database` on the server if it does not exist (`maestro db upgrade`, MLflow's
    backend); return whether it was created."""
    if database in database_names(admin_url, source):
        return False
    if not _USABLE_NAME.fullmatch(database):  # a name Maestro makes itself: refuse what would surprise
        raise MaestroError(f"'{database}' is not a usable database name", "Use letters, digits, _ and -")
    try:
        create_database(admin_url, database, source)
    except DatabaseExists:  # another process created it a moment ago
        return False
    except NotPermitted:
        raise MaestroError(
            f"{source}: database '{database}' does not exist at {describe(admin_url)} and this user may not create it",
            "Create it (CREATE DATABASE) as an administrator, then run `maestro db upgrade` again",
        ) from None
    return True


_USABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}")


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
