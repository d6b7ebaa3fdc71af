"""BigQuery connector through google-cloud-bigquery (`pip install 'maestro-pipelines[bigquery]'`).

Values are bound as query parameters (`QueryJobConfig(query_parameters=[ScalarQueryParameter
...])`); results arrive through the REST API (`to_dataframe(create_bqstorage_client=False)`,
and page by page for `iter_tenant_batches`), so no Storage Read API permission is needed.
Credentials are Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, workload
identity, `gcloud auth application-default login`); with `api_endpoint` (an emulator) the
client sends no credentials at all.

    bigquery://PROJECT/DATASET?location=EU&api_endpoint=http://127.0.0.1:9050
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote, urlsplit

from maestro_pipelines.connectors.base import (
    ConnectorDeclaration,
    DataFingerprint,
    SQLDialect,
    SourceReader,
    check_identifier,
    check_query,
    check_tenant,
    fingerprint_sql,
    fingerprints_from_groups,
    finish_frame,
    first_line,
    grouped_fingerprint_sql,
    import_driver,
    malformed,
    read_request,
    rebatch,
    select_sql,
    split_query,
    to_utc,
    url_fields,
)
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    import pandas as pd

BIGQUERY_URL_FORM = "bigquery://PROJECT/DATASET"
# Project ids: lower-case letters, digits, hyphens; older ones may carry a domain (example.com:proj).
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{0,62}")
_LOCATION = re.compile(r"[A-Za-z0-9-]{1,40}")


def parse_bigquery_url(raw: str, variable: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(project, dataset, location, api_endpoint from the URL; Maestro's fields)."""
    try:
        parts = urlsplit(raw.strip())
    except ValueError:
        raise malformed(variable, BIGQUERY_URL_FORM) from None
    if parts.scheme.lower() != "bigquery":
        raise malformed(variable, BIGQUERY_URL_FORM)
    if parts.username or parts.password:
        raise malformed(variable, BIGQUERY_URL_FORM, "carries a user or password (BigQuery uses Google credentials)")
    project = unquote(parts.netloc)
    if not project:
        raise malformed(variable, BIGQUERY_URL_FORM, "names no project")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if len(segments) > 1:
        raise malformed(variable, BIGQUERY_URL_FORM, "has more than a DATASET in its path")
    ours, query = split_query(parts.query)
    unknown = sorted(set(query) - {"location", "api_endpoint"})
    if unknown:
        raise malformed(variable, BIGQUERY_URL_FORM, f"has unknown parameters ({', '.join(unknown)})")
    settings = {
        "project": project,
        "dataset": segments[0] if segments else None,
        "location": query.get("location") or None,
        "api_endpoint": query.get("api_endpoint") or None,
    }
    _check_settings(settings, variable)
    return settings, url_fields(ours, variable)


def _check_settings(settings: Mapping[str, Any], variable: str) -> None:
    if settings.get("project") and not _PROJECT.fullmatch(settings["project"]):
        raise MaestroError(f"{variable}: '{settings['project']}' is not a BigQuery project id")
    if settings.get("dataset"):
        try:
            check_identifier(settings["dataset"], "dataset")
        except MaestroError as exc:
            raise MaestroError(f"{variable}: {exc.problem}", exc.hint) from None
    if settings.get("location") and not _LOCATION.fullmatch(settings["location"]):
        raise MaestroError(f"{variable}: '{settings['location']}' is not a BigQuery location")
    endpoint = settings.get("api_endpoint")
    if endpoint and not re.fullmatch(r"https?://[^\s/?#]+/?", endpoint):
        raise MaestroError(f"{variable}: api_endpoint '{endpoint}' is not an http(s)://HOST:PORT address")


def bigquery_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """Project, dataset, location, endpoint and Maestro's settings from the URL."""
    settings, fields = parse_bigquery_url(raw, variable)
    return {**{k: v for k, v in settings.items() if v is not None}, **fields}


def _quote(part: str) -> str:
    return f"`{part}`"


BIGQUERY_DIALECT = SQLDialect(quote_part=_quote, placeholder=lambda name: f"@{name}")


def query_parameter(name: str, value: Any):
    """A bound BigQuery parameter, its type taken from the Python value."""
    from google.cloud import bigquery

    if isinstance(value, (list, tuple)):
        kinds = {_scalar_type(v) for v in value if v is not None}
        if len(kinds) > 1:
            raise MaestroError(f"query parameter '{name}' mixes value types", "Use one type per list")
        return bigquery.ArrayQueryParameter(name, kinds.pop() if kinds else "STRING", list(value))
    return bigquery.ScalarQueryParameter(name, _scalar_type(value), value)


