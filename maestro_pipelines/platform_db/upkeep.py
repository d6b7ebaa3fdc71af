"""Keeping the platform database fast: statistics views, prediction partitions, slow queries.

No Dagster here: the upkeep assets (`maestro_pipelines.assets.upkeep`) call these functions,
and so can a script. Every function takes the platform database's URL and opens its own
psycopg connection, because two of them need things SQLAlchemy sessions get in the way of:
`REFRESH MATERIALIZED VIEW CONCURRENTLY` must run outside a transaction block, and the
partition archive streams `COPY ... TO STDOUT` into the object store.

Locks, because readers must never wait on upkeep:

- refresh: `CONCURRENTLY` takes an EXCLUSIVE lock on the view, which lets SELECTs through
  (only other refreshes wait). A view never populated cannot be refreshed concurrently; it
  gets one plain refresh, the first time only.
- new partitions: created as plain tables then `ATTACH PARTITION`, which takes SHARE UPDATE
  EXCLUSIVE on `predictions` (reads and writes go on) where `CREATE TABLE ... PARTITION OF`
  would take ACCESS EXCLUSIVE. Rows that landed in `predictions_default` for a month move into
  that month's new partition in the same transaction (ATTACH would refuse otherwise).
- archive: the old partition is locked SHARE (nobody writes 13-month-old predictions, but if
  someone does, it waits rather than being lost), copied out, read back and counted, and only
  then detached and dropped, in the same transaction. Any failure rolls everything back: the
  partition stays, and an archive object without its manifest is not an archive.

Every DDL statement runs under `lock_timeout` (default 10 s): upkeep waiting behind a long
transaction would make every query queued behind *it* wait too.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone

from sqlalchemy.engine import URL

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.admin import quote_ident
from maestro_pipelines.platform_db.connection import psycopg_connect

STATISTICS_VIEWS = ("model_statistics", "tenant_usage_statistics")
VIEW_ORDER = {"model_statistics": "tenant_name, model_name", "tenant_usage_statistics": "tenant_name"}
PARTITIONED_TABLE = "predictions"
DEFAULT_PARTITION = "predictions_default"
PARTITION_NAME = re.compile(r"^predictions_y(?P<year>\d{4})m(?P<month>\d{2})$")
ARCHIVE_PREFIX = "archives/predictions"
DEFAULT_MONTHS_AHEAD = 3
DEFAULT_RETENTION_MONTHS = 13
DEFAULT_LOCK_TIMEOUT = "10s"
LOCK_TIMEOUT = re.compile(r"^\d+\s*(ms|s|min)?$")
MiB = 1024 * 1024


class UpkeepError(MaestroError):
    """Upkeep could not do something; what was already there is untouched."""


def month_start(day: date, months_later: int = 0) -> date:
    index = day.year * 12 + day.month - 1 + months_later
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{PARTITIONED_TABLE}_y{month:%Y}m{month:%m}"


def _bound(month: date) -> str:
    return f"{month:%Y-%m-%d} 00:00:00+00"


def _connect(url: URL, autocommit: bool = True, lock_timeout: str = DEFAULT_LOCK_TIMEOUT):
    if not LOCK_TIMEOUT.match(lock_timeout):
        raise UpkeepError(f"lock_timeout '{lock_timeout}' is not a duration", "Use e.g. 500ms, 10s or 1min")
    conn = psycopg_connect(url, autocommit=autocommit, source="platform database", application_name="maestro-upkeep")
    if autocommit:  # a transaction sets it with SET LOCAL instead
        conn.execute(f"SET lock_timeout = '{lock_timeout}'")
    return conn


def _lock_problem(exc: Exception, what: str) -> UpkeepError:
    return UpkeepError(
        f"{what}: {str(exc).strip().splitlines()[0]}",
        "A long transaction holds a lock it needs (see pg_stat_activity); upkeep gave up rather "
        "than make every query queue behind it. It runs again on the next schedule tick",
    )


# ---- statistics views ----------------------------------------------------------------------


@dataclass
class ViewRefresh:
    view: str
    seconds: float
    concurrently: bool
    rows: list[dict] = field(default_factory=list)
    row_count: int = 0


def refresh_statistics_view(url: URL, view: str, preview_rows: int = 100,
                            lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> ViewRefresh:
    """REFRESH MATERIALIZED VIEW CONCURRENTLY (plain the first time, when never populated),
    then its rows (the first `preview_rows`, in a fixed order) for the UI."""
    import psycopg

    if view not in STATISTICS_VIEWS:
        raise UpkeepError(f"'{view}' is not one of Maestro's statistics views", f"Use one of {', '.join(STATISTICS_VIEWS)}")
    with _connect(url, lock_timeout=lock_timeout) as conn:
        populated = conn.execute(
            "SELECT relispopulated FROM pg_class WHERE oid = to_regclass(%s)", [view]
        ).fetchone()
        if populated is None:
            raise UpkeepError(f"the platform database has no view '{view}'", "Run `maestro db upgrade`")
        concurrently = bool(populated[0])
        started = time.perf_counter()
        try:
            conn.execute(f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY ' if concurrently else ''}{quote_ident(view)}")
        except psycopg.errors.LockNotAvailable as exc:
            raise _lock_problem(exc, f"refreshing {view}") from None
        seconds = time.perf_counter() - started
        cursor = conn.execute(f"SELECT * FROM {quote_ident(view)} ORDER BY {VIEW_ORDER[view]} LIMIT %s", [preview_rows])
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
        count = conn.execute(f"SELECT count(*) FROM {quote_ident(view)}").fetchone()[0]
    return ViewRefresh(view, seconds, concurrently, rows, count)


# ---- prediction partitions -----------------------------------------------------------------


@dataclass
class PartitionReport:
    created: list[str] = field(default_factory=list)
    moved_from_default: dict[str, int] = field(default_factory=dict)
    """Partition -> rows moved into it out of the default partition."""
    archived: list[dict] = field(default_factory=list)
    """{partition, month, rows, key, compressed_bytes, sha256} per archived partition."""
    left_in_default: int = 0
    partitions: list[dict] = field(default_factory=list)
    """{partition, from, to, estimated_rows} after the upkeep, oldest first."""

    def as_dict(self) -> dict:
        return asdict(self)


def list_partitions(conn) -> list[tuple[str, date]]:
    """(name, month) of the monthly partitions of `predictions`, oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(%s)", [PARTITIONED_TABLE]
    ).fetchall()
    found = []
    for (name,) in rows:
        match = PARTITION_NAME.match(name)
        if match:
            found.append((name, date(int(match.group("year")), int(match.group("month")), 1)))
    return sorted(found, key=lambda item: item[1])


