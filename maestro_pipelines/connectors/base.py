"""`SourceReader`: where a tenant's training rows come from, whatever the backend.

The training assets, the scoring asset and the retraining sensor call three methods (through
the thin `DataSource` resources in `maestro_pipelines.resources.sources`) and never learn
which database answers:

- `read_tenant_rows(tenant, columns=, since=, limit=)`: one tenant's rows as a DataFrame;
- `iter_tenant_batches(tenant, batch_size=, columns=, since=)`: the same rows in bounded
  DataFrames (server-side cursors or result pages), so memory stays flat for big tenants;
- `tenant_fingerprint(tenant)`: row count and newest timestamp, one cheap aggregate query.

Rules every backend follows (enforced here, once):

- the tenant and every other value are bound parameters, never text in a query; a tenant
  that is not a `str` (say `{"$ne": None}` from a JSON payload) is refused;
- table and column names cannot be bound, so they are validated strictly (letters, digits
  and `_`, one optional `.` for `schema.table`) and then quoted by the backend's rules;
- rows come ordered by the timestamp column, then by a deterministic tiebreak (`key_column`,
  or the table's primary key, or `_id` for MongoDB); `since` keeps rows strictly newer;
- timestamps come back as timezone-aware UTC; naive timestamps in the source are taken as
  UTC; DECIMAL/NUMERIC columns come back as floats (numbers as numbers);
- errors are one-line `MaestroError`s naming the setting (`MAESTRO_SOURCE_URL`), never a
  password; a missing driver names the pip extra that installs it.

Nothing heavy is imported at module level: drivers, pandas and SQLAlchemy load inside the
methods that use them, so loading the Dagster definitions stays cheap. Nothing here imports
Dagster: a connector declares itself with a `ConnectorDeclaration` (see `registry.py`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qsl

from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    import pandas as pd

SOURCE_URL_VARIABLE = "MAESTRO_SOURCE_URL"
SOURCE_PASSWORD_VARIABLE = "MAESTRO_SOURCE_PASSWORD"
DEFAULT_BATCH_SIZE = 50_000
CONNECT_TIMEOUT_SECONDS = 10

# Maestro's own settings, accepted as query parameters in any source URL
# (`...?table=rows&tenant_column=customer`) and removed before the URL reaches the driver.
URL_FIELDS = ("table", "tenant_column", "timestamp_column", "key_column")

_PART = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
_IDENTIFIER = re.compile(rf"{_PART}")
_DOTTED_IDENTIFIER = re.compile(rf"{_PART}(?:\.{_PART})?")
IDENTIFIER_RULE = "letters, digits and _ (not starting with a digit)"

TIMESTAMP_DTYPE = "datetime64[ns, UTC]"


@dataclass(frozen=True)
class DataFingerprint:
    """How much data a tenant has and how new it is: the retraining sensor compares these."""

    row_count: int
    newest: datetime | None

    @property
    def tag(self) -> str:
        """The fingerprint as text, "<count>@<newest ISO timestamp>": what a training records
        as the rows it was requested for (a run tag) and read (training_data's data version)."""
        return f"{self.row_count}@{self.newest.isoformat() if self.newest else '-'}"


NO_ROWS = DataFingerprint(0, None)


# ---- validation -------------------------------------------------------------------------------


def check_tenant(tenant: object) -> str:
    """The tenant as a bound value: a string, nothing else (no dicts, lists or operators)."""
    if not isinstance(tenant, str):
        raise MaestroError(
            f"the tenant must be a string, not {type(tenant).__name__}",
            "Pass the tenant's name (a str); query operators are never accepted as a tenant",
        )
    if "\x00" in tenant:
        raise MaestroError("the tenant contains a NUL character", "Pass the tenant's name as plain text")
    return tenant


def check_identifier(name: object, what: str, *, dotted: bool = False) -> str:
    """A table or column name that is safe to quote into a query (it cannot be bound)."""
    pattern = _DOTTED_IDENTIFIER if dotted else _IDENTIFIER
    if not isinstance(name, str) or not pattern.fullmatch(name):
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        rule = IDENTIFIER_RULE + (", with one optional '.' for schema.table" if dotted else "")
        raise MaestroError(f"{shown} is not a usable {what} name", f"Use {rule}")
    return name


def check_columns(columns: Sequence[str] | None) -> tuple[str, ...] | None:
    if columns is None:
        return None
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise MaestroError(
            f"columns must be a list of column names, not {type(columns).__name__}", "Pass e.g. ['f1', 'label']"
        )
    if not columns:
        raise MaestroError("columns is an empty list", "Pass None for every column, or name at least one")
    checked = tuple(check_identifier(c, "column") for c in columns)
    if len(set(checked)) != len(checked):
        raise MaestroError(f"columns lists a column twice ({', '.join(checked)})", "Name each column once")
    return checked


def check_since(since: object) -> datetime | None:
    """`since` as an aware UTC datetime; a naive one is taken as UTC."""
    if since is None:
        return None
    if hasattr(since, "to_pydatetime"):  # pandas.Timestamp
        since = since.to_pydatetime()
    if not isinstance(since, datetime):
        raise MaestroError(f"since must be a datetime, not {type(since).__name__}", "Pass a datetime (UTC if naive)")
    return since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since.astimezone(timezone.utc)


def check_count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MaestroError(f"{what} must be an integer of at least {minimum}, not {value!r}")
    return int(value)


def check_query(sql: object, params: object, placeholder: str) -> None:
    """`read_query`'s arguments: SQL text, and values by name (written `placeholder` in the SQL)."""
    if not isinstance(sql, str) or not sql.strip():
        raise MaestroError("read_query needs the SQL text as a non-empty string")
    if params is not None and not isinstance(params, Mapping):
        raise MaestroError(
            f"read_query params must be a mapping of names to values, not {type(params).__name__}",
            f"Write {placeholder} in the SQL and pass {{'name': value}}",
        )


@dataclass(frozen=True)
class ReadRequest:
    """A validated read: every value checked before any query is built."""

    tenant: str
    columns: tuple[str, ...] | None
    since: datetime | None
    limit: int | None

    @property
    def since_naive_utc(self) -> datetime | None:
        """For servers whose timestamps carry no zone (MySQL DATETIME, Snowflake NTZ)."""
        return self.since.replace(tzinfo=None) if self.since is not None else None


def read_request(tenant: object, columns=None, since=None, limit=None) -> ReadRequest:
    return ReadRequest(
        tenant=check_tenant(tenant),
        columns=check_columns(columns),
        since=check_since(since),
        limit=None if limit is None else check_count(limit, "limit", minimum=0),
    )


# ---- drivers ------------------------------------------------------------------------------------


def _locate(module: str) -> None:
    """Raise ImportError if `module` is not installed, without importing it.

    (Importing would load the driver when the Dagster definitions are loaded; this only
    looks on sys.path. Tests replace this function to simulate a missing driver.)
    """
    if module in sys.modules:
        return
    path = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules and hasattr(sys.modules[name], "__path__"):
            path = list(sys.modules[name].__path__)
            continue
        # Below the top level, look the last part up in the parent's folders (passing the
        # dotted name would make importlib look for the parent in sys.modules).
        spec = importlib.machinery.PathFinder.find_spec(name if depth == 1 else parts[depth - 1], path)
        if spec is None:
            raise ImportError(f"No module named '{name}'", name=name)
        path = list(spec.submodule_search_locations or [])


def check_driver(module: str, extra: str, variable: str, backend: str) -> None:
    """Fail with the pip extra to install when the backend's driver is missing."""
    try:
        _locate(module)
    except ImportError:
        raise missing_driver(module, extra, variable, backend) from None


def import_driver(module: str, extra: str, variable: str, backend: str):
    """Import a backend's driver inside the method that needs it."""
    check_driver(module, extra, variable, backend)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_driver(module, extra, variable, backend) from None


def missing_driver(module: str, extra: str, variable: str, backend: str) -> MaestroError:
    return MaestroError(
        f"{variable} points at {backend}, but its driver ({module}) is not installed",
        f"Install it with: pip install 'maestro-pipelines[{extra}]'",
    )


# ---- secrets and URLs ---------------------------------------------------------------------------


def redact(message: str, *secrets: str | None) -> str:
    from maestro_pipelines.redaction import hide_secret

    for secret in secrets:
        message = hide_secret(message, secret)
    return message


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def split_query(query: str) -> tuple[dict[str, str], dict[str, str]]:
    """(Maestro's fields, the rest) from a URL's query string."""
    ours, rest = {}, {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        (ours if key in URL_FIELDS else rest)[key] = value
    return ours, rest


def url_fields(fields: Mapping[str, str], variable: str) -> dict[str, str]:
    """Maestro's settings from a URL's query (`table=...`), validated."""
    checked: dict[str, str] = {}
    for key, value in fields.items():
        try:
            checked[key] = check_identifier(value, key.replace("_", " "), dotted=(key == "table"))
        except MaestroError as exc:
            raise MaestroError(f"{variable}: {exc.problem}", exc.hint) from None
    return checked


def malformed(variable: str, form: str, why: str = "is not a valid URL") -> MaestroError:
    return MaestroError(f"{variable} {why}", f"Write it as {form}")


# ---- frames -------------------------------------------------------------------------------------


def to_utc(value: Any) -> datetime | None:
    """A timestamp from a driver (datetime, pandas Timestamp, ISO text) as aware UTC."""
    if value is None:
        return None
    if hasattr(value, "to_pydatetime"):
        import pandas as pd

        if pd.isna(value):
            return None
        value = value.to_pydatetime()
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise MaestroError(f"the newest timestamp came back as {type(value).__name__}, not a timestamp")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def finish_frame(frame: "pd.DataFrame", timestamp_column: str | None) -> "pd.DataFrame":
    """Numbers as numbers and the timestamp column as UTC, whatever the driver returned."""
    import decimal

    import pandas as pd

    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.api.extensions.ExtensionDtype) and column.dtype.kind in "iuf":
            # Nullable Int64/Float64 (BigQuery's to_dataframe) as the plain NumPy types every
            # other backend returns: int64 without missing values, float64 with them.
            frame[name] = column.astype("float64" if column.isna().any() or column.dtype.kind == "f" else column.dtype.numpy_dtype)
            continue
        if column.dtype == object and len(column):
            values = column.dropna()
            if len(values) and all(isinstance(v, decimal.Decimal) for v in values):
                frame[name] = column.astype("float64")
    if timestamp_column is not None and timestamp_column in frame.columns:
        # One dtype whatever the driver gave (naive, another zone, us or ns): datetime64[ns, UTC].
        column = frame[timestamp_column]
        if column.dtype != TIMESTAMP_DTYPE:
            frame[timestamp_column] = pd.to_datetime(column, utc=True).astype(TIMESTAMP_DTYPE)
    return frame


def empty_frame(columns: Iterable[str] | None) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame(columns=list(columns or []))


def rebatch(frames: Iterable["pd.DataFrame"], batch_size: int) -> Iterator["pd.DataFrame"]:
    """Frames of exactly `batch_size` rows (the last may be shorter) from frames of any size."""
    import pandas as pd

    pending: list[pd.DataFrame] = []
    held = 0
    for frame in frames:
        while len(frame):
            take = frame.iloc[: batch_size - held]
            frame = frame.iloc[len(take):]
            pending.append(take)
            held += len(take)
            if held == batch_size:
                yield pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0].reset_index(drop=True)
                pending, held = [], 0
    if held:
        yield pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0].reset_index(drop=True)