def _scalar_type(value: Any) -> str:
    if value is None or isinstance(value, str):
        return "STRING"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, Decimal):
        return "NUMERIC"
    if isinstance(value, datetime):
        return "TIMESTAMP" if value.tzinfo is not None else "DATETIME"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, time):
        return "TIME"
    if isinstance(value, bytes):
        return "BYTES"
    raise MaestroError(f"cannot bind a {type(value).__name__} as a BigQuery query parameter")


@dataclass(kw_only=True, eq=False, repr=False)
class BigQueryReader(SourceReader):
    """Training rows in a BigQuery table or view (`table`, or `dataset.table`). Fields set
    here override the URL's."""

    url: Optional[str] = None
    project: Optional[str] = None
    dataset: Optional[str] = None
    location: Optional[str] = None  # empty: BigQuery finds it
    api_endpoint: Optional[str] = None  # an emulator, http://HOST:PORT: no credentials are sent
    retry_timeout_seconds: int = 120

    _client: Any = field(default=None, init=False)

    # ---- connection ----

    def _settings(self) -> dict[str, Any]:
        from_url: dict[str, Any] = {}
        if self.url:
            from_url, _ = parse_bigquery_url(self.url, self._variable)
        settings = {
            key: getattr(self, key) if getattr(self, key) is not None else from_url.get(key)
            for key in ("project", "dataset", "location", "api_endpoint")
        }
        _check_settings(settings, self._variable)
        return settings

    def _bigquery(self):
        return import_driver("google.cloud.bigquery", "bigquery", self._variable, "BigQuery")

    def _new_client(self):
        bigquery = self._bigquery()
        import_driver("db_dtypes", "bigquery", self._variable, "BigQuery")  # to_dataframe needs it
        settings = self._settings()
        if settings["api_endpoint"]:
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials

            return bigquery.Client(
                project=settings["project"] or "emulator",
                location=settings["location"],
                credentials=AnonymousCredentials(),
                client_options=ClientOptions(api_endpoint=settings["api_endpoint"]),
            )
        return bigquery.Client(project=settings["project"], location=settings["location"])

    def _where(self) -> str:
        settings = self._settings()
        where = f"{settings['project'] or '(default project)'}"
        if settings["api_endpoint"]:
            where += f" at {settings['api_endpoint']}"
        return where

    @contextmanager
    def _errors(self):
        """Google API and credential errors leave as one-line `MaestroError`s."""
        from google.api_core import exceptions as api
        from google.auth.exceptions import DefaultCredentialsError, RefreshError

        source, where = self._variable, self._where()
        try:
            yield
        except DefaultCredentialsError:
            raise MaestroError(
                f"{source}: no Google credentials for BigQuery project {where}",
                "Set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
            ) from None
        except RefreshError as exc:
            raise MaestroError(f"{source}: Google credentials were refused ({first_line(exc)})") from None
        except api.NotFound as exc:
            raise MaestroError(
                f"{source}: {_api_message(exc)} (project {where})", "Check the project, dataset and table"
            ) from None
        except (api.Forbidden, api.Unauthorized) as exc:
            raise MaestroError(
                f"{source}: BigQuery refused access in project {where} ({_api_message(exc)})",
                "Grant the credentials BigQuery Data Viewer and Job User",
            ) from None
        except api.BadRequest as exc:
            raise MaestroError(f"{source}: BigQuery rejected the query in project {where} ({_api_message(exc)})") from None
        except (api.RetryError, api.ServiceUnavailable, api.GatewayTimeout) as exc:
            raise MaestroError(
                f"{source}: no answer from BigQuery for project {where} within {self.retry_timeout_seconds} s",
                f"Check the network, or api_endpoint in {source}",
            ) from None
        except api.GoogleAPIError as exc:
            raise MaestroError(f"{source}: BigQuery failed for project {where} ({first_line(exc)})") from None

    def _client_or_new(self):
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _query(self, sql: str, params: Mapping[str, Any]):
        """Start a query job with every value bound; returns the job."""
        bigquery = self._bigquery()
        from google.cloud.bigquery.retry import DEFAULT_RETRY

        client = self._client_or_new()
        config = bigquery.QueryJobConfig(query_parameters=[query_parameter(k, v) for k, v in params.items()])
        # The client's defaults retry an unreachable API for 10 minutes, and any job_retry
        # wraps jobs.insert in another 10-minute retry: the insert is retried by `retry`
        # alone (bounded), a failed job is restarted by `_result` (bounded too).
        return client.query(
            sql, job_config=config, retry=DEFAULT_RETRY.with_timeout(self.retry_timeout_seconds), job_retry=None
        )

    def _result(self, job, **kwargs):
        from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY, DEFAULT_RETRY

        timeout = self.retry_timeout_seconds
        return job.result(
            retry=DEFAULT_RETRY.with_timeout(timeout), job_retry=DEFAULT_JOB_RETRY.with_timeout(timeout), **kwargs
        )

    # ---- queries ----

    def _table_sql(self) -> str:
        table = self._checked_names()[0]
        settings = self._settings()
        if "." not in table:
            if not settings["dataset"]:
                raise MaestroError(
                    f"{self._variable} names no dataset for table '{table}'",
                    f"Write it as {BIGQUERY_URL_FORM}, set the source's dataset, or write the table as dataset.table",
                )
            table = f"{settings['dataset']}.{table}"
        quoted = BIGQUERY_DIALECT.quote(table)
        return f"`{settings['project']}`.{quoted}" if settings["project"] else quoted

    def _select(self, request) -> tuple[str, dict]:
        _, tenant_column, timestamp_column, key = self._checked_names()
        return select_sql(
            BIGQUERY_DIALECT, self._table_sql(), tenant_column, timestamp_column,
            (key,) if key else (), request, request.since,
        )

    def _frame(self, frame: "pd.DataFrame") -> "pd.DataFrame":
        return finish_frame(frame, self.timestamp_column)

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None) -> "pd.DataFrame":
        request = read_request(tenant, columns, since, limit)
        sql, params = self._select(request)
        with self._errors():
            frame = _to_dataframe(self._result(self._query(sql, params)))
        return self._frame(frame)

    def _batches(self, request, batch_size: int) -> Iterator["pd.DataFrame"]:
        sql, params = self._select(request)
        with self._errors():
            rows = self._result(self._query(sql, params), page_size=batch_size)
            # One REST page at a time (page_size rows at most).
            for frame in rebatch(rows.to_dataframe_iterable(), batch_size):
                yield self._frame(frame)

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        request = read_request(tenant)
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = fingerprint_sql(BIGQUERY_DIALECT, self._table_sql(), tenant_column, timestamp_column)
        with self._errors():
            (row,) = list(self._result(self._query(sql, {"tenant": request.tenant})))
        return DataFingerprint(row_count=int(row["row_count"] or 0), newest=to_utc(row["newest"]) if row["row_count"] else None)

    def tenant_fingerprints(self, tenants, *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """Every tenant's fingerprint from one GROUP BY query job."""
        tenants = [check_tenant(t) for t in tenants]
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = grouped_fingerprint_sql(BIGQUERY_DIALECT, self._table_sql(), tenant_column, timestamp_column)
        with self._errors():
            groups = [(row[0], row[1], row[2]) for row in self._result(self._query(sql, {}))]
        return fingerprints_from_groups(groups, tenants)

    def read_query(self, sql: str, params: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """Run your own SELECT with `@name` placeholders; every value in `params` is bound
        (its BigQuery type follows the Python type). Tenant isolation is yours here."""
        check_query(sql, params, "@name")
        with self._errors():
            frame = _to_dataframe(self._result(self._query(sql, dict(params or {}))))
        return self._frame(frame)

    def describe(self) -> str:
        return f"BigQuery {self._where()}, table {self.table}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _to_dataframe(rows) -> "pd.DataFrame":
    """The rows through the REST API (no Storage Read API client, no extra permission).

    google-cloud-bigquery 3.4x marks this path as pending deprecation in favour of
    pandas-gbq; until it is removed the warning says nothing a user can act on.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Retrieving DataFrames via google-cloud-bigquery", category=PendingDeprecationWarning)
        return rows.to_dataframe(create_bqstorage_client=False)


def _api_message(exc) -> str:
    """The API's own message, once (the exception's text repeats it with the reason)."""
    errors = getattr(exc, "errors", None) or []
    message = (errors[0].get("message") if errors and isinstance(errors[0], dict) else None) or (
        getattr(exc, "message", None) or first_line(exc)
    )
    return str(message).strip().splitlines()[0]


CONNECTOR = ConnectorDeclaration(
    name="bigquery",
    label="BigQuery",
    schemes=("bigquery",),
    url_form=BIGQUERY_URL_FORM,
    url_settings=bigquery_url_settings,
    open=BigQueryReader,
    extra="bigquery",
    drivers=("google.cloud.bigquery", "db_dtypes"),
)
