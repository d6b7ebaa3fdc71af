"""Data connectors: where tenants' training rows come from, behind one interface (no Dagster).

`SourceReader` is the interface (`read_tenant_rows`, `iter_tenant_batches`,
`tenant_fingerprint`, `describe`); each connector's module (postgres, mysql, mongodb,
snowflake, bigquery) implements it and declares itself once (`CONNECTOR`), and `registry.py`
registers each with one line and routes a URL to its connector. The Dagster resources in
`maestro_pipelines.resources.sources` only hold configuration and delegate here. Importing
this package imports no driver, SQLAlchemy or pandas: each connector loads its own inside
the methods that need it.
"""

from maestro_pipelines.connectors.base import (
    SOURCE_PASSWORD_VARIABLE,
    SOURCE_URL_VARIABLE,
    ConnectorDeclaration,
    DataFingerprint,
    SourceReader,
)
from maestro_pipelines.connectors.registry import (
    CONNECTORS,
    checked_url_settings,
    connector_for_url,
    connector_named,
    open_source,
    register,
    supported_schemes,
    unregister,
)

__all__ = [
    "CONNECTORS",
    "SOURCE_PASSWORD_VARIABLE",
    "SOURCE_URL_VARIABLE",
    "ConnectorDeclaration",
    "DataFingerprint",
    "SourceReader",
    "checked_url_settings",
    "connector_for_url",
    "connector_named",
    "open_source",
    "register",
    "supported_schemes",
    "unregister",
]