def _attach_month(conn, month: date) -> int:
    """Create `month`'s partition as a plain table, move that month's rows out of the default
    partition into it, attach it; one transaction. Returns the rows moved."""
    name, lower, upper = partition_name(month), _bound(month), _bound(month_start(month, 1))
    with conn.transaction():
        conn.execute(f"CREATE TABLE {name} (LIKE {PARTITIONED_TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        moved = conn.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE created_at >= %s AND created_at < %s RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved", [lower, upper]
        ).rowcount
        conn.execute(f"ALTER TABLE {PARTITIONED_TABLE} ATTACH PARTITION {name} FOR VALUES FROM ('{lower}') TO ('{upper}')")
    return max(moved, 0)


def ensure_partitions(url: URL, months_ahead: int = DEFAULT_MONTHS_AHEAD, today: date | None = None,
                      lock_timeout: str = DEFAULT_LOCK_TIMEOUT, report: PartitionReport | None = None) -> PartitionReport:
    """Partitions for this month and `months_ahead` after it, and for every month that has
    rows in the default partition (strays: rows written before their month's partition
    existed, or with a clock far off), with those rows moved in."""
    import psycopg

    report = report or PartitionReport()
    today = today or datetime.now(timezone.utc).date()
    with _connect(url, lock_timeout=lock_timeout) as conn:
        existing = {month for _name, month in list_partitions(conn)}
        stray_months = {
            row[0] for row in conn.execute(
                f"SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date FROM {DEFAULT_PARTITION}"
            ).fetchall()
        }
        wanted = {month_start(today, ahead) for ahead in range(months_ahead + 1)} | stray_months
        for month in sorted(wanted - existing):
            try:
                moved = _attach_month(conn, month)
            except psycopg.errors.LockNotAvailable as exc:
                raise _lock_problem(exc, f"creating partition {partition_name(month)}") from None
            report.created.append(partition_name(month))
            if moved:
                report.moved_from_default[partition_name(month)] = moved
        report.left_in_default = conn.execute(f"SELECT count(*) FROM {DEFAULT_PARTITION}").fetchone()[0]
    return report


def describe_partitions(url: URL, report: PartitionReport) -> PartitionReport:
    with _connect(url) as conn:
        for name, month in list_partitions(conn):
            estimated = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", [name]).fetchone()[0]
            report.partitions.append({
                "partition": name, "from": month.isoformat(), "to": month_start(month, 1).isoformat(),
                "estimated_rows": max(int(estimated), 0),
            })
    return report


def archive_key(month: date) -> str:
    return f"{ARCHIVE_PREFIX}/{month:%Y-%m}/{partition_name(month)}.csv.zst"


def archive_manifest_key(month: date) -> str:
    return f"{ARCHIVE_PREFIX}/{month:%Y-%m}/manifest.json"


def _copy_chunks(conn, name: str) -> Iterator[bytes]:
    with conn.cursor().copy(f"COPY (SELECT * FROM {name} ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
        for chunk in copy:
            yield bytes(chunk)


def _compressed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3, threads=-1).compressobj()
    pending = bytearray()
    for chunk in chunks:
        pending += compressor.compress(chunk)
        if len(pending) >= MiB:
            yield bytes(pending)
            pending.clear()
    pending += compressor.flush()
    if pending:
        yield bytes(pending)


