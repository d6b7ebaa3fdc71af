"""Per-table row counts and content checksums: taken inside the dump's snapshot at backup
time, and again on the restored database, so a drill proves the restored data equals what
was dumped.

The checksum is `bit_xor(hash_record_extended(row, 0))` over a table: order-independent, one
sequential scan, computed by the server from the values' binary form: 3x cheaper than
hashing row text (measured: 0.40 s vs 1.27 s per million rows), and independent of time zone
or date style. It runs on the second core while pg_dump keeps the first busy, which is why
it must be cheap. XOR lets two identical rows cancel out; the row count next to it catches a
lost pair, and tables here have primary keys. The type hash functions are
the ones hash partitioning relies on, so they are stable across major versions (a PG 15
backup restored on 18 compares). A table with a column type that has no hash function
(json, tsvector, point...), or one whose hash function hashes OIDs (enums, reg* types: a
restore gives them new OIDs), falls back to `bit_xor(hashtextextended(row::text, 0))`, with
the session settings that shape row text pinned by `pgtools.CHECKSUM_SESSION_OPTIONS` on both
sides. The method is part of the recorded value (`h:` or `t:`), so both sides compare like
with like.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maestro_pipelines.backup.manifest import TableCheck
from maestro_pipelines.platform_db.admin import quote_ident

# Ordinary tables (leaf partitions included: partitioned parents hold no rows) that pg_dump
# dumps data for: not in system schemas, not temporary, not owned by an extension.
TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND c.relpersistence = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def list_tables(cursor) -> list[tuple[str, str]]:
    cursor.execute(TABLES_SQL)
    return [(schema, name) for schema, name in cursor.fetchall()]


_HASHED = "SELECT count(*), coalesce(bit_xor(hash_record_extended(t, 0)), 0)::text FROM {} AS t"
_TEXT = "SELECT count(*), coalesce(bit_xor(hashtextextended(t::text, 0)), 0)::text FROM {} AS t"
# PostgreSQL 13 has neither hash_record_extended nor bit_xor.
_TEXT_PG13 = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {} AS t"


# Whether a table's columns hold, at any depth (arrays, domains, composite types, ranges and
# multiranges), an enum or a reg* type: their hash functions hash OIDs, which a restore
# assigns anew (`CREATE TYPE ... AS ENUM` gets new ones), so hash_record_extended of the same
# rows differs between the backed-up and the restored database. Such tables use row text.
_HASHES_OIDS_SQL = """
WITH RECURSIVE used(type) AS (
    SELECT atttypid FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped
  UNION
    SELECT parts.next FROM used JOIN pg_type t ON t.oid = used.type
    CROSS JOIN LATERAL (
        SELECT nullif(t.typelem, 0) UNION ALL SELECT nullif(t.typbasetype, 0)
        UNION ALL SELECT a.atttypid FROM pg_attribute a
                  WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid OR r.rngmultitypid = t.oid
    ) AS parts(next)
    WHERE parts.next IS NOT NULL
)
SELECT EXISTS (
    SELECT 1 FROM used JOIN pg_type t ON t.oid = used.type
    WHERE t.typtype = 'e' OR (t.typnamespace = 'pg_catalog'::regnamespace AND t.typname LIKE 'reg%%')
)
"""


def check_table(cursor, schema: str, name: str, checksums: bool, server_version_num: int = 180000) -> TableCheck:
    import psycopg

    relation = f"{quote_ident(schema)}.{quote_ident(name)}"
    if not checksums:
        cursor.execute(f"SELECT count(*) FROM {relation}")
        return TableCheck(schema, name, int(cursor.fetchone()[0]), None)
    if server_version_num < 140000:
        cursor.execute(_TEXT_PG13.format(relation))
        rows, checksum = cursor.fetchone()
        return TableCheck(schema, name, int(rows), f"s:{checksum}")
    cursor.execute(_HASHES_OIDS_SQL, (relation,))
    if not cursor.fetchone()[0]:
        try:
            with cursor.connection.transaction():  # a savepoint: the fallback runs in the same snapshot
                cursor.execute(_HASHED.format(relation))
                rows, checksum = cursor.fetchone()
                return TableCheck(schema, name, int(rows), f"h:{checksum}")
        except psycopg.errors.UndefinedFunction:  # a column type without an extended hash function
            pass
    cursor.execute(_TEXT.format(relation))
    rows, checksum = cursor.fetchone()
    return TableCheck(schema, name, int(rows), f"t:{checksum}")


def table_checks(connection, checksums: bool = True) -> list[TableCheck]:
    """Checks of every table, on a psycopg connection (inside whatever transaction it holds)."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        version = int(cursor.fetchone()[0])
        return [check_table(cursor, schema, name, checksums, version) for schema, name in list_tables(cursor)]


