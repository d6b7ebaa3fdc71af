"""`DataSource`: the data connectors as thin Dagster resources.

A resource only holds configuration (typed, described fields, credentials as
`dg.EnvVar`) and delegates to its connector in `maestro_pipelines.connectors`, which
does all the reading, URL parsing and error wording. A resource class names its connector
(`connector = "mysql"`) and has one field per keyword its reader takes; `_open()` resolves
the fields and hands them over. `URLDataSource` serves any registered connector from its
URL alone, so a new connector works without a resource class of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from maestro_pipelines.connectors.base import DEFAULT_BATCH_SIZE, SOURCE_URL_VARIABLE, DataFingerprint, SourceReader
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.secret_fields import SECRET_FIELD, is_secret_field

if TYPE_CHECKING:
    import pandas as pd

    from maestro_pipelines.connectors.base import ConnectorDeclaration

SECRET = SECRET_FIELD  # a credential field: shown by EnvVar name only (see secret_fields)


def resolve(value: Any) -> Any:
    """A field's value: a `dg.EnvVar` is read here when the resource is used outside a run
    (inside a run Dagster has already resolved it)."""
    if isinstance(value, dg.EnvVar):
        resolved = value.get_value()
        if resolved is None or not resolved.strip():
            raise MaestroError(f"{value.env_var_name} is not set", f"Set {value.env_var_name} in the environment")
        return resolved.strip()
    return value


class DataSource(dg.ConfigurableResource):
    """Where tenants' training rows live: one table (or view, or collection) with a tenant
    column and a timestamp column. Subclasses: PostgreSQL, MySQL, MongoDB, Snowflake, BigQuery,
    and `URLDataSource` for any registered connector.
    """

    connector: ClassVar[Optional[str]] = None
    """Name of the registered connector this resource configures (`ConnectorDeclaration.name`)."""

    table: str = Field(
        default="training_rows",
        description="Table, view or collection holding the training rows (`schema.table` allowed).",
    )
    tenant_column: str = Field(
        default="tenant", description="Column holding the tenant's name; every read filters on it."
    )
    timestamp_column: str = Field(
        default="updated_at",
        description="Column holding each row's last change (UTC if the column has no zone): orders rows, "
        "filters `since` and dates the fingerprint.",
    )
    key_column: Optional[str] = Field(
        default=None,
        description="Unique column ordering rows that share a timestamp, e.g. `id`. Empty: the table's "
        "primary key where the database has one (MongoDB: `_id`), else the timestamp alone.",
    )
    url_variable: str = Field(
        default=SOURCE_URL_VARIABLE,
        description="Name of the environment variable the connection settings come from; errors name it.",
    )

    _reader: Optional[SourceReader] = PrivateAttr(default=None)

    # ---- opening the connector ----

    def _declaration(self) -> "ConnectorDeclaration":
        from maestro_pipelines.connectors.registry import connector_named

        if self.connector is None:
            raise MaestroError(f"{type(self).__name__} names no connector", "Set connector = '<name>' on the class")
        return connector_named(self.connector)

    def _reader_fields(self) -> dict[str, Any]:
        """Every field, an EnvVar read now (outside a run): the reader's keyword arguments."""
        return {name: resolve(getattr(self, name)) for name in type(self).model_fields}

    def _open(self) -> SourceReader:
        """A new reader over this configuration."""
        return self._declaration().open(**self._reader_fields())

    def _connected(self) -> SourceReader:
        """The reader the methods below share (a client it holds lives until `close`)."""
        if self._reader is None:
            self._reader = self._open()
        return self._reader

    @contextmanager
    def get_connection(self) -> Iterator[SourceReader]:
        """A reader of its own, closed on exit: `with source.get_connection() as reader: ...`."""
        reader = self._open()
        try:
            yield reader
        finally:
            reader.close()

    # ---- the interface assets and sensors call ----

    def read_tenant_rows(
        self, tenant: str, *, columns: list[str] | None = None, since: datetime | None = None, limit: int | None = None
    ) -> "pd.DataFrame":
        """The tenant's rows, oldest first (`SourceReader.read_tenant_rows`)."""
        return self._connected().read_tenant_rows(tenant, columns=columns, since=since, limit=limit)

    def iter_tenant_batches(
        self,
        tenant: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        columns: list[str] | None = None,
        since: datetime | None = None,
    ) -> Iterator["pd.DataFrame"]:
        """The same rows in bounded frames, streamed (`SourceReader.iter_tenant_batches`)."""
        return self._connected().iter_tenant_batches(tenant, batch_size=batch_size, columns=columns, since=since)

    def tenant_fingerprint(self, tenant: str) -> DataFingerprint:
        """Row count and newest timestamp (`SourceReader.tenant_fingerprint`)."""
        return self._connected().tenant_fingerprint(tenant)

    def tenant_fingerprints(self, tenants: list[str], *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """Many tenants' fingerprints, one grouped query where the backend allows
        (`SourceReader.tenant_fingerprints`; tenants not reached by `deadline` are absent)."""
        return self._connected().tenant_fingerprints(tenants, deadline=deadline)

    def describe(self) -> str:
        """Where the rows come from, never a password (`SourceReader.describe`)."""
        return self._connected().describe()

    def close(self) -> None:
        """Close the shared reader's client, if it holds one (the next call opens a new one)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __repr_args__(self):
        """repr() and str() mask secret fields (an EnvVar shows its name, never a value)."""
        for name, value in super().__repr_args__():
            field = type(self).model_fields.get(name) if name else None
            if field is not None and is_secret_field(field) and value is not None:
                value = f"EnvVar({value.env_var_name!r})" if isinstance(value, dg.EnvVar) else "***"
            yield name, value


class SQLDataSource(DataSource):
    """A connector that also runs your own SELECT (`read_query`)."""

    def read_query(self, sql: str, params: Optional[dict[str, Any]] = None) -> "pd.DataFrame":
        """Run your own SELECT; every value in `params` is bound, in the connector's placeholder
        style (`:name` PostgreSQL and MySQL, `%(name)s` Snowflake, `@name` BigQuery). Tenant
        isolation is yours here: filter on a bound tenant."""
        return self._connected().read_query(sql, params)


class URLDataSource(DataSource):
    """Any registered connector, configured by its URL alone (the connector the URL's scheme
    names reads it); for connectors without a resource class of their own."""

    url: str = Field(
        description="The connector's URL (scheme://...), passed as dg.EnvVar(\"MAESTRO_SOURCE_URL\"); "
        "its query may set table, tenant_column, timestamp_column, key_column.",
        json_schema_extra=SECRET,
    )

    def _declaration(self) -> "ConnectorDeclaration":
        from maestro_pipelines.connectors.registry import connector_for_url

        return connector_for_url(resolve(self.url), self._variable)

    def _open(self) -> SourceReader:
        """The connector's own settings come from the URL (this class has no fields for them)."""
        fields = self._reader_fields()
        declaration = self._declaration()
        return declaration.open(**{**declaration.url_settings(fields["url"], self._variable), **fields})

    @property
    def _variable(self) -> str:
        return self.url_variable or SOURCE_URL_VARIABLE


def resource_class_for(declaration: "ConnectorDeclaration") -> type[DataSource]:
    """The resource class that names `declaration` (`connector = ...`), else `URLDataSource`."""
    found: list[type[DataSource]] = []
    pending = list(DataSource.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__dict__.get("connector") == declaration.name:
            found.append(cls)
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        raise MaestroError(f"connector '{declaration.name}' is named by more than one resource class ({names})")
    return found[0] if found else URLDataSource
