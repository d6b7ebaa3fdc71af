"""Adding a connector: its own module (here, this test module) and one registration line.

The `memrows` connector below reads rows from an in-memory table: a fake that stands in for
a real connector only to test the registration mechanism (a URL scheme routed to it, its
URL rules, its missing-driver message, the thin Dagster resource reading through it). Every
real connector is tested against its real server in test_data_sources.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
import pytest

from maestro_pipelines.connectors import ConnectorDeclaration, DataFingerprint, SourceReader, register, unregister
from maestro_pipelines.connectors import base
from maestro_pipelines.connectors.base import finish_frame, malformed, rebatch, read_request, split_query, url_fields
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.sources import DataSource, URLDataSource, source_from_url, source_spec_for_url

START = datetime(2024, 5, 1, tzinfo=timezone.utc)
TABLES: dict[str, list[dict[str, Any]]] = {
    "events": [
        {"id": i, "tenant": "acme" if i % 3 else "globex", "f1": i * 0.5, "updated_at": START + timedelta(minutes=i)}
        for i in range(30)
    ]
}


def memrows_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """memrows://NAME[?table=...]: no password, the NAME is shown."""
    name, _, query = raw.strip().partition("://")[2].partition("?")
    if not name:
        raise malformed(variable, "memrows://NAME", "names no store")
    return {"store": name, **url_fields(split_query(query)[0], variable)}


@dataclass(kw_only=True, eq=False, repr=False)
class MemoryReader(SourceReader):
    url: str
    store: str | None = None

    def _rows(self, request) -> list[dict[str, Any]]:
        table, tenant_column, timestamp_column, _ = self._checked_names()
        rows = [r for r in TABLES.get(table, []) if r[tenant_column] == request.tenant]
        rows = [r for r in rows if request.since is None or r[timestamp_column] > request.since]
        rows.sort(key=lambda r: (r[timestamp_column], r["id"]))
        return rows[: request.limit] if request.limit is not None else rows

    def _frame(self, rows, columns) -> Any:
        import pandas as pd

        frame = pd.DataFrame(rows, columns=list(columns) if columns else list(TABLES["events"][0]))
        return finish_frame(frame, self.timestamp_column)

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None):
        request = read_request(tenant, columns, since, limit)
        return self._frame(self._rows(request), request.columns)

    def _batches(self, request, batch_size: int) -> Iterator[Any]:
        yield from rebatch([self._frame(self._rows(request), request.columns)], batch_size)

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        rows = self._rows(read_request(tenant))
        return DataFingerprint(len(rows), rows[-1]["updated_at"] if rows else None)

    def describe(self) -> str:
        return f"memory store {self.store}, table {self.table}"


MEMROWS = ConnectorDeclaration(
    name="memrows", label="MemRows", schemes=("memrows",), url_form="memrows://NAME",
    url_settings=memrows_url_settings, open=MemoryReader, extra="memrows", drivers=("json",),
)


@pytest.fixture
def memrows():
    register(MEMROWS)  # the one line a new connector adds to maestro_pipelines/connectors/registry.py
    yield
    unregister("memrows")


def test_a_registered_connector_is_found_by_its_scheme_and_read_through_the_resource(memrows):
    source = source_from_url("memrows://demo?table=events")
    assert type(source) is URLDataSource and isinstance(source, DataSource)
    assert source.table == "events" and source.url == "memrows://demo?table=events"

    acme = [r for r in TABLES["events"] if r["tenant"] == "acme"]
    frame = source.read_tenant_rows("acme", columns=["id", "updated_at"])
    assert frame["id"].tolist() == [r["id"] for r in acme]
    assert str(frame["updated_at"].dtype) == "datetime64[ns, UTC]"
    assert source.tenant_fingerprint("acme") == DataFingerprint(len(acme), acme[-1]["updated_at"])
    # A connector without a grouped query still answers the sensors' many-tenant question, one by one,
    # until the deadline (time.monotonic()): the tenants not reached are absent, to ask next tick.
    assert source.tenant_fingerprints(["acme", "initech"]) == {"acme": source.tenant_fingerprint("acme"),
                                                               "initech": DataFingerprint(0, None)}
    assert source.tenant_fingerprints(["acme", "globex"], deadline=0.0) == {}
    assert [len(b) for b in source.iter_tenant_batches("acme", batch_size=8)] == [8, 8, 4]
    with source.get_connection() as reader:
        assert isinstance(reader, MemoryReader) and reader.store == "demo"
        assert len(reader.read_tenant_rows("globex", since=START)) == 9  # the row at START is not newer
    with pytest.raises(MaestroError, match="the tenant must be a string"):
        source.read_tenant_rows({"$ne": None})

    @dg.asset
    def tenant_rows(source: DataSource) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rows": len(source.read_tenant_rows("acme")), "where": source.describe()})

    result = dg.materialize([tenant_rows], resources={"source": source_from_url("memrows://demo?table=events")})
    (materialization,) = result.asset_materializations_for_node("tenant_rows")
    assert materialization.metadata["rows"].value == 20
    assert materialization.metadata["where"].value == "memory store demo, table events"


def test_a_registered_connector_gets_the_url_rules_and_messages_of_every_connector(memrows, monkeypatch):
    with pytest.raises(MaestroError, match="MAESTRO_SOURCE_URL names no store"):
        source_spec_for_url("memrows://")
    with pytest.raises(MaestroError, match="not a usable table name"):
        source_spec_for_url("memrows://demo?table=a;b")
    with pytest.raises(MaestroError, match="which Maestro cannot read") as error:
        source_spec_for_url("nosuch://x")
    assert "memrows://" in str(error.value) and "postgresql://" in str(error.value)

    def not_installed(module):
        raise ImportError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(base, "_locate", not_installed)
    with pytest.raises(MaestroError, match=r"points at MemRows, but its driver \(json\) is not installed") as error:
        source_spec_for_url("memrows://demo")
    assert "pip install 'maestro-pipelines[memrows]'" in str(error.value)


def test_a_scheme_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register(ConnectorDeclaration(
            name="other", label="Other", schemes=("mysql",), url_form="mysql://", url_settings=memrows_url_settings,
            open=MemoryReader,
        ))


def test_the_connector_library_never_imports_dagster_or_the_dagster_layer():
    """Every import in maestro_pipelines/connectors (at module level or inside functions)."""
    import ast
    from pathlib import Path

    import maestro_pipelines.connectors as library

    forbidden = ("dagster", "dagster_snowflake", "pydantic", *(f"maestro_pipelines.{layer}" for layer in (
        "resources", "assets", "jobs", "sensors", "schedules", "cli", "environment", "definitions")))
    found = []
    for path in sorted(Path(library.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert found == []