# ---- SQL text for the SQL backends --------------------------------------------------------------


@dataclass(frozen=True)
class SQLDialect:
    """How one SQL backend quotes names and writes placeholders."""

    quote_part: Any  # (str) -> str, for one validated identifier part
    placeholder: Any  # (name) -> str: ":name", "%(name)s", "@name"
    tenant_predicate: str = "{column} = {value}"
    group_key: str = "{column}"  # what GROUP BY groups tenants by: MySQL compares bytes, as its predicate does

    def quote(self, name: str) -> str:
        return ".".join(self.quote_part(part) for part in name.split("."))


def select_sql(
    dialect: SQLDialect,
    table_sql: str,
    tenant_column: str,
    timestamp_column: str,
    order_keys: Sequence[str],
    request: ReadRequest,
    since_value: Any,
) -> tuple[str, dict[str, Any]]:
    """SELECT ... WHERE tenant = <bound> [AND ts > <bound>] ORDER BY ts, keys [LIMIT <bound>]."""
    q, p = dialect.quote, dialect.placeholder
    select = ", ".join(q(c) for c in request.columns) if request.columns else "*"
    where = [dialect.tenant_predicate.format(column=q(tenant_column), value=p("tenant"))]
    params: dict[str, Any] = {"tenant": request.tenant}
    if request.since is not None:
        where.append(f"{q(timestamp_column)} > {p('since')}")
        params["since"] = since_value
    order = [q(timestamp_column)] + [q(k) for k in order_keys if k != timestamp_column]
    sql = f"SELECT {select} FROM {table_sql} WHERE {' AND '.join(where)} ORDER BY {', '.join(order)}"
    if request.limit is not None:
        sql += f" LIMIT {p('limit')}"
        params["limit"] = request.limit
    return sql, params


