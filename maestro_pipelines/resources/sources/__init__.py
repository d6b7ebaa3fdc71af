"""Data connectors as Dagster resources: where tenants' training rows come from.

`DataSource` is what assets and sensors ask for (`source: DataSource`); the deployment picks
the connector (`environment.py`, from MAESTRO_SOURCE_URL). Each resource only holds
configuration and delegates to the Dagster-free library `maestro_pipelines.connectors`.
Importing this package imports no driver, SQLAlchemy or pandas: each connector loads its
own inside the methods that need it.
"""

from maestro_pipelines.connectors.base import SOURCE_PASSWORD_VARIABLE, SOURCE_URL_VARIABLE, DataFingerprint
from maestro_pipelines.resources.sources.base import DataSource, SQLDataSource, URLDataSource
from maestro_pipelines.resources.sources.bigquery import BigQueryDataSource
from maestro_pipelines.resources.sources.mongodb import MongoDataSource
from maestro_pipelines.resources.sources.snowflake import SnowflakeDataSource
from maestro_pipelines.resources.sources.sql import MySQLDataSource, PostgresDataSource
from maestro_pipelines.resources.sources.urls import (
    SourceSpec,
    source_from_environment,
    source_from_url,
    source_spec_for_url,
)

__all__ = [
    "SOURCE_PASSWORD_VARIABLE",
    "SOURCE_URL_VARIABLE",
    "BigQueryDataSource",
    "DataFingerprint",
    "DataSource",
    "MongoDataSource",
    "MySQLDataSource",
    "PostgresDataSource",
    "SQLDataSource",
    "SnowflakeDataSource",
    "SourceSpec",
    "URLDataSource",
    "source_from_environment",
    "source_from_url",
    "source_spec_for_url",
]
