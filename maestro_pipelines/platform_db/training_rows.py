"""A tenant's training rows from a file, into the embedded default's `training_rows`.

The file is what people export from a spreadsheet or a warehouse, in the wide layout: a
header line, one numeric column per feature, a `label` column (the class to learn) and an
optional key column (`entity_key`, `key` or `id`, or the one named with `key_column`).
In `training_rows` each row becomes one JSON object of features (`features jsonb`), its label
as text and its key as `entity_key`: the layout the embedded default's source reads.

Loading is all or nothing (one transaction, and nothing at all when one row is bad: every
bad row is named with its line). A row's key makes loading idempotent: a row whose key is
already there is updated when it differs and left alone when it does not, so loading the
same file twice adds nothing. Without a key column a row's key is a hash of its content.
`replace=True` makes the tenant's rows exactly the file's (rows not in it are deleted).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from maestro_pipelines.errors import MaestroError

LABEL_COLUMN = "label"
KEY_COLUMN_NAMES = ("entity_key", "key", "id")
# Columns Maestro fills itself: in a file they would silently become features.
RESERVED_COLUMNS = ("tenant", "tenant_id", "features", "updated_at", "created_at", "_id", "entity_key", "id")
FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SHOWN_PROBLEMS = 10
SHOWN_VALUE = 30
PROGRESS_EVERY_ROWS = 2_000
PARQUET_BATCH_ROWS = 10_000

Progress = Callable[[int, "int | None"], None]
"""(done, total) in the file's own unit: bytes of a CSV file, rows of a Parquet file."""


@dataclass(frozen=True)
class FileLayout:
    columns: tuple[str, ...]
    label: int
    key: int | None
    features: tuple[tuple[int, str], ...]  # (position, name)

    @property
    def key_column(self) -> str | None:
        return None if self.key is None else self.columns[self.key]

    @property
    def feature_names(self) -> list[str]:
        return [name for _, name in self.features]


@dataclass
class LoadResult:
    tenant: str
    file: str
    file_format: str
    rows: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    features: list[str]
    key_column: str | None
    tenant_rows: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- reading files ------------------------------------------------------------------------------


def file_format(path: Path) -> str:
    if not path.exists():
        raise MaestroError(f"{path} does not exist", "Give the path of a CSV or Parquet file")
    if not path.is_file():
        raise MaestroError(f"{path} is not a file", "Give the path of a CSV or Parquet file")
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise MaestroError(
            f"{path.name}: '{path.suffix or 'no extension'}' is not a file type Maestro reads",
            f"Export the rows as CSV (.csv) or Parquet (.parquet); known endings: {', '.join(FORMATS)}",
        )
    return found