_SIZES_SQL = """
SELECT pg_relation_size(format('%%I.%%I', schema_name, table_name)::regclass)
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(schema_name, table_name, position)
ORDER BY position
"""


def table_checks_concurrently(connect: Callable[[], Any], checksums: bool = True, workers: int = 2,
                              done: Mapping[tuple[str, str], TableCheck] | None = None) -> list[TableCheck]:
    """`table_checks` of a database nobody writes (a restored scratch database) over `workers`
    connections from `connect()`, each taking the next table, biggest first: the same queries,
    spread over the cores (the partitions of a big table are tables of their own, and one
    query keeps one core busy). In list_tables' order, like table_checks. `done`: (schema,
    table) -> its check already taken (`TableChecksBeside`), not queried again."""
    done = done or {}
    with connect() as connection, connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        version = int(cursor.fetchone()[0])
        tables = list_tables(cursor)
        checks: dict[int, TableCheck] = {index: done[table] for index, table in enumerate(tables) if table in done}
        left = [index for index in range(len(tables)) if index not in checks]
        if workers <= 1 or len(left) <= 1:
            checks.update((index, check_table(cursor, *tables[index], checksums, version)) for index in left)
            return [checks[index] for index in range(len(tables))]
        cursor.execute(_SIZES_SQL, ([tables[index][0] for index in left], [tables[index][1] for index in left]))
        sizes = dict(zip(left, (size for (size,) in cursor.fetchall())))
    pending = sorted(left, key=lambda index: -sizes[index])
    lock = threading.Lock()

    def work() -> None:
        with connect() as connection, connection.cursor() as cursor:
            while True:
                with lock:
                    if not pending:
                        return
                    index = pending.pop(0)
                checks[index] = check_table(cursor, *tables[index], checksums, version)

    with ThreadPoolExecutor(max_workers=min(workers, len(left)), thread_name_prefix="table-checks") as pool:
        for finished in [pool.submit(work) for _ in range(min(workers, len(left)))]:
            finished.result()  # the first worker's error, if any
    return [checks[index] for index in range(len(tables))]


# An ordinary table whose rows only its own TABLE DATA entry puts in: not a partition of a tree
# with a hash level. pg_dump loads those through their root (forced for hash keys on enums,
# whose routing depends on OIDs), so their rows arrive with other partitions' entries; a range
# or list partition's entry is a COPY into the partition itself.
_LOADED_ALONE_SQL = """
SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r'
  AND NOT EXISTS (
      SELECT 1 FROM pg_partition_ancestors(c.oid) AS a
      JOIN pg_partitioned_table p ON p.partrelid = a.relid
      WHERE p.partstrat = 'h')
"""


class TableChecksBeside:
    """`check_table` of each table as soon as pg_restore says its data is in, on one connection
    of its own while pg_restore goes on with the other tables and the indexes: a restore's
    verification then mostly overlaps its load instead of following it.

    A table's rows are final once its TABLE DATA entry is done (indexes, constraints and
    triggers come later and write no rows); partitions of hash-partitioned trees are left to
    the final pass (`_LOADED_ALONE_SQL`). Each check commits at once, so this connection holds
    at most one table's ACCESS SHARE lock, and only while it scans it: pg_restore's ALTER TABLE on that table waits for the scan, and no lock
    cycle with pg_restore's workers can form. A check that fails here (connection lost) is
    simply not in `done`: the final pass (`table_checks_concurrently(done=...)`) takes it, and
    reports its error as it would have."""

    def __init__(self, connect: Callable[[], Any], checksums: bool = True):
        self._connect, self._checksums = connect, checksums
        self._loaded: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._stopping = False
        self._connection: Any = None
        self.done: dict[tuple[str, str], TableCheck] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._check_loaded_tables, name="table-checks-beside", daemon=True)
        self._thread.start()

    def table_loaded(self, schema: str, name: str) -> None:
        """pg_restore finished loading `schema.name`'s rows."""
        self._loaded.put((schema, name))

    def _check_loaded_tables(self) -> None:
        try:
            with self._connect() as connection, connection.cursor() as cursor:
                self._connection = connection
                cursor.execute("SHOW server_version_num")
                version = int(cursor.fetchone()[0])
                connection.commit()
                while (table := self._loaded.get()) is not None and not self._stopping:
                    cursor.execute(_LOADED_ALONE_SQL, table)
                    if cursor.fetchone() is not None:
                        self.done[table] = check_table(cursor, *table, self._checksums, version)
                    connection.commit()  # no lock kept past the scan
        except Exception as exc:  # noqa: BLE001 - the final pass checks what is not done, and fails as itself
            self.error = exc

    def stop(self, cancel: bool = False, drain: bool = False) -> dict[tuple[str, str], TableCheck]:
        """Stop taking tables once the check under way ends (the final pass spreads the ones
        still queued over its connections); with `drain`, check the queued ones here first;
        with `cancel` (the restore failed), cancel the check under way. The checks done."""
        if not drain:
            self._stopping = True
        self._loaded.put(None)
        connection = self._connection
        if cancel and connection is not None:
            self._stopping = True
            try:
                connection.cancel_safe(timeout=5)
            except Exception:  # noqa: BLE001 - already closed: nothing to cancel
                pass
        self._thread.join()
        return dict(self.done)


