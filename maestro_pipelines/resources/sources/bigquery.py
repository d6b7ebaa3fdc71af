"""BigQuery source as a Dagster resource (the reading: `connectors/bigquery.py`)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from maestro_pipelines.connectors.bigquery import BIGQUERY_URL_FORM
from maestro_pipelines.resources.sources.base import SECRET, SQLDataSource


class BigQueryDataSource(SQLDataSource):
    """Training rows in a BigQuery table or view (`table`, or `dataset.table`)."""

    connector = "bigquery"

    url: Optional[str] = Field(
        default=None,
        description=f"{BIGQUERY_URL_FORM}?location=EU (api_endpoint=http://HOST:PORT for an emulator), usually "
        "dg.EnvVar(\"MAESTRO_SOURCE_URL\"). Fields below override what it says.",
        json_schema_extra=SECRET,
    )
    project: Optional[str] = Field(default=None, description="Google Cloud project that holds the dataset and runs the queries.")
    dataset: Optional[str] = Field(default=None, description="Dataset holding the table (or write `dataset.table` as the table).")
    location: Optional[str] = Field(default=None, description="Location of the dataset (US, EU, europe-west1...). Empty: BigQuery finds it.")
    api_endpoint: Optional[str] = Field(
        default=None,
        description="Another BigQuery API endpoint (an emulator, http://HOST:PORT): no credentials are sent.",
    )
    retry_timeout_seconds: int = Field(
        default=120, description="Seconds to keep retrying an unreachable or failing API before giving up."
    )

    def teardown_after_execution(self, context) -> None:
        self.close()  # the reader holds a client (Dagster treats resources with a teardown as generators)
