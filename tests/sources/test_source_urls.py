"""MAESTRO_SOURCE_URL as users write it: which class, which settings, which errors.

No server is needed here: parsing happens before anything connects. The one patch in this
file replaces the driver lookup (`base._locate`) to simulate a driver that is not installed.
"""

from __future__ import annotations

import dagster as dg
import pytest

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.sources import (
    BigQueryDataSource,
    DataSource,
    MongoDataSource,
    MySQLDataSource,
    PostgresDataSource,
    SnowflakeDataSource,
    source_from_environment,
    source_from_url,
    source_spec_for_url,
)
from maestro_pipelines.connectors import base
from maestro_pipelines.connectors.mongodb import parse_mongodb_url
from maestro_pipelines.connectors.mysql import parse_mysql_url
from maestro_pipelines.connectors.postgres import parse_postgres_source_url

SECRET = "Sup3r-s3cret"
ALL_CLASSES = [PostgresDataSource, MySQLDataSource, MongoDataSource, SnowflakeDataSource, BigQueryDataSource]


@pytest.mark.parametrize(
    "url, cls, fields",
    [
        pytest.param(f"postgresql://maestro:{SECRET}@db.internal:5432/warehouse", PostgresDataSource, {}, id="postgresql"),
        pytest.param(f"postgres://maestro:{SECRET}@db/warehouse?sslmode=require", PostgresDataSource, {}, id="postgres"),
        pytest.param(f"postgresql+psycopg2://maestro:{SECRET}@db/warehouse", PostgresDataSource, {}, id="postgresql+driver"),
        pytest.param(
            f"postgresql://maestro:{SECRET}@db/warehouse?table=ml.rows&tenant_column=customer&timestamp_column=changed"
            "&key_column=row_id",
            PostgresDataSource,
            {"table": "ml.rows", "tenant_column": "customer", "timestamp_column": "changed", "key_column": "row_id"},
            id="postgresql+maestro-settings",
        ),
        pytest.param(f"mysql://maestro:{SECRET}@db:3306/shop", MySQLDataSource, {}, id="mysql"),
        pytest.param(f"mysql+pymysql://maestro:{SECRET}@db/shop?table=orders", MySQLDataSource, {"table": "orders"},
                     id="mysql+pymysql"),
        pytest.param(f"mariadb://maestro:{SECRET}@db/shop", MySQLDataSource, {}, id="mariadb"),
        pytest.param(
            f"mongodb://maestro:{SECRET}@m1:27017,m2:27017/shop?replicaSet=rs0&authSource=admin&table=events",
            MongoDataSource, {"database": "shop", "table": "events"}, id="mongodb",
        ),
        pytest.param(f"mongodb+srv://maestro:{SECRET}@cluster0.example.net/shop", MongoDataSource, {"database": "shop"},
                     id="mongodb+srv"),
        pytest.param("mongodb://127.0.0.1:27017/?directConnection=true", MongoDataSource, {}, id="mongodb-no-database"),
        pytest.param(
            f"snowflake://maestro:{SECRET}@myorg-acct/ANALYTICS/ML?warehouse=COMPUTE_WH&role=READER",
            SnowflakeDataSource,
            {"account": "myorg-acct", "user": "maestro", "database": "ANALYTICS", "schema_name": "ML",
             "warehouse": "COMPUTE_WH", "role": "READER"},
            id="snowflake",
        ),
        pytest.param(
            "snowflake://maestro@fakesnow/DB/S?host=127.0.0.1&port=8080&protocol=http&key_column=id",
            SnowflakeDataSource,
            {"account": "fakesnow", "user": "maestro", "database": "DB", "schema_name": "S", "host": "127.0.0.1",
             "port": 8080, "protocol": "http", "key_column": "id"},
            id="snowflake-endpoint",
        ),
        pytest.param("bigquery://my-project/ml_rows?location=EU", BigQueryDataSource,
                     {"project": "my-project", "dataset": "ml_rows", "location": "EU"}, id="bigquery"),
        pytest.param(
            "bigquery://test-project?api_endpoint=http://127.0.0.1:9050&table=ds.rows", BigQueryDataSource,
            {"project": "test-project", "api_endpoint": "http://127.0.0.1:9050", "table": "ds.rows"}, id="bigquery-emulator",
        ),
    ],
)
def test_each_url_form_maps_to_its_class_and_settings(url, cls, fields):
    spec = source_spec_for_url(url)
    assert spec.cls is cls
    assert spec.kwargs == {**fields, "url_variable": "MAESTRO_SOURCE_URL"}
    assert SECRET not in repr(spec) and "url" not in spec.kwargs and "password" not in spec.kwargs

    source = source_from_url(url)
    assert type(source) is cls and isinstance(source, DataSource)
    assert source.url == url  # the resource parses its own url when it connects
    for name, value in fields.items():
        assert getattr(source, name) == value
    assert SECRET not in repr(source) and SECRET not in str(source)


