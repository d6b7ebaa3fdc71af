"""Every data connector against a real server (or emulator), through one interface.

The same suite runs for postgres (embedded PostgreSQL 18), mysql (MariaDB 10.11), snowflake
(fakesnow server), bigquery (bqemulator), mongodb (nx-27017) and mongomock; see conftest.py
for what each emulator cannot do and how the seeding works around it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta

import dagster as dg
import pandas as pd
import pytest

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.sources import DataFingerprint, DataSource, source_from_environment, source_from_url

from ..services import free_port
from .conftest import (
    BASE_TIME,
    COLUMNS,
    NUMERIC_COLUMNS,
    ROWS,
    SNOWFLAKE_PASSWORD,
    backend_params,
    extra_row,
    rows_of,
)

HOSTILE_TENANTS = [
    "x' OR '1'='1",
    "acme' --",
    "acme'; DROP TABLE training_rows; --",
    'acme" OR "1"="1',
    "ACME",  # MySQL's default collation would match this: the connector compares bytes
    "acme ",  # ... and this (trailing spaces)
    " acme",
    "%",
    "acme%",
    ".*",
    "",
]
NOT_STRINGS = [{"$ne": None}, {"$gt": ""}, ["acme", "globex"], ("acme",), 1, None, b"acme"]


def ordered(rows):
    return sorted(rows, key=lambda r: (r["updated_at"], r["id"]))


def assert_rows(frame: pd.DataFrame, expected: list[dict], columns=COLUMNS) -> None:
    """Exactly `expected`, in timestamp-then-key order, numbers as numbers, UTC timestamps."""
    expected = ordered(expected)
    assert list(frame.columns) == list(columns)
    assert len(frame) == len(expected)
    for column in columns:
        if column in NUMERIC_COLUMNS:
            assert pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column]), (
                f"{column} is {frame[column].dtype}"
            )
    if "updated_at" in columns:
        dtype = frame["updated_at"].dtype
        assert isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC", dtype
    want = pd.DataFrame(expected, columns=list(columns))
    for column in columns:
        got_values, want_values = frame[column].tolist(), want[column].tolist()
        if column in ("f1", "f2"):
            assert got_values == pytest.approx(want_values), column
        elif column == "updated_at":
            assert [pd.Timestamp(v) for v in got_values] == [pd.Timestamp(v) for v in want_values]
        else:
            assert [int(v) if column in NUMERIC_COLUMNS else v for v in got_values] == want_values, column


# ---- reading ---------------------------------------------------------------------------------------


def test_reads_exactly_the_tenants_rows_with_typed_columns(seeded):
    for tenant in ("acme", "globex"):
        frame = seeded.source.read_tenant_rows(tenant)
        assert_rows(frame, rows_of(tenant))
        assert set(frame["tenant"]) == {tenant}


def test_columns_are_the_ones_asked_for_in_that_order(seeded):
    frame = seeded.source.read_tenant_rows("globex", columns=["label", "f1", "id", "updated_at"])
    assert_rows(frame, rows_of("globex"), columns=["label", "f1", "id", "updated_at"])


def test_since_keeps_rows_strictly_newer(seeded):
    cutoff = BASE_TIME + timedelta(minutes=40)  # four rows sit exactly on it: excluded
    assert any(r["updated_at"] == cutoff and r["tenant"] == "acme" for r in ROWS)
    assert_rows(seeded.source.read_tenant_rows("acme", since=cutoff), rows_of("acme", cutoff))
    # A naive datetime is taken as UTC; a non-UTC zone is converted.
    assert_rows(seeded.source.read_tenant_rows("acme", since=cutoff.replace(tzinfo=None)), rows_of("acme", cutoff))
    later = seeded.source.read_tenant_rows("acme", since=BASE_TIME + timedelta(days=1))
    assert later.empty


def test_limit_returns_the_oldest_rows_first(seeded):
    assert_rows(seeded.source.read_tenant_rows("acme", limit=7), ordered(rows_of("acme"))[:7])
    cutoff = BASE_TIME + timedelta(minutes=30)
    assert_rows(seeded.source.read_tenant_rows("acme", since=cutoff, limit=5), ordered(rows_of("acme", cutoff))[:5])
    assert seeded.source.read_tenant_rows("acme", limit=0).empty
    with pytest.raises(MaestroError, match="limit"):
        seeded.source.read_tenant_rows("acme", limit=-1)


def test_batches_are_bounded_and_add_up_to_the_full_read(seeded):
    source = seeded.source
    full = source.read_tenant_rows("acme")
    batches = list(source.iter_tenant_batches("acme", batch_size=40))
    assert [len(b) for b in batches] == [40, 40, 40, 40, 20]
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), full)

    cutoff = BASE_TIME + timedelta(minutes=20)
    columns = ["id", "f2", "updated_at"]
    partial = list(source.iter_tenant_batches("acme", batch_size=33, columns=columns, since=cutoff))
    assert all(len(b) <= 33 for b in partial)
    pd.testing.assert_frame_equal(
        pd.concat(partial, ignore_index=True), source.read_tenant_rows("acme", columns=columns, since=cutoff)
    )
    assert list(source.iter_tenant_batches("initech", batch_size=10)) == []
    with pytest.raises(MaestroError, match="batch_size"):
        source.iter_tenant_batches("acme", batch_size=0)


def test_fingerprint_counts_dates_the_newest_and_notices_a_new_row(seeded):
    """Count and newest timestamp, before and after one more row. (fakesnow answers MAX()
    over no rows with 1970-01-01 instead of NULL: a fingerprint with no rows has no newest
    timestamp whatever the server says.)"""
    source = seeded.source
    before = source.tenant_fingerprint("acme")
    assert before == DataFingerprint(180, max(r["updated_at"] for r in rows_of("acme")))
    assert before.newest.utcoffset() == timedelta(0)
    globex = source.tenant_fingerprint("globex")
    assert globex == DataFingerprint(120, max(r["updated_at"] for r in rows_of("globex")))
    assert source.tenant_fingerprint("initech") == DataFingerprint(0, None)

    new = extra_row("acme")
    seeded.insert(new)
    after = source.tenant_fingerprint("acme")
    assert after == DataFingerprint(181, new["updated_at"]) and after != before
    assert source.tenant_fingerprint("globex") == globex


def test_one_grouped_query_gives_every_tenants_fingerprint(seeded):
    """What the sensors ask once per tick: every tenant's fingerprint from one grouped query,
    the same as asking tenant by tenant (names differing by case or spaces are other tenants)."""
    source = seeded.source
    names = ["acme", "globex", "initech", *HOSTILE_TENANTS]
    grouped = source.tenant_fingerprints(names)
    assert grouped == {name: source.tenant_fingerprint(name) for name in names}
    assert grouped["acme"].row_count == 180 and grouped["ACME"] == DataFingerprint(0, None)
    seeded.insert(extra_row("acme"))
    changed = source.tenant_fingerprints(["acme", "globex"])
    assert changed["acme"] == source.tenant_fingerprint("acme") != grouped["acme"]
    assert changed["globex"] == grouped["globex"]


def test_unknown_tenant_gives_an_empty_frame_with_the_columns(seeded):
    frame = seeded.source.read_tenant_rows("initech", columns=["id", "f1", "updated_at"])
    assert frame.empty and list(frame.columns) == ["id", "f1", "updated_at"]
    everything = seeded.source.read_tenant_rows("initech")
    assert everything.empty
    if seeded.sql:  # a SQL result knows its columns even without rows; a Mongo find does not
        assert list(everything.columns) == COLUMNS


# ---- tenant isolation ------------------------------------------------------------------------------


def test_hostile_and_lookalike_tenant_ids_match_nothing(seeded):
    source = seeded.source
    for hostile in HOSTILE_TENANTS:
        assert source.read_tenant_rows(hostile).empty, hostile
        assert list(source.iter_tenant_batches(hostile, batch_size=50)) == [], hostile
        assert source.tenant_fingerprint(hostile) == DataFingerprint(0, None), hostile
    assert len(source.read_tenant_rows("acme")) == 180  # nothing was dropped or changed


def test_tenants_that_are_not_strings_are_refused_before_any_query(seeded):
    source = seeded.source
    for bad in NOT_STRINGS:
        for call in (
            lambda: source.read_tenant_rows(bad),
            lambda: source.iter_tenant_batches(bad),
            lambda: source.tenant_fingerprint(bad),
        ):
            with pytest.raises(MaestroError, match="the tenant must be a string") as error:
                call()
            assert "\n" not in str(error.value)


# ---- Dagster ---------------------------------------------------------------------------------------


def _rows_asset():
    @dg.asset
    def tenant_rows(source: DataSource) -> dg.MaterializeResult:
        frame = source.read_tenant_rows("acme", columns=["id", "label"])
        fingerprint = source.tenant_fingerprint("acme")
        batches = sum(1 for _ in source.iter_tenant_batches("acme", batch_size=100))
        return dg.MaterializeResult(
            metadata={"rows": len(frame), "fingerprint_rows": fingerprint.row_count, "batches": batches,
                      "where": source.describe()}
        )

    return tenant_rows


def _metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("tenant_rows")
    return {k: v.value for k, v in materialization.metadata.items()}


def test_a_dagster_asset_takes_any_backend_as_a_typed_resource(seeded):
    result = dg.materialize([_rows_asset()], resources={"source": seeded.source})
    assert result.success
    metadata = _metadata(result)
    assert metadata["rows"] == 180 and metadata["fingerprint_rows"] == 180 and metadata["batches"] == 2
    assert SNOWFLAKE_PASSWORD not in metadata["where"]  # describe() never shows a password


@pytest.mark.parametrize("seeded", backend_params(["postgres", "mysql", "snowflake", "bigquery", "mongodb"]), indirect=True)
def test_a_url_from_an_environment_variable_is_read_at_run_time(seeded, monkeypatch):
    """What environment.py does: the URL is checked when the definitions load, but the
    resource holds dg.EnvVar("MAESTRO_SOURCE_URL"), resolved by Dagster in the run."""
    monkeypatch.setenv("MAESTRO_SOURCE_URL", seeded.url)
    source = source_from_environment(seeded.url)
    assert isinstance(source.url, dg.EnvVar) and source.url.env_var_name == "MAESTRO_SOURCE_URL"
    result = dg.materialize([_rows_asset()], resources={"source": source})
    assert result.success and _metadata(result)["rows"] == 180
    # Used outside a run (a script, the CLI), the variable is read when the resource is used.
    assert source.tenant_fingerprint("globex").row_count == 120


@pytest.mark.parametrize("seeded", backend_params(["postgres"]), indirect=True)
def test_postgres_without_a_url_reads_the_platform_database(seeded, monkeypatch):
    """No `url`: the platform database, located the way PlatformDatabase finds it."""
    from maestro_pipelines.resources.sources import PostgresDataSource

    monkeypatch.setenv("MAESTRO_DATABASE_URL", seeded.url)
    source = PostgresDataSource()
    assert source.tenant_fingerprint("acme").row_count == 180
    assert "MAESTRO_DATABASE_URL" in source.describe()


# ---- SQL only --------------------------------------------------------------------------------------


def _query_for(seeded) -> str:
    """The same query in each backend's placeholder style."""
    if seeded.name in ("postgres", "mysql"):
        return "SELECT id, label FROM training_rows WHERE tenant = :tenant AND f3 >= :f3 ORDER BY id"
    if seeded.name == "snowflake":
        return "SELECT id, label FROM training_rows WHERE tenant = %(tenant)s AND f3 >= %(f3)s ORDER BY id"
    dataset = seeded.source.dataset
    return f"SELECT id, label FROM `{dataset}`.`training_rows` WHERE tenant = @tenant AND f3 >= @f3 ORDER BY id"


