"""Parsing, normalising and redacting PostgreSQL URLs."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from maestro_pipelines.errors import MaestroError

URL_FORM = "postgresql://USER:PASSWORD@HOST:5432/DATABASE"


def parse_postgres_url(raw: str, source: str) -> URL:
    """Parse a user-written PostgreSQL URL into a SQLAlchemy URL using psycopg 3.

    `source` names where the URL came from (an environment variable) so the error says
    which setting to fix. Users write libpq-style `postgresql://` or `postgres://` URLs, or
    SQLAlchemy ones with a driver; every form is mapped to the psycopg 3 driver we install.
    """
    try:
        url = make_url(raw.strip())
        url.port  # noqa: B018  (a non-numeric port fails here, not later at connect)
    except (ArgumentError, ValueError):
        raise MaestroError(
            f"{source} is not a valid database URL", f"Write it as {URL_FORM}"
        ) from None
    backend = url.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise MaestroError(
            f"{source} points at a '{backend}' database, not PostgreSQL",
            f"Maestro's platform database must be PostgreSQL 13 or newer: {URL_FORM}",
        )
    if not url.database:
        raise MaestroError(f"{source} names no database", f"Write it as {URL_FORM}")
    return url.set(drivername="postgresql+psycopg")


def redact(url: URL) -> str:
    """The URL as it may appear in logs, metadata and errors: the password hidden."""
    return url.render_as_string(hide_password=True)


def describe(url: URL) -> str:
    """Where a URL points, for humans, never with a password: `host:port/database`, or for a
    unix socket `database on socket /folder`: the folder is real (`/folder/database` is not)."""
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    if str(host).startswith("/"):
        port = url.port or url.query.get("port")
        return f"{url.database} on socket {host}" + (f" (port {port})" if port and str(port) != "5432" else "")
    return f"{host}:{url.port or 5432}/{url.database}"