def test_maestro_settings_never_reach_the_driver():
    url, fields = parse_postgres_source_url(f"postgresql://u:{SECRET}@h/db?sslmode=require&table=rows", "V")
    assert dict(url.query) == {"sslmode": "require"} and fields == {"table": "rows"}
    assert url.drivername == "postgresql+psycopg"
    url, fields = parse_mysql_url("mysql://u@h/db?table=rows", "V")
    assert url.drivername == "mysql+pymysql" and dict(url.query) == {"charset": "utf8mb4"} and fields == {"table": "rows"}
    parsed, fields = parse_mongodb_url("mongodb://h1,h2/db?replicaSet=rs&table=events", "V")
    assert parsed.uri == "mongodb://h1,h2/db?replicaSet=rs" and parsed.hosts == "h1,h2" and fields == {"table": "events"}


def test_explicit_fields_override_the_url():
    source = source_from_url("mysql://u@h/db?table=rows", table="other_rows", key_column="id")
    assert source.table == "other_rows" and source.key_column == "id"
    snowflake = source_from_url(f"snowflake://u:{SECRET}@acct/DB/S", warehouse="BIG_WH")
    settings, password = snowflake._settings()
    assert settings["warehouse"] == "BIG_WH" and settings["database"] == "DB" and password == SECRET


# ---- errors: one line, naming the variable, never a secret ------------------------------------------


def _error(url: str, variable: str = "MAESTRO_SOURCE_URL") -> str:
    with pytest.raises(MaestroError) as error:
        source_spec_for_url(url, variable)
    message = str(error.value)
    assert "\n" not in message, message
    assert variable in message, message
    assert SECRET not in message, message
    return message


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (f"maestro:{SECRET}@db:5432/rows", "is not a URL"),
        (f"postgresql://maestro:{SECRET}@db:notaport/rows", "not a valid"),
        ("postgresql://maestro@db:5432", "names no database"),
        (f"mysql://maestro:{SECRET}@db:port/shop", "not a valid URL"),
        (f"mysql://maestro:{SECRET}@db", "names no database"),
        (f"mysql://maestro:{SECRET}@/shop", "names no host"),
        (f"mongodb://maestro:{SECRET}@", "names no host"),
        (f"mongodb://maestro:{SECRET}@db:port/shop", "not a valid URL"),
        (f"mongodb+srv://maestro:{SECRET}@cluster.example.net:27017/shop", "gives a port to mongodb+srv"),
        (f"snowflake://{SECRET}@/DB/S", "names no account"),
        ("snowflake://acct/DB/S", "names no user"),
        (f"snowflake://u:{SECRET}@acct/DB/S/extra", "more than DATABASE/SCHEMA"),
        (f"snowflake://u:{SECRET}@acct/DB/S?warehouse=W&password={SECRET}", "unknown parameters (password)"),
        (f"snowflake://u:{SECRET}@acct/DB/S?port=http", "port that is not a number"),
        ("bigquery:///dataset", "names no project"),
        (f"bigquery://u:{SECRET}@project/dataset", "carries a user or password"),
        ("bigquery://Project_With_Caps/dataset", "not a BigQuery project id"),
        ("bigquery://project/data-set", "not a usable dataset name"),
        (f"postgresql://u:{SECRET}@db/rows?table=rows;DROP TABLE x", "not a usable table name"),
        (f"mysql://u:{SECRET}@db/rows?tenant_column=a b", "not a usable tenant column name"),
    ],
)
def test_malformed_urls_say_what_is_wrong_in_one_line(url, says):
    assert says in _error(url)


@pytest.mark.parametrize("url", [f"oracle://u:{SECRET}@db/rows", f"redis://:{SECRET}@cache:6379/0", "file:///tmp/rows.csv",
                                 f"s3://{SECRET}@bucket/rows.parquet"])
def test_unknown_schemes_list_the_supported_ones(url):
    message = _error(url)
    assert "which Maestro cannot read" in message
    for scheme in ("postgresql://", "mysql://", "mongodb://", "snowflake://", "bigquery://"):
        assert scheme in message


def test_errors_name_the_variable_the_url_came_from():
    message = _error(f"mysql://u:{SECRET}@db", variable="TENANT_ROWS_URL")
    assert "MAESTRO_SOURCE_URL" not in message