def test_read_query_binds_every_value(seeded_sql):
    source, sql = seeded_sql.source, _query_for(seeded_sql)
    frame = source.read_query(sql, {"tenant": "globex", "f3": 5})
    want = sorted(r["id"] for r in rows_of("globex") if r["f3"] >= 5)
    assert list(frame.columns) == ["id", "label"] and frame["id"].astype(int).tolist() == want
    assert source.read_query(sql, {"tenant": "x' OR '1'='1", "f3": 0}).empty
    with pytest.raises(MaestroError, match="mapping"):
        source.read_query(sql, ["globex", 5])


def test_schema_qualified_table_names_are_quoted_part_by_part(seeded_sql):
    qualified = {
        "postgres": "public.training_rows",
        "mysql": f"{seeded_sql.url.rsplit('/', 1)[1]}.training_rows",
        "snowflake": "ROWS.training_rows",
        "bigquery": f"{getattr(seeded_sql.source, 'dataset', '')}.training_rows",
    }[seeded_sql.name]
    source = source_from_url(seeded_sql.url, table=qualified, key_column="id")
    assert source.tenant_fingerprint("globex").row_count == 120
    assert len(source.read_tenant_rows("globex", limit=3)) == 3


def test_missing_tables_and_columns_are_named_in_one_line(seeded_sql):
    for fields, named in (({"table": "no_such_table"}, "no_such_table"), ({"tenant_column": "customer"}, "customer")):
        source = source_from_url(seeded_sql.url, **fields)
        with pytest.raises(MaestroError) as error:
            source.read_tenant_rows("acme")
        message = str(error.value)
        assert "MAESTRO_SOURCE_URL" in message and named in message.lower() and "\n" not in message, message


