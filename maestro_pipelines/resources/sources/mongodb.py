"""MongoDB source as a Dagster resource (the reading: `connectors/mongodb.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from pydantic import Field

from maestro_pipelines.resources.sources.base import SECRET, DataSource

if TYPE_CHECKING:
    import pandas as pd


class MongoDataSource(DataSource):
    """Training rows in a MongoDB collection (`table`), one document per row."""

    connector = "mongodb"

    url: str = Field(
        description="mongodb://USER:PASSWORD@HOST:27017/DATABASE (or mongodb+srv://), passed as "
        "dg.EnvVar(\"MAESTRO_SOURCE_URL\"). Options after ? go to pymongo.",
        json_schema_extra=SECRET,
    )
    database: Optional[str] = Field(
        default=None, description="Database holding the collection. Empty: the database named in the URL."
    )
    filter: Optional[dict[str, Any]] = Field(
        default=None,
        description="Extra MongoDB query ANDed to every read, e.g. {\"deleted\": false}. It narrows the "
        "tenant's rows; it can never widen them to another tenant.",
    )
    connect_timeout_seconds: int = Field(
        default=10, description="Seconds to wait for a reachable server before giving up."
    )

    def aggregate(self, pipeline: list[dict], *, tenant: str | None = None) -> "pd.DataFrame":
        """Run an aggregation pipeline; with `tenant`, it starts with a `$match` on that tenant
        (and the configured filter), so the pipeline only ever sees the tenant's documents."""
        return self._connected().aggregate(pipeline, tenant=tenant)

    def teardown_after_execution(self, context) -> None:
        self.close()  # the reader holds a client (Dagster treats resources with a teardown as generators)