def fingerprint_sql(dialect: SQLDialect, table_sql: str, tenant_column: str, timestamp_column: str) -> str:
    q, p = dialect.quote, dialect.placeholder
    predicate = dialect.tenant_predicate.format(column=q(tenant_column), value=p("tenant"))
    return f"SELECT COUNT(*) AS row_count, MAX({q(timestamp_column)}) AS newest FROM {table_sql} WHERE {predicate}"


def grouped_fingerprint_sql(dialect: SQLDialect, table_sql: str, tenant_column: str, timestamp_column: str) -> str:
    """Every tenant's count and newest timestamp in one query (the sensors' tick)."""
    q = dialect.quote
    key = dialect.group_key.format(column=q(tenant_column))
    return (f"SELECT {key} AS tenant_key, COUNT(*) AS row_count, MAX({q(timestamp_column)}) AS newest "
            f"FROM {table_sql} GROUP BY {key}")


def fingerprints_from_groups(groups: Iterable[Sequence[Any]], tenants: Sequence[str]) -> dict[str, DataFingerprint]:
    """{tenant: fingerprint} for `tenants` from (tenant, count, newest) groups: a tenant
    without a group has no rows; groups of tenants not asked about (or not text) are ignored."""
    wanted = set(tenants)
    found: dict[str, DataFingerprint] = {}
    for name, count, newest in groups:
        if isinstance(name, (bytes, bytearray)):  # MySQL's CAST(... AS BINARY)
            name = bytes(name).decode("utf-8", "replace")
        if isinstance(name, str) and name in wanted and count:
            found[name] = DataFingerprint(int(count), to_utc(newest))
    return {tenant: found.get(tenant, NO_ROWS) for tenant in tenants}