class CsvRows:
    """A CSV file's header and rows, each with its line number (the header is line 1)."""

    file_format = "csv"

    def __init__(self, path: Path):
        self.path = path
        self.total = path.stat().st_size
        self._raw = open(path, "rb")  # noqa: SIM115 (closed by close())
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark.
        self._text = io.TextIOWrapper(self._raw, encoding="utf-8-sig", newline="")
        try:
            first_line = self._text.readline()
            self._text.seek(0)
        except UnicodeDecodeError:
            self.close()
            raise _not_utf8(path) from None
        # Spreadsheets in many locales write ';' (or tabs): the header line tells which.
        delimiter = max(",;\t", key=first_line.count)
        self._reader = csv.reader(self._text, delimiter=delimiter)
        self.columns = self._header()

    def _header(self) -> list[str]:
        try:
            header = next(self._reader, None)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise _unreadable(self.path, exc) from None
        if not header or not any(cell.strip() for cell in header):
            raise MaestroError(f"{self.path.name} is empty", "Export the rows with a header line naming the columns")
        return [cell.strip() for cell in header]

    def rows(self) -> Iterator[tuple[str, Sequence[Any]]]:
        try:
            for cells in self._reader:
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line (spreadsheets leave them at the end)
                yield f"line {self._reader.line_num}", cells
        except UnicodeDecodeError:
            raise _not_utf8(self.path, f" after line {self._reader.line_num}") from None
        except csv.Error as exc:
            raise _unreadable(self.path, exc, f" at line {self._reader.line_num}") from None

    def done(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()


def _not_utf8(path: Path, where: str = "") -> MaestroError:
    return MaestroError(f"{path.name} is not UTF-8 text{where}", "Save it as \"CSV UTF-8\" (or export it as Parquet)")


def _unreadable(path: Path, exc: BaseException, where: str = "") -> MaestroError:
    return MaestroError(f"{path.name} is not readable as CSV{where}: {exc}", "Export it again as CSV, or as Parquet")


class ParquetRows:
    """A Parquet file's columns and rows, each with its number (the first row is row 1)."""

    file_format = "parquet"

    def __init__(self, path: Path):
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise MaestroError("reading Parquet needs pyarrow, which is not installed",
                               "Install it with: pip install pyarrow (or export the rows as CSV)") from None
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MaestroError(f"{path.name} is not a readable Parquet file ({first})", "Export it again") from None
        self.columns = [str(name).strip() for name in self._file.schema_arrow.names]
        self.total = self._file.metadata.num_rows
        self._done = 0

    def rows(self) -> Iterator[tuple[str, Sequence[Any]]]:
        for batch in self._file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for values in zip(*(column.to_pylist() for column in batch.columns)):
                self._done += 1
                yield f"row {self._done}", values

    def done(self) -> int:
        return self._done

    def close(self) -> None:
        self._file.close()


def open_rows(path: Path) -> CsvRows | ParquetRows:
    return CsvRows(path) if file_format(path) == "csv" else ParquetRows(path)


# ---- the layout ---------------------------------------------------------------------------------


def file_layout(columns: Sequence[str], file_name: str, key_column: str | None = None) -> FileLayout:
    """Which column is the label, which the key, which are features; refused with one line
    naming the column when the header cannot be a tenant's training rows."""
    lowered = [c.lower() for c in columns]
    for position, name in enumerate(columns):
        if not name:
            raise MaestroError(f"{file_name}: column {position + 1} has no name", "Name every column in the header line")
        if lowered.count(name.lower()) > 1:
            raise MaestroError(f"{file_name}: column '{name}' appears twice in the header", "Name each column once")
    if LABEL_COLUMN not in lowered:
        raise MaestroError(
            f"{file_name} has no '{LABEL_COLUMN}' column (columns: {_names(columns)})",
            "Name the column holding each row's class `label`",
        )
    if key_column is not None and key_column.lower() not in lowered:
        raise MaestroError(f"{file_name} has no key column '{key_column}' (columns: {_names(columns)})",
                           "Give --key the name of a column of the file, or leave it out")
    wanted = key_column.lower() if key_column else next((k for k in KEY_COLUMN_NAMES if k in lowered), None)
    key = None if wanted is None else lowered.index(wanted)
    label = lowered.index(LABEL_COLUMN)
    for position, name in enumerate(lowered):
        if name in RESERVED_COLUMNS and position != key:
            raise MaestroError(
                f"{file_name}: column '{columns[position]}' is set by Maestro, not read from the file",
                "Remove it from the file (or name it as the key with --key)",
            )
    features = tuple((p, c) for p, c in enumerate(columns) if p not in (label, key))
    if not features:
        raise MaestroError(f"{file_name} has no feature column (columns: {_names(columns)})",
                           "Add one numeric column per feature next to `label`")
    return FileLayout(tuple(columns), label, key, features)


def _names(names: Sequence[str], shown: int = 8) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ---- checking rows ------------------------------------------------------------------------------


class RowProblems:
    """Every bad row is counted; the first SHOWN_PROBLEMS are named in the error."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def add(self, where: str, what: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN_PROBLEMS:
            self.shown.append(f"{where}: {what}")

    def raise_if_any(self, file_name: str) -> None:
        if not self.count:
            return
        more = f"; and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        rows = "1 bad row" if self.count == 1 else f"{self.count:,} bad rows"
        raise MaestroError(
            f"{file_name}: {rows}, nothing loaded: {'; '.join(self.shown)}{more}",
            "Fix them (every feature a number, every row a label and a distinct key; a text column that is not "
            "a feature does not belong in the file) and load the file again",
        )


def _shown(value: object) -> str:
    value = str(value)
    return repr(value if len(value) <= SHOWN_VALUE else value[:SHOWN_VALUE] + "...")


def feature_value(value: object, column: str) -> float:
    """A feature as a float; ValueError says why not, naming the column."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"no value in column '{column}'")
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise ValueError(f"{_shown(value)} in column '{column}' is not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        decimal_comma = isinstance(value, str) and "," in value
        why = " (write decimals with '.')" if decimal_comma else ""
        raise ValueError(f"{_shown(value)} in column '{column}' is not a number{why}") from None
    if not math.isfinite(number):
        raise ValueError(f"{_shown(value)} in column '{column}' is not a finite number")
    return number


def text_value(value: object) -> str:
    """A label or key as text: 1.0 from a Parquet float column is '1', as a CSV would say."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def checked_rows(table, layout: FileLayout, problems: RowProblems) -> Iterator[tuple[str, str, str]]:
    """(entity_key, features JSON, label) of each good row; bad rows go to `problems`."""
    seen: dict[str, str] = {}
    copies: Counter[str] = Counter()
    width = len(layout.columns)
    for where, values in table.rows():
        if len(values) != width:
            problems.add(where, f"{len(values)} values for {width} columns")
            continue
        wrong, features = [], {}
        for position, name in layout.features:
            try:
                features[name] = feature_value(values[position], name)
            except ValueError as exc:
                wrong.append(str(exc))
        label = text_value(values[layout.label])
        if not label:
            wrong.append("empty label")
        key = None if layout.key is None else text_value(values[layout.key])
        if key == "":
            wrong.append(f"empty key in column '{layout.key_column}'")
        elif key is not None and key in seen:
            wrong.append(f"key {_shown(key)} is already on {seen[key]}")
        if wrong:
            problems.add(where, ", ".join(wrong))
            continue
        encoded = json.dumps(features, sort_keys=True)
        if key is None:
            # No key column: the content is the key, so loading the same rows again adds nothing.
            digest = hashlib.sha256(f"{label}\x1f{encoded}".encode()).hexdigest()[:20]
            copies[digest] += 1
            key = f"row-{digest}" + (f"-{copies[digest]}" if copies[digest] > 1 else "")
        else:
            seen[key] = where
        yield key, encoded, label


# ---- writing ------------------------------------------------------------------------------------


def _locked_tenant(conn: Connection, name: str) -> None:
    """The tenant must exist; its row is locked so two loads of one tenant take turns."""
    from maestro_pipelines.platform_db.tenants import validate_tenant_name

    found = conn.execute(
        text("SELECT id FROM tenants WHERE name = :n FOR UPDATE"), {"n": validate_tenant_name(name)}
    ).one_or_none()
    if found is None:
        raise MaestroError(f"tenant '{name}' does not exist", f"Add it first with `maestro tenants add {name}`")


TRAINING_ROWS_DDL = """
CREATE TABLE IF NOT EXISTS training_rows (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    entity_key  text NOT NULL,
    features    jsonb NOT NULL,
    label       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT training_rows_tenant_entity_key UNIQUE (tenant, entity_key)
);
CREATE INDEX IF NOT EXISTS training_rows_tenant_updated_idx ON training_rows (tenant, updated_at);
"""


def ensure_training_rows_table(conn: Connection) -> None:
    """training_rows, the embedded default data source (tenant loads and the demo tenants)."""
    conn.execute(text(TRAINING_ROWS_DDL))


def _ensure_table(conn: Connection) -> None:
    """The first load creates training_rows; two first loads at once take turns (concurrent
    CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalog)."""
    if conn.execute(text("SELECT to_regclass('training_rows') IS NULL")).scalar_one():
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('maestro:training_rows'))"))
        ensure_training_rows_table(conn)


def _check_same_features(conn: Connection, tenant: str, layout: FileLayout, file_name: str) -> None:
    """Rows added next to a tenant's rows must have the same features, or training fails."""
    row = conn.execute(text("SELECT features FROM training_rows WHERE tenant = :t LIMIT 1"), {"t": tenant}).one_or_none()
    if row is None:
        return
    existing = sorted(row.features if isinstance(row.features, dict) else json.loads(row.features))
    if existing != sorted(layout.feature_names):
        raise MaestroError(
            f"the features of {file_name} ({_names(sorted(layout.feature_names), 5)}) are not those of the rows "
            f"tenant {tenant} has ({_names(existing, 5)})",
            "Load the file with --replace to replace the tenant's rows, or give it the same feature columns",
        )


def _copy_rows(conn: Connection, rows: Iterator[tuple[str, str, str]], table, progress: Progress | None) -> int:
    """COPY the checked rows into a temporary table (one stream: 10^5 rows take about a second)."""
    conn.execute(text("DROP TABLE IF EXISTS pg_temp.incoming_training_rows"))
    conn.execute(text(
        "CREATE TEMPORARY TABLE incoming_training_rows (entity_key text NOT NULL, features jsonb NOT NULL, "
        "label text NOT NULL) ON COMMIT DROP"
    ))
    count = 0
    with conn.connection.driver_connection.cursor() as cursor:
        with cursor.copy("COPY incoming_training_rows (entity_key, features, label) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
                if progress is not None and count % PROGRESS_EVERY_ROWS == 0:
                    progress(table.done(), table.total)
    if progress is not None:
        progress(table.total, table.total)
    return count


MERGE_SQL = """
WITH merged AS (
    INSERT INTO training_rows (tenant, entity_key, features, label)
    SELECT :t, entity_key, features, label FROM incoming_training_rows
    ON CONFLICT (tenant, entity_key) DO UPDATE
        SET features = EXCLUDED.features, label = EXCLUDED.label, updated_at = now()
        WHERE training_rows.features IS DISTINCT FROM EXCLUDED.features
           OR training_rows.label IS DISTINCT FROM EXCLUDED.label
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""

DELETE_OTHERS_SQL = """
DELETE FROM training_rows r WHERE r.tenant = :t
  AND NOT EXISTS (SELECT 1 FROM incoming_training_rows i WHERE i.entity_key = r.entity_key)
"""


def _merge(conn: Connection, tenant: str, replace: bool) -> tuple[int, int, int]:
    """(inserted, updated, deleted). Unchanged rows keep their updated_at: the retraining
    sensor sees no change when the same file is loaded again."""
    deleted = conn.execute(text(DELETE_OTHERS_SQL), {"t": tenant}).rowcount if replace else 0
    inserted, updated = conn.execute(text(MERGE_SQL), {"t": tenant}).one()
    return int(inserted), int(updated), int(deleted)


def load_training_rows(
    conn: Connection, tenant: str, path: str | Path, *, key_column: str | None = None,
    replace: bool = False, progress: Progress | None = None,
) -> LoadResult:
    """Load FILE's rows for `tenant` inside the caller's transaction (the caller commits;
    on any error it rolls back and nothing is loaded)."""
    started = time.perf_counter()
    path = Path(path).expanduser()
    table = open_rows(path)
    try:
        layout = file_layout(table.columns, path.name, key_column)
        _locked_tenant(conn, tenant)
        _ensure_table(conn)
        if not replace:
            _check_same_features(conn, tenant, layout, path.name)
        problems = RowProblems()
        count = _copy_rows(conn, checked_rows(table, layout, problems), table, progress)
    finally:
        table.close()
    problems.raise_if_any(path.name)
    if count == 0:
        raise MaestroError(f"{path.name} has a header but no rows", "Export the rows below the header line")
    inserted, updated, deleted = _merge(conn, tenant, replace)
    total = conn.execute(text("SELECT count(*) FROM training_rows WHERE tenant = :t"), {"t": tenant}).scalar_one()
    return LoadResult(
        tenant=tenant, file=str(path), file_format=table.file_format, rows=count, inserted=inserted,
        updated=updated, unchanged=count - inserted - updated, deleted=deleted, features=layout.feature_names,
        key_column=layout.key_column, tenant_rows=int(total), seconds=round(time.perf_counter() - started, 3),
    )


def row_counts(conn: Connection) -> dict[str, int]:
    """Rows per tenant in the platform database's training_rows (none before the first load)."""
    if conn.execute(text("SELECT to_regclass('training_rows') IS NULL")).scalar_one():
        return {}
    return dict(conn.execute(text("SELECT tenant, count(*) FROM training_rows GROUP BY tenant")).all())


# ---- can these rows train a model? ----------------------------------------------------------------

TEST_FRACTION = 0.2
"""The share of rows held out for testing: FeatureConfig.test_fraction's default (assets/ml.py)."""
ROWS_THAT_USUALLY_SPLIT = 10
"""With 1 row in 5 held out by a hash of its key, 10 rows leave both sides empty about 1 time in 10."""

# A row's side of the split, as ml/features.py in_test_split decides it: the first 8 bytes of
# sha256("tenant:entity_key"), big-endian, modulo 10,000, against test_fraction * 10,000.
_BUCKET = " + ".join(f"get_byte(h.digest, {i})::numeric * {256 ** (7 - i)}" for i in range(8))
SPLIT_SQL = f"""
SELECT split.tenant, count(*) AS total_rows, count(*) FILTER (WHERE held_out) AS test_rows,
       count(DISTINCT label) AS labels, count(DISTINCT label) FILTER (WHERE NOT held_out) AS training_labels,
       min(label) AS some_label
FROM (
    SELECT r.tenant, r.label, (({_BUCKET}) % 10000) < :threshold AS held_out
    FROM training_rows r, LATERAL (SELECT sha256(convert_to(r.tenant || ':' || r.entity_key, 'UTF8')) AS digest) h
    WHERE r.tenant = ANY(:tenants)
) split
GROUP BY split.tenant
"""


def why_untrainable(conn: Connection, tenant: str, test_fraction: float = TEST_FRACTION) -> str | None:
    """Why the tenant's rows in training_rows cannot train a model yet (the split of ml/features.py
    leaves a side empty, or one label class where a classifier needs two), or None when they can
    (gates may still refuse the model). No rows, or no table yet: None (that is another wait)."""
    return untrainable_tenants(conn, [tenant], test_fraction).get(tenant)


def untrainable_tenants(conn: Connection, tenants: list[str], test_fraction: float = TEST_FRACTION) -> dict[str, str]:
    """{tenant: why its rows cannot train a model yet} for those of `tenants` whose rows cannot
    (see why_untrainable), from one query however many tenants are asked about."""
    if not tenants or conn.execute(text("SELECT to_regclass('training_rows') IS NULL")).scalar_one():
        return {}
    splits = conn.execute(text(SPLIT_SQL), {"tenants": list(tenants), "threshold": int(test_fraction * 10_000)})
    reasons = {split.tenant: _split_problem(split, test_fraction) for split in splits}
    return {tenant: reason for tenant, reason in reasons.items() if reason is not None}


def _split_problem(split, test_fraction: float) -> str | None:
    rows = "1 row" if split.total_rows == 1 else f"{split.total_rows:,} rows"
    reasons = []
    if split.labels < 2:
        reasons.append(f"every row has label {_shown(split.some_label)}, and a classifier needs two classes or more")
    if split.test_rows in (0, split.total_rows):
        side = "none of them for testing" if split.test_rows == 0 else "none of them for training"
        reasons.append(f"the train/test split (1 row in {round(1 / test_fraction)} held out by a hash of its key) "
                       f"keeps {side}: load more rows ({ROWS_THAT_USUALLY_SPLIT} or more usually do)")
    elif split.labels >= 2 and split.training_labels < 2:
        reasons.append("the rows kept for training all have the same label: load more rows of each class")
    return f"tenant {split.tenant}'s {rows} cannot train a model yet: {'; '.join(reasons)}" if reasons else None
