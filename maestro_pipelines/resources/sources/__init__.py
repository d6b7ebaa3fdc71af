"""Data connectors: where tenants' training rows come from, behind one interface.

`DataSource` is what assets and sensors ask for (`source: DataSource`); the deployment picks
the backend (`environment.py`, from MAESTRO_SOURCE_URL). Importing this package imports no
driver, SQLAlchemy or pandas: each backend loads its own inside the methods that need it.
"""

from maestro_pipelines.resources.sources.base import (
    SOURCE_PASSWORD_VARIABLE,
    SOURCE_URL_VARIABLE,
    DataFingerprint,
    DataSource,
)
from maestro_pipelines.resources.sources.bigquery import BigQueryDataSource
from maestro_pipelines.resources.sources.mongodb import MongoDataSource
from maestro_pipelines.resources.sources.snowflake import SnowflakeDataSource
from maestro_pipelines.resources.sources.sql import MySQLDataSource, PostgresDataSource
from maestro_pipelines.resources.sources.urls import (
    SUPPORTED_SCHEMES,
    SourceSpec,
    source_from_environment,
    source_from_url,
    source_spec_for_url,
)

__all__ = [
    "SOURCE_PASSWORD_VARIABLE",
    "SOURCE_URL_VARIABLE",
    "SUPPORTED_SCHEMES",
    "BigQueryDataSource",
    "DataFingerprint",
    "DataSource",
    "MongoDataSource",
    "MySQLDataSource",
    "PostgresDataSource",
    "SnowflakeDataSource",
    "SourceSpec",
    "source_from_environment",
    "source_from_url",
    "source_spec_for_url",
]
