"""Snowflake source as a Dagster resource (the reading: `connectors/snowflake.py`)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from maestro_pipelines.connectors.base import SOURCE_PASSWORD_VARIABLE
from maestro_pipelines.connectors.snowflake import SNOWFLAKE_URL_FORM
from maestro_pipelines.resources.sources.base import SECRET, SQLDataSource


class SnowflakeDataSource(SQLDataSource):
    """Training rows in a Snowflake table or view."""

    connector = "snowflake"

    url: Optional[str] = Field(
        default=None,
        description=f"{SNOWFLAKE_URL_FORM} (host, port, protocol, role also as parameters), passed as "
        "dg.EnvVar(\"MAESTRO_SOURCE_URL\"). Fields below override what it says.",
        json_schema_extra=SECRET,
    )
    account: Optional[str] = Field(default=None, description="Snowflake account identifier (ORG-ACCOUNT).")
    user: Optional[str] = Field(default=None, description="Snowflake user.")
    password: Optional[str] = Field(
        default=None,
        description=f"Password when the URL has none, passed as dg.EnvVar(\"{SOURCE_PASSWORD_VARIABLE}\").",
        json_schema_extra=SECRET,
    )
    database: Optional[str] = Field(default=None, description="Database holding the table.")
    schema_name: Optional[str] = Field(default=None, description="Schema holding the table (Snowflake's default: PUBLIC).")
    warehouse: Optional[str] = Field(default=None, description="Warehouse that runs the queries.")
    role: Optional[str] = Field(default=None, description="Role to use (default: the user's default role).")
    host: Optional[str] = Field(
        default=None, description="Host to connect to instead of ACCOUNT.snowflakecomputing.com (private link, test server)."
    )
    port: Optional[int] = Field(default=None, description="Port for `host`.")
    protocol: Optional[str] = Field(default=None, description="https (default) or http (test server only).")
    connect_timeout_seconds: int = Field(default=60, description="Seconds to wait for the login to succeed.")

    def _settings(self) -> tuple[dict[str, Any], str | None]:
        """Connection settings (fields over URL) and the password, read now."""
        return self._open()._settings()