# ---- MongoDB only ----------------------------------------------------------------------------------


def test_mongo_filter_narrows_a_tenant_and_never_widens_it(seeded_mongo):
    base = seeded_mongo.source
    cls = type(base)
    narrowed = cls(url=base.url, filter={"label": 1})
    frame = narrowed.read_tenant_rows("acme")
    assert_rows(frame, [r for r in rows_of("acme") if r["label"] == 1])
    assert narrowed.tenant_fingerprint("acme").row_count == len(frame)
    # A filter naming another tenant cannot add its rows: it is ANDed with the tenant.
    other = cls(url=base.url, filter={"tenant": "globex"})
    assert other.read_tenant_rows("acme").empty


def test_mongo_aggregate_starts_with_the_tenant(seeded_mongo):
    source = seeded_mongo.source
    frame = source.aggregate([{"$group": {"_id": "$label", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}], tenant="globex")
    labels = [r["label"] for r in rows_of("globex")]
    assert frame["_id"].tolist() == [0, 1] and frame["n"].tolist() == [labels.count(0), labels.count(1)]
    with pytest.raises(MaestroError, match="the tenant must be a string"):
        source.aggregate([{"$limit": 1}], tenant={"$ne": None})
    with pytest.raises(MaestroError, match="list of stage documents"):
        source.aggregate({"$match": {}})


def test_mongo_newest_date_through_group(seeded_mongo):
    """`$max` over dates in `$group`. nx-27017 gets this wrong: it returns extended-JSON text
    (`{"$date": "..."}`, zone dropped) instead of a date, which is why `tenant_fingerprint`
    uses count + sort/limit instead. On nx-27017 the wire path is checked as far as it goes
    (the right instant, as text); on mongomock the value must be a real date."""
    frame = seeded_mongo.source.aggregate(
        [{"$group": {"_id": None, "newest": {"$max": "$updated_at"}}}], tenant="acme"
    )
    newest, want = frame["newest"].iloc[0], max(r["updated_at"] for r in rows_of("acme"))
    if seeded_mongo.name == "mongodb" and isinstance(newest, str):
        newest = pd.Timestamp(json.loads(newest)["$date"]).tz_localize("UTC")
    assert isinstance(newest, (datetime, pd.Timestamp)) and pd.Timestamp(newest).tz_convert("UTC") == want


# ---- failures --------------------------------------------------------------------------------------

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "url, fields",
    [
        pytest.param("postgresql://maestro:{pw}@127.0.0.1:{port}/rows", {}, id="postgres"),
        pytest.param("mysql://maestro:{pw}@127.0.0.1:{port}/rows", {"connect_timeout_seconds": 2}, id="mysql"),
        pytest.param("mongodb://maestro:{pw}@127.0.0.1:{port}/rows", {"connect_timeout_seconds": 1}, id="mongodb"),
        pytest.param(
            "snowflake://maestro:{pw}@acct/DB/S?host=127.0.0.1&port={port}&protocol=http",
            {"connect_timeout_seconds": 2}, id="snowflake",
        ),
        pytest.param(
            "bigquery://test-project/rows?api_endpoint=http://127.0.0.1:{port}", {"retry_timeout_seconds": 1}, id="bigquery"
        ),
    ],
)
def test_an_unreachable_server_gives_one_line_naming_the_variable_never_the_password(url, fields):
    source = source_from_url(url.format(pw=PASSWORD, port=free_port()), **fields)  # nothing listens there
    with pytest.raises(MaestroError) as error:
        source.tenant_fingerprint("acme")
    message = str(error.value)
    assert "MAESTRO_SOURCE_URL" in message and PASSWORD not in message and "\n" not in message, message