@pytest.mark.parametrize(
    "url, extra, driver",
    [
        (f"mysql://u:{SECRET}@db/shop", "mysql", "pymysql"),
        (f"mongodb://u:{SECRET}@db/shop", "mongodb", "pymongo"),
        (f"snowflake://u:{SECRET}@acct/DB/S", "snowflake", "snowflake.connector"),
        ("bigquery://project/dataset", "bigquery", "google.cloud.bigquery"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(monkeypatch, url, extra, driver):
    def not_installed(module):
        raise ImportError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(base, "_locate", not_installed)
    message = _error(url)
    assert f"pip install 'maestro-pipelines[{extra}]'" in message and driver in message

    # The resource checks again when it connects (the definitions may have loaded elsewhere).
    source = {
        "mysql": lambda: MySQLDataSource(url=url),
        "mongodb": lambda: MongoDataSource(url=url),
        "snowflake": lambda: SnowflakeDataSource(url=url),
        "bigquery": lambda: BigQueryDataSource(url=url),
    }[extra]()
    with pytest.raises(MaestroError, match=rf"pip install 'maestro-pipelines\[{extra}\]'") as error:
        source.tenant_fingerprint("acme")
    assert "MAESTRO_SOURCE_URL" in str(error.value) and SECRET not in str(error.value)


def test_postgresql_needs_no_extra(monkeypatch):
    def not_installed(module):
        raise ImportError(module)

    monkeypatch.setattr(base, "_locate", not_installed)
    assert source_spec_for_url("postgresql://u@db/rows").cls is PostgresDataSource


def test_the_real_driver_lookup_imports_nothing():
    import sys

    base._locate("google.cloud.bigquery")  # installed in the dev environment
    with pytest.raises(ImportError):
        base._locate("maestro_no_such_driver.sub")
    with pytest.raises(ImportError):
        base._locate("google.cloud.maestro_no_such_module")
    assert "maestro_no_such_driver" not in sys.modules


# ---- secrets -----------------------------------------------------------------------------------------


def test_the_environment_wiring_keeps_the_url_out_of_the_config():
    """environment.py: checked now, read at run time; the UI shows only the variable's name."""
    source = source_from_environment(f"mysql://maestro:{SECRET}@db/shop?table=orders")
    assert isinstance(source.url, dg.EnvVar) and source.url.env_var_name == "MAESTRO_SOURCE_URL"
    assert source.table == "orders"
    assert SECRET not in repr(source) and "EnvVar('MAESTRO_SOURCE_URL')" in repr(source)


def test_snowflake_without_a_password_in_the_url_takes_maestro_source_password(monkeypatch):
    spec = source_spec_for_url("snowflake://maestro@acct/DB/S")
    assert spec.password_variable == "MAESTRO_SOURCE_PASSWORD"
    source = spec.build(dg.EnvVar("MAESTRO_SOURCE_URL"))
    assert isinstance(source.password, dg.EnvVar) and source.password.env_var_name == "MAESTRO_SOURCE_PASSWORD"
    assert source_spec_for_url(f"snowflake://maestro:{SECRET}@acct/DB/S").password_variable is None

    # Used outside a run, the variables are read when the resource is used.
    monkeypatch.setenv("MAESTRO_SOURCE_URL", "snowflake://maestro@acct/DB/S")
    monkeypatch.delenv("MAESTRO_SOURCE_PASSWORD", raising=False)
    with pytest.raises(MaestroError, match="MAESTRO_SOURCE_PASSWORD is not set"):
        source.tenant_fingerprint("acme")
    monkeypatch.setenv("MAESTRO_SOURCE_PASSWORD", SECRET)
    settings, password = source._settings()
    assert password == SECRET and settings["account"] == "acct"
    assert SECRET not in repr(source)


def test_a_url_variable_that_is_unset_at_run_time_is_named(monkeypatch):
    monkeypatch.delenv("MAESTRO_SOURCE_URL", raising=False)
    source = MySQLDataSource(url=dg.EnvVar("MAESTRO_SOURCE_URL"))
    with pytest.raises(MaestroError, match="MAESTRO_SOURCE_URL is not set"):
        source.read_tenant_rows("acme")


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_described_and_secrets_are_marked(cls):
    for name, field in cls.model_fields.items():
        assert field.description, f"{cls.__name__}.{name} has no description for the UI"
    from maestro_pipelines.resources.secret_fields import secret_field_names

    assert secret_field_names(cls) == ({"url", "password"} if cls is SnowflakeDataSource else {"url"})


def test_plain_secrets_are_masked_in_repr():
    source = SnowflakeDataSource(url=f"snowflake://u:{SECRET}@acct/DB/S", password=SECRET)
    assert SECRET not in repr(source) and "url='***'" in repr(source) and "password='***'" in repr(source)