# Each leaf partition -> the root of its partition tree (PostgreSQL 12 and later).
_PARTITION_ROOTS_SQL = """
SELECT n.nspname || '.' || c.relname, rn.nspname || '.' || r.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = pg_partition_root(c.oid)
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE c.relkind = 'r' AND c.relispartition
"""


def partition_roots(cursor) -> dict[str, str]:
    """`schema.leaf` -> `schema.root` of every partition in the database."""
    cursor.execute(_PARTITION_ROOTS_SQL)
    return dict(cursor.fetchall())


def compare_checks(expected: list[TableCheck], actual: list[TableCheck],
                   roots: dict[str, str] | None = None) -> list[str]:
    """Differences between the manifest's checks and a restored database's, one line each.
    `roots` (`partition_roots` of the restored database): partitions whose rows differ one by
    one but whose partition tree as a whole holds the backup's rows are equal. Hash
    partitioning on an enum routes by the enum's OIDs, which a restore assigns anew, so
    pg_dump loads such partitions through their root and the rows land in other partitions."""
    problems: dict[str, str] = {}
    found = {t.qualified: t for t in actual}
    for want in expected:
        got = found.get(want.qualified)
        if got is None:
            problems[want.qualified] = f"table {want.qualified} is missing"
        elif got.rows != want.rows:
            problems[want.qualified] = f"table {want.qualified} has {got.rows} rows, the backup had {want.rows}"
        elif (
            want.checksum is not None
            and got.checksum is not None
            and got.checksum[:2] == want.checksum[:2]  # same method (a PG 13 backup uses s:)
            and got.checksum != want.checksum
        ):
            problems[want.qualified] = f"table {want.qualified} has the backup's row count but different content"
    wanted = {t.qualified for t in expected}
    for extra in actual:
        if extra.qualified not in wanted and extra.rows:
            problems[extra.qualified] = f"table {extra.qualified} ({extra.rows} rows) is not in the backup"
    for root in {roots[name] for name in problems if name in (roots or {})}:
        leaves = {name for name, of in roots.items() if of == root}
        if _same_rows([t for t in expected if t.qualified in leaves], [t for t in actual if t.qualified in leaves]):
            problems = {name: line for name, line in problems.items() if name not in leaves}
    return list(problems.values())


def _same_rows(expected: list[TableCheck], actual: list[TableCheck]) -> bool:
    """The tables together hold the same rows: counts add up, checksums combine (XOR for the
    bit_xor methods h: and t:, a sum for PostgreSQL 13's s:) to the same value."""
    if sum(t.rows for t in expected) != sum(t.rows for t in actual):
        return False
    sums = [_combined(tables) for tables in (expected, actual)]
    if None in sums or sums[0][0] != sums[1][0]:  # as for one table: counts alone, unless like with like
        return True
    return sums[0] == sums[1]


def _combined(tables: list[TableCheck]) -> tuple[str, int] | None:
    """The checksum of the tables' rows taken together; None when one has none."""
    methods = {t.checksum[:2] if t.checksum else None for t in tables}
    if None in methods or len(methods) > 1:
        return None
    method = methods.pop()
    values = [int(t.checksum[2:]) for t in tables]
    if method == "s:":
        return method, sum(values)
    combined = 0
    for value in values:
        combined ^= value
    return method, combined
