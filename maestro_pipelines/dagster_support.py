"""What the Dagster wrappers (assets, jobs, sensors, schedules) share: run tags, pools, retry
policies, the progress log and the builders of metadata tables and lists.

Only the Dagster layer imports this module; the libraries (`storage`, `platform_db`, `backup`,
`ml`) never do. It imports nothing heavy: every Dagster process loads it with the definitions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Optional

import dagster as dg

from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.formatting import human_bytes

# ---- run tags --------------------------------------------------------------------------------

KIND_TAG = "maestro/kind"
"""What a run does (backup, archive, retention, verify, restore, drill, upkeep, training,
deployment): the failure-alert sensor and the UI's run filters select runs by it."""
LANE_TAG = "maestro/lane"
DATABASE_LANE = {LANE_TAG: "database"}
"""Runs that dump, restore or alter the databases wholesale carry this tag; the production
instance (deploy/dagster.yaml) lets one such run at a time out of the queue, so a backup, a
restore, a drill and the upkeep's DDL never run together."""
MAX_RUNTIME_TAG = "dagster/max_runtime"
"""Seconds after which the daemon's run monitoring ends a hung run as failed (which alerts)."""


def run_tags(kind: str, max_runtime_s: Optional[int] = None, database_lane: bool = False) -> dict[str, str]:
    """The tags of a job's runs: its `maestro/kind`, the database lane, its maximum runtime."""
    tags = {KIND_TAG: kind}
    if database_lane:
        tags.update(DATABASE_LANE)
    if max_runtime_s is not None:
        tags[MAX_RUNTIME_TAG] = str(max_runtime_s)
    return tags


# ---- pools -----------------------------------------------------------------------------------

BACKUP_POOL = "maestro_backup"
"""Every step that writes the backup store or restores (backup, archive, retention,
verification, restore, drill): two of them never run at once once the instance has a limit
(`dagster instance concurrency set maestro_backup 1`)."""
PLATFORM_DATABASE_POOL = "platform_database"
"""Steps that write many platform-database rows or hold a transaction over another service's
call (deployment, predictions); a training's two short writes are not in it."""
DDL_POOL = "platform_database_ddl"
"""Steps that take DDL's strong locks (migrations, partition upkeep): never two at once."""

# ---- retry policies --------------------------------------------------------------------------
# A MaestroError (configuration, bad input) never waits for these: `backup_step` and
# `fail_fast_on_user_errors` fail it at once (maestro_pipelines.failures).

DEFAULT_EXECUTOR = dg.in_process_executor
"""Every run's steps run in its run worker's own process (a pod on Kubernetes), one after
another. What users launch from the UI (Materialize all on a tenant's ML graph, one backup
asset and its checks) and every job are chains of a few steps: Dagster's default executor
started an interpreter per step, each importing the code location, MLflow and scikit-learn
again (a tenant's graph from the UI: minutes on 2 busy cores instead of seconds) and buying
no parallelism. Runs still go in parallel, as separate run workers (the queue's limits)."""

NETWORK_RETRY = dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
"""Reading the source and talking to MLflow and the platform database cross the network in
production: 5, 10 then 20 s (and the connect timeouts) outlast a managed database's failover."""
STORE_RETRY = dg.RetryPolicy(max_retries=2, delay=60, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
"""Retries of transient backup-store failures (`StoreUnavailable`: the store retried each
request already), a minute apart: a backup or archive is worth the wait."""
UPKEEP_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)
"""The partition upkeep's archive uploads and DDL: a lock timeout or a store hiccup, retried soon."""


def backup_step(fn):
    """Decorate a backup asset/op body: transient errors (store or database unavailable) retry
    under STORE_RETRY, other MaestroErrors fail at once."""
    return fail_fast_on_user_errors(fn)


# ---- progress --------------------------------------------------------------------------------


class ProgressLog:
    """The libraries' byte progress (create_backup, verify_backup, restore_backup, run_drill:
    `progress(label, done, expected)`) -> context.log, about every 10% per database."""

    def __init__(self, log, what: str):
        self.log = log
        self.what = what
        self.logged: dict[str, int] = {}
        self.started = time.monotonic()

    def __call__(self, label: str, done: int, expected: Optional[int]) -> None:
        if expected:
            percent = min(100, int(done * 100 / expected))
            step = percent // 10 * 10
            if step <= self.logged.get(label, -1):
                return
            self.logged[label] = step
            # For a dump, `expected` is the database's size on disk: the dump is usually smaller
            # (no indexes), so the last step jumps to 100%.
            self.log.info(
                f"{self.what} {label}: {human_bytes(done)} (~{percent}% of {human_bytes(expected)}), "
                f"{time.monotonic() - self.started:.1f} s"
            )
        else:
            self.log.info(f"{self.what} {label}: {human_bytes(done)}, {time.monotonic() - self.started:.1f} s")


# ---- metadata --------------------------------------------------------------------------------

MiB = 1024 * 1024
"""Sizes in metadata are MiB (2^20 bytes, the unit of the CLI's KiB/MiB/GiB): readable on a plot's axis."""


def mib(size: float, digits: int = 3) -> float:
    """`size` bytes in MiB, rounded: a metadata number."""
    return round(size / MiB, digits)


@dataclass(frozen=True)
class Column:
    """A column of a metadata table. `type` empty: taken from the first value in the rows."""

    name: str
    type: str = ""
    description: Optional[str] = None


def table_cell(value: Any) -> Any:
    """A value a TableRecord accepts (str, int, float, bool): None is empty, times ISO 8601."""
    if value is None:
        return ""
    if isinstance(value, (datetime, date)):
        return value.isoformat(timespec="seconds") if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _column_type(rows: Sequence[Mapping], name: str) -> str:
    sample = next((r[name] for r in rows if r.get(name) is not None), None)
    return ("bool" if isinstance(sample, bool) else "int" if isinstance(sample, int)
            else "float" if isinstance(sample, float) else "string")


def metadata_table(rows: Iterable[Mapping], columns: Optional[Sequence[Column | str]] = None) -> dg.MetadataValue:
    """A metadata table of `rows` (dicts) with `columns` (names or Columns, in order; default
    the first row's keys). A column without a type takes it from its first value."""
    rows = list(rows)
    named = columns if columns is not None else (list(rows[0]) if rows else [])
    typed = []
    for column in named:
        column = column if isinstance(column, Column) else Column(column)
        typed.append(column if column.type else Column(column.name, _column_type(rows, column.name), column.description))
    return dg.MetadataValue.table(
        [dg.TableRecord({c.name: table_cell(r.get(c.name)) for c in typed}) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c.name, c.type, description=c.description) for c in typed]),
    )


def frame_table(frame) -> dg.MetadataValue:
    """A pandas DataFrame as a metadata table: numeric columns `number`, the rest text (NaN as text)."""
    columns = [Column(str(c), "number" if str(t).startswith(("int", "float")) else "string") for c, t in frame.dtypes.items()]
    rows = [
        {str(k): (v if isinstance(v, (int, float, bool)) and not (isinstance(v, float) and math.isnan(v)) else str(v))
         for k, v in row.items()}
        for row in frame.to_dict("records")
    ]
    return metadata_table(rows, columns)


def markdown_list(items: Iterable[str], empty: str = "none") -> dg.MetadataValue:
    """Notes, problems, warnings as a markdown list; `empty` when there are none."""
    return dg.MetadataValue.md("\n".join(f"- {item}" for item in items) or empty)