def count_archived_rows(store, key: str) -> int:
    """Read an archive back through the store's sha256 check and count its CSV records (a
    CSV parser, not lines: an entity key may hold a newline)."""
    import zstandard

    with store.open_read(key) as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=MiB)
        text = io.TextIOWrapper(reader, encoding="utf-8", newline="")
        records = sum(1 for _ in csv.reader(text))
    return max(records - 1, 0)  # the header


def archive_old_partitions(url: URL, store, retention_months: int = DEFAULT_RETENTION_MONTHS,
                           today: date | None = None, lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
                           report: PartitionReport | None = None) -> PartitionReport:
    """Archive into `store` then drop every monthly partition older than `retention_months`
    (this month counts as one): `archives/predictions/<YYYY-MM>/<partition>.csv.zst` and,
    written last, its `manifest.json` (rows, sha256, bounds)."""
    import psycopg

    if retention_months < 1:
        raise UpkeepError(f"retention of {retention_months} months would drop this month's predictions",
                          "Use a retention of at least 1 month (default 13)")
    report = report or PartitionReport()
    today = today or datetime.now(timezone.utc).date()
    keep_from = month_start(today, -(retention_months - 1))
    with _connect(url) as probe:
        old = [(name, month) for name, month in list_partitions(probe) if month < keep_from]
    for name, month in old:
        conn = _connect(url, autocommit=False, lock_timeout=lock_timeout)
        try:
            conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")  # checked by _connect
            conn.execute(f"LOCK TABLE {name} IN SHARE MODE")
            rows = conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            key = archive_key(month)
            info = store.put_stream(key, _compressed(_copy_chunks(conn, name)),
                                    {"partition": name, "rows": str(rows)})
            read_back = count_archived_rows(store, key)
            if read_back != rows:
                raise UpkeepError(
                    f"the archive of {name} at {key} holds {read_back} rows, the partition {rows}",
                    "Nothing was dropped. Check the object store, then let upkeep run again",
                )
            manifest = {
                "partition": name, "month": f"{month:%Y-%m}", "from": _bound(month), "to": _bound(month_start(month, 1)),
                "rows": rows, "key": key, "compressed_bytes": info.size, "sha256": info.sha256, "format": "csv+header, zstd",
                "archived_at": datetime.now(timezone.utc).isoformat(),
            }
            store.put_bytes(archive_manifest_key(month), json.dumps(manifest, indent=2).encode())
            conn.execute(f"ALTER TABLE {PARTITIONED_TABLE} DETACH PARTITION {name}")
            conn.execute(f"DROP TABLE {name}")
            conn.commit()
        except psycopg.errors.LockNotAvailable as exc:
            conn.rollback()
            raise _lock_problem(exc, f"archiving partition {name}") from None
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()
        report.archived.append({k: manifest[k] for k in ("partition", "month", "rows", "key", "compressed_bytes", "sha256")})
    return report


# ---- slow queries ---------------------------------------------------------------------------


@dataclass
class SlowQueries:
    available: bool
    reason: str = ""
    statements: list[dict] = field(default_factory=list)
    """{query, calls, total_ms, mean_ms, rows} of this database, by total time."""


def top_statements(url: URL, limit: int = 20) -> SlowQueries:
    """The statements of this database that took the most time, from pg_stat_statements
    (its query texts are normalized: constants appear as $1, so no values leak)."""
    import psycopg

    with _connect(url) as conn:
        installed = conn.execute(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_stat_statements'"
        ).fetchone()
        if installed is None:
            return SlowQueries(False, "pg_stat_statements is not created in the platform database (see `maestro db status`)")
        schema = quote_ident(installed[0])
        try:
            rows = conn.execute(
                f"SELECT query, calls, total_exec_time, mean_exec_time, rows FROM {schema}.pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "ORDER BY total_exec_time DESC LIMIT %s", [limit]
            ).fetchall()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            return SlowQueries(False, "pg_stat_statements is created but not loaded: add it to shared_preload_libraries "
                                      "and restart the server")
        except psycopg.errors.InsufficientPrivilege:
            return SlowQueries(False, "the platform database's user may not read pg_stat_statements: "
                                      "GRANT pg_read_all_stats TO it")
    return SlowQueries(True, "", [
        {"query": " ".join(query.split())[:300], "calls": int(calls), "total_ms": round(float(total), 3),
         "mean_ms": round(float(mean), 3), "rows": int(n)}
        for query, calls, total, mean, n in rows
    ])


# ---- the platform at a glance ---------------------------------------------------------------


def tenant_summary(url: URL) -> list[dict]:
    """Per tenant, from tenant_usage_statistics (refreshed by upkeep): models, experiments,
    active deployments, predictions."""
    with _connect(url) as conn:
        cursor = conn.execute(
            "SELECT tenant_name, status, models, model_versions, experiments, failed_experiments, active_deployments, "
            "predictions, predictions_last_30_days, last_prediction_at, refreshed_at "
            "FROM tenant_usage_statistics ORDER BY tenant_name"
        )
        columns = [c.name for c in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]
