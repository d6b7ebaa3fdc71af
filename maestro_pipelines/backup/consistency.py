"""Per-table row counts and content checksums: taken inside the dump's snapshot at backup
time, and again on the restored database, so a drill proves the restored data equals what
was dumped.

The checksum is `sum(hashtextextended(row::text, 0))` over a table: order-independent, one
sequential scan, computed by the server. Row text depends on session settings (time zone,
date style, float digits), which `pgtools.CHECKSUM_SESSION_OPTIONS` fixes on both sides.
"""

from __future__ import annotations

from maestro_pipelines.backup.manifest import TableCheck
from maestro_pipelines.backup.pgtools import quote_ident

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


def check_table(cursor, schema: str, name: str, checksums: bool) -> TableCheck:
    relation = f"{quote_ident(schema)}.{quote_ident(name)}"
    if checksums:
        cursor.execute(
            f"SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {relation} AS t"
        )
        rows, checksum = cursor.fetchone()
        return TableCheck(schema, name, int(rows), str(checksum))
    cursor.execute(f"SELECT count(*) FROM {relation}")
    return TableCheck(schema, name, int(cursor.fetchone()[0]), None)


def table_checks(connection, checksums: bool = True) -> list[TableCheck]:
    """Checks of every table, on a psycopg connection (inside whatever transaction it holds)."""
    with connection.cursor() as cursor:
        return [check_table(cursor, schema, name, checksums) for schema, name in list_tables(cursor)]


def compare_checks(expected: list[TableCheck], actual: list[TableCheck]) -> list[str]:
    """Differences between the manifest's checks and a restored database's, one line each."""
    problems: list[str] = []
    found = {t.qualified: t for t in actual}
    for want in expected:
        got = found.pop(want.qualified, None)
        if got is None:
            problems.append(f"table {want.qualified} is missing")
            continue
        if got.rows != want.rows:
            problems.append(f"table {want.qualified} has {got.rows} rows, the backup had {want.rows}")
        elif want.checksum is not None and got.checksum is not None and got.checksum != want.checksum:
            problems.append(f"table {want.qualified} has the backup's row count but different content")
    for extra in found.values():
        if extra.rows:
            problems.append(f"table {extra.qualified} ({extra.rows} rows) is not in the backup")
    return problems
