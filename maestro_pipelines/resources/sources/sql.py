"""PostgreSQL and MySQL/MariaDB sources as Dagster resources (the reading: `connectors/postgres.py`,
`connectors/mysql.py`)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from maestro_pipelines.connectors.base import CONNECT_TIMEOUT_SECONDS
from maestro_pipelines.resources.sources.base import SECRET, SQLDataSource


class PostgresDataSource(SQLDataSource):
    """Training rows in PostgreSQL: an external server, or by default the platform database
    itself (the embedded PostgreSQL 18 under MAESTRO_HOME, or MAESTRO_DATABASE_URL)."""

    connector = "postgresql"

    url: Optional[str] = Field(
        default=None,
        description="postgresql://USER:PASSWORD@HOST:5432/DATABASE, passed as dg.EnvVar(\"MAESTRO_SOURCE_URL\"). "
        "Empty: the platform database (MAESTRO_DATABASE_URL, or the embedded PostgreSQL under `home`).",
        json_schema_extra=SECRET,
    )
    home: Optional[str] = Field(
        default=None,
        description="MAESTRO_HOME of the embedded platform database, used when `url` is empty "
        "(empty: the MAESTRO_HOME setting).",
    )


class MySQLDataSource(SQLDataSource):
    """Training rows in MySQL or MariaDB, through PyMySQL (`pip install 'maestro-pipelines[mysql]'`)."""

    connector = "mysql"

    url: str = Field(
        description="mysql://USER:PASSWORD@HOST:3306/DATABASE (or mysql+pymysql://, mariadb://), passed as "
        "dg.EnvVar(\"MAESTRO_SOURCE_URL\").",
        json_schema_extra=SECRET,
    )
    connect_timeout_seconds: int = Field(
        default=CONNECT_TIMEOUT_SECONDS, description="Seconds to wait for the server to accept a connection."
    )