def test_wrong_password_and_missing_database_are_told_apart(mariadb_server, pg18):
    wrong = source_from_url(f"mysql://root:{PASSWORD}@127.0.0.1:{mariadb_server}/mysql")
    with pytest.raises(MaestroError, match="access denied for user 'root'") as error:
        wrong.tenant_fingerprint("acme")
    assert PASSWORD not in str(error.value)
    with pytest.raises(MaestroError, match="database 'no_such_db' does not exist"):
        source_from_url(f"mysql://root@127.0.0.1:{mariadb_server}/no_such_db").tenant_fingerprint("acme")
    with pytest.raises(MaestroError, match="database 'no_such_db' does not exist"):
        source_from_url(pg18.libpq_url("no_such_db")).tenant_fingerprint("acme")


def test_identifiers_are_validated_before_anything_connects():
    dead = f"postgresql://maestro:{PASSWORD}@127.0.0.1:{free_port()}/rows"
    for fields, what in (
        ({"table": "rows; DROP TABLE tenants"}, "table"),
        ({"table": "a.b.c"}, "table"),
        ({"tenant_column": 'tenant" OR 1=1 --'}, "tenant column"),
        ({"timestamp_column": "1st"}, "timestamp column"),
        ({"key_column": "id desc"}, "key column"),
    ):
        source = source_from_url(dead, **fields)
        with pytest.raises(MaestroError, match=f"not a usable {what} name"):
            source.read_tenant_rows("acme")
        with pytest.raises(MaestroError, match=f"not a usable {what} name"):
            source.iter_tenant_batches("acme")
    source = source_from_url(dead)
    with pytest.raises(MaestroError, match="not a usable column name"):
        source.read_tenant_rows("acme", columns=["id", "label; DROP TABLE x"])
    with pytest.raises(MaestroError, match="since must be a datetime"):
        source.read_tenant_rows("acme", since="2024-01-01")


def test_importing_the_connectors_loads_no_driver_and_no_pandas():
    probe = (
        "import sys\n"
        "import maestro_pipelines.resources.sources\n"
        "heavy = ('pandas', 'sqlalchemy', 'pymysql', 'pymongo', 'psycopg', 'snowflake.connector', 'dagster_snowflake',\n"
        "         'google.cloud', 'google.cloud.bigquery', 'mongomock', 'numpy')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


@pytest.mark.parametrize("seeded", backend_params(["postgres", "mysql"]), indirect=True)
def test_read_query_runs_read_only(seeded):
    with pytest.raises(MaestroError, match="MAESTRO_SOURCE_URL") as error:
        seeded.source.read_query("DELETE FROM training_rows WHERE tenant = :tenant", {"tenant": "acme"})
    assert "read-only" in str(error.value).lower() or "read only" in str(error.value).lower(), error.value
    assert seeded.source.tenant_fingerprint("acme").row_count == 180