# ---- the interface ------------------------------------------------------------------------------


@dataclass(kw_only=True, eq=False, repr=False)
class SourceReader(ABC):
    """Reads one table (or view, or collection) with a tenant column and a timestamp column.

    Each connector subclasses it with its connection settings as more keyword fields; the
    thin Dagster resources (`maestro_pipelines.resources.sources`) have one field per field
    here, and hand them over resolved. Subclasses: PostgreSQL, MySQL, MongoDB, Snowflake, BigQuery.
    """

    table: str = "training_rows"
    tenant_column: str = "tenant"
    timestamp_column: str = "updated_at"
    key_column: Optional[str] = None
    url_variable: str = SOURCE_URL_VARIABLE  # the setting the connection comes from: errors name it

    # ---- what every connector implements ----

    @abstractmethod
    def read_tenant_rows(
        self,
        tenant: str,
        *,
        columns: list[str] | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> "pd.DataFrame":
        """The tenant's rows (all columns unless `columns`), newer than `since` if given,
        oldest first, at most `limit` of them. No rows: an empty frame."""

    def iter_tenant_batches(
        self,
        tenant: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        columns: list[str] | None = None,
        since: datetime | None = None,
    ) -> Iterator["pd.DataFrame"]:
        """The same rows as `read_tenant_rows`, in the same order, as frames of at most
        `batch_size` rows, streamed from the server (memory stays bounded)."""
        request = read_request(tenant, columns, since)
        batch_size = check_count(batch_size, "batch_size", minimum=1)
        self._checked_names()  # fail now, not at the first next()
        return self._batches(request, batch_size)

    @abstractmethod
    def _batches(self, request: "ReadRequest", batch_size: int) -> Iterator["pd.DataFrame"]:
        """The connector's streamed read of an already checked request."""

    @abstractmethod
    def tenant_fingerprint(self, tenant: str) -> DataFingerprint:
        """Row count and newest timestamp of the tenant's rows (one aggregate query)."""

    def tenant_fingerprints(self, tenants: Iterable[str], *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """{tenant: fingerprint} for many tenants. The built-in connectors answer with one
        grouped query (GROUP BY, or a MongoDB $group). This default, for a connector that
        cannot, asks tenant by tenant and stops once `time.monotonic()` passes `deadline`:
        the tenants it did not reach are absent from the answer (ask them next time)."""
        import time

        answer: dict[str, DataFingerprint] = {}
        for tenant in [check_tenant(t) for t in tenants]:
            if deadline is not None and time.monotonic() > deadline:
                break
            answer[tenant] = self.tenant_fingerprint(tenant)
        return answer

    @abstractmethod
    def describe(self) -> str:
        """Where the rows come from, for logs and metadata (never a password)."""

    def close(self) -> None:
        """Release a client the reader holds (connectors that keep one override this)."""

    # ---- shared ----

    def __repr__(self) -> str:  # fields may hold passwords: name the class and table only
        return f"{type(self).__name__}(table={self.table!r})"

    def _checked_names(self) -> tuple[str, str, str, str | None]:
        """(table, tenant column, timestamp column, key column), validated."""
        try:
            return (
                check_identifier(self.table, "table", dotted=True),
                check_identifier(self.tenant_column, "tenant column"),
                check_identifier(self.timestamp_column, "timestamp column"),
                None if not self.key_column else check_identifier(self.key_column, "key column"),
            )
        except MaestroError as exc:
            raise MaestroError(f"data source ({self.url_variable}): {exc.problem}", exc.hint) from None

    @property
    def _variable(self) -> str:
        return self.url_variable or SOURCE_URL_VARIABLE


# ---- how a connector declares itself ------------------------------------------------------------


def _no_password_variable(raw: str, variable: str) -> str | None:
    return None


@dataclass(frozen=True)
class ConnectorDeclaration:
    """Everything Maestro needs to know about one connector, written once in its own module
    and registered with one line in `registry.py`."""

    name: str
    """Key the thin Dagster resource names (`connector = "mysql"`), e.g. "mysql"."""
    label: str
    """How messages name it: "MySQL"."""
    schemes: tuple[str, ...]
    """URL schemes it reads, as written before any `+driver` ("mysql", "mariadb"); the first
    is the one listed in "Use one of ..."."""
    url_form: str
    """The URL's form, for messages: "mysql://USER:PASSWORD@HOST:3306/DATABASE"."""
    url_settings: Callable[[str, str], Mapping[str, Any]]
    """URL rules: (url, variable) -> the settings safe to show (never a password); raises a
    one-line `MaestroError` naming `variable` for a malformed URL."""
    open: Callable[..., SourceReader]
    """How to open it: keyword fields (`url=`, `table=`, the connector's own) -> a reader."""
    extra: str | None = None
    """The pip extra that installs its driver (None: part of the base install)."""
    drivers: tuple[str, ...] = ()
    """Modules that extra installs, looked up (not imported) when the URL is checked."""
    password_variable: Callable[[str, str], str | None] = _no_password_variable
    """(url, variable) -> the variable the password comes from when the URL has none."""
