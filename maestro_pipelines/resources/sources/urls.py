"""One URL, the way users write it, to the `DataSource` that reads it.

    postgresql://USER:PASSWORD@HOST:5432/DATABASE           PostgresDataSource
    mysql://USER:PASSWORD@HOST:3306/DATABASE                MySQLDataSource (also mysql+pymysql://, mariadb://)
    mongodb://USER:PASSWORD@HOST:27017/DATABASE?...         MongoDataSource (also mongodb+srv://)
    snowflake://USER[:PASSWORD]@ACCOUNT/DATABASE/SCHEMA?warehouse=WH[&role=&host=&port=&protocol=]
                                                            SnowflakeDataSource (password from the URL
                                                            or MAESTRO_SOURCE_PASSWORD)
    bigquery://PROJECT/DATASET[?location=EU&api_endpoint=http://HOST:PORT]
                                                            BigQueryDataSource

Any of them may add Maestro's own settings as query parameters: `table`, `tenant_column`,
`timestamp_column`, `key_column` (`...?table=events&tenant_column=customer`).

Two ways in:

- `source_spec_for_url(url)` checks the URL and the driver now and returns the class plus
  the settings that are safe to show (host names, project, table; never a password), so
  `environment.py` can build the resource with `url=dg.EnvVar("MAESTRO_SOURCE_URL")`: the
  resource parses its own `url` again at run time, and the UI shows only the variable name.
- `source_from_url(url)` builds the resource straight from the URL text (scripts, tests).

Nothing here imports a driver: whether one is installed is looked up on sys.path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import dagster as dg

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.sources.base import (
    SOURCE_PASSWORD_VARIABLE,
    SOURCE_URL_VARIABLE,
    DataSource,
    check_driver,
)
from maestro_pipelines.resources.sources.bigquery import BigQueryDataSource, bigquery_url_kwargs
from maestro_pipelines.resources.sources.mongodb import MongoDataSource, mongodb_url_kwargs
from maestro_pipelines.resources.sources.snowflake import SnowflakeDataSource, parse_snowflake_url, snowflake_url_kwargs
from maestro_pipelines.resources.sources.sql import MySQLDataSource, PostgresDataSource, mysql_url_kwargs, postgres_url_kwargs


class _Backend(NamedTuple):
    cls: type[DataSource]
    form: str
    extra: str | None  # pip extra that installs the driver (None: part of the base install)
    drivers: tuple[str, ...]
    label: str
    kwargs: Any  # (url, variable) -> non-secret fields


_BACKENDS = {
    "postgresql": _Backend(PostgresDataSource, "postgresql://USER:PASSWORD@HOST:5432/DATABASE", None, ("psycopg",), "PostgreSQL", postgres_url_kwargs),
    "mysql": _Backend(MySQLDataSource, "mysql://USER:PASSWORD@HOST:3306/DATABASE", "mysql", ("pymysql",), "MySQL", mysql_url_kwargs),
    "mongodb": _Backend(MongoDataSource, "mongodb://USER:PASSWORD@HOST:27017/DATABASE", "mongodb", ("pymongo",), "MongoDB", mongodb_url_kwargs),
    "snowflake": _Backend(
        SnowflakeDataSource, "snowflake://USER:PASSWORD@ACCOUNT/DATABASE/SCHEMA?warehouse=WAREHOUSE", "snowflake",
        ("snowflake.connector", "dagster_snowflake"), "Snowflake", snowflake_url_kwargs,
    ),
    "bigquery": _Backend(
        BigQueryDataSource, "bigquery://PROJECT/DATASET", "bigquery", ("google.cloud.bigquery", "db_dtypes"), "BigQuery",
        bigquery_url_kwargs,
    ),
}
# Scheme as written (before any +driver) -> backend.
_SCHEMES = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mongodb": "mongodb",
    "mongodb+srv": "mongodb",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
}
SUPPORTED_SCHEMES = ("postgresql", "mysql", "mongodb", "snowflake", "bigquery")


class SourceSpec(NamedTuple):
    """The resource class for a URL and its settings that are safe to show in the UI."""

    cls: type[DataSource]
    kwargs: dict[str, Any]
    password_variable: str | None = None
    """Set when the password is not in the URL and must come from this variable (Snowflake)."""

    def build(self, url: str | dg.EnvVar, **overrides: Any) -> DataSource:
        """The resource, `url` (text or `dg.EnvVar`) parsed again by the resource at run time."""
        secrets: dict[str, Any] = {}
        if self.password_variable and "password" not in overrides:
            secrets["password"] = dg.EnvVar(self.password_variable)
        return self.cls(url=url, **{**self.kwargs, **secrets, **overrides})


def _supported() -> str:
    return ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)


def backend_for_url(url: object, variable: str = SOURCE_URL_VARIABLE) -> _Backend:
    if not isinstance(url, str) or not url.strip():
        raise MaestroError(f"{variable} is empty", f"Set it to a URL: {_supported()}")
    scheme, sep, _ = url.strip().partition("://")
    if not sep or not scheme:
        raise MaestroError(f"{variable} is not a URL (no scheme://)", f"Write it as one of {_supported()}")
    scheme = scheme.lower()
    name = _SCHEMES.get(scheme) or _SCHEMES.get(scheme.split("+")[0])  # postgresql+psycopg2, mysql+pymysql
    if name is None:
        shown = scheme if len(scheme) <= 30 and scheme.replace("+", "").isalnum() else "?"
        raise MaestroError(f"{variable} uses the scheme '{shown}', which Maestro cannot read", f"Use one of {_supported()}")
    return _BACKENDS[name]


def source_spec_for_url(url: str, variable: str = SOURCE_URL_VARIABLE) -> SourceSpec:
    """Check `url` (form and driver) and return its class plus the non-secret settings."""
    backend = backend_for_url(url, variable)
    if backend.extra is not None:
        for driver in backend.drivers:
            check_driver(driver, backend.extra, variable, backend.label)
    kwargs = dict(backend.kwargs(url, variable))
    kwargs["url_variable"] = variable
    password_variable = None
    if backend.cls is SnowflakeDataSource and parse_snowflake_url(url, variable)[1] is None:
        password_variable = SOURCE_PASSWORD_VARIABLE
    return SourceSpec(backend.cls, kwargs, password_variable)


def source_from_url(url: str, variable: str = SOURCE_URL_VARIABLE, **fields: Any) -> DataSource:
    """The resource for `url` (the URL text itself goes into its secret `url` field);
    `fields` override the settings read from the URL (`table=...`, `key_column=...`)."""
    return source_spec_for_url(url, variable).build(url, **fields)


def source_from_environment(value: str, variable: str = SOURCE_URL_VARIABLE, **fields: Any) -> DataSource:
    """For `environment.py`: `value` is the variable's current value (checked now), the
    resource gets `url=dg.EnvVar(variable)` so the secret is read at run time only."""
    return source_spec_for_url(value, variable).build(dg.EnvVar(variable), **fields)
