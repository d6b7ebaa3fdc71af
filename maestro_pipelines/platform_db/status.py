"""What `maestro db status` and the `platform_schema` asset report about the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sqlalchemy import text

from maestro_pipelines.platform_db.connection import connect
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.platform_db.migrate import current_revision, head_revision

# Partitions are summed into their parent: one row for `predictions`, not one per month.
# reltuples is -1 for a table never vacuumed or analyzed (PostgreSQL 14+): `unknown` says so.
TABLE_SIZES = text(
    """
    SELECT coalesce(parent.relname, c.relname)                        AS table_name,
           sum(greatest(c.reltuples, 0))::bigint                      AS estimated_rows,
           sum(pg_total_relation_size(c.oid))::bigint                 AS total_bytes,
           count(*) FILTER (WHERE parent.relname IS NOT NULL)::int    AS partitions,
           bool_or(c.reltuples < 0)                                   AS unknown,
           sum(pg_relation_size(c.oid))::bigint                       AS heap_bytes
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
    LEFT JOIN pg_class parent ON parent.oid = i.inhparent
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') AND c.relname <> 'alembic_version'
    GROUP BY 1
    ORDER BY 1
    """
)


EXACT_COUNT_BELOW = 10_000
"""Tables the statistics put below this many rows (or know nothing about) are counted with
count(*): a fresh database's statistics say 0 (or nothing) for every table."""
EXACT_COUNT_MAX_BYTES = 64 * 2**20
"""...unless the table is bigger than this on disk (statistics far behind a bulk load):
count(*) reads the whole table, and `db status` must stay quick."""


@dataclass
class TableSize:
    table_name: str
    estimated_rows: int
    total_bytes: int
    partitions: int
    rows: int | None = None
    """Exact when `rows_exact`, else the planner's estimate; None: unknown (never analyzed
    and too big to count)."""
    rows_exact: bool = False


@dataclass
class DatabaseStatus:
    where: str
    url: str
    database: str
    server_version: str
    current_revision: str | None
    head_revision: str
    pg_stat_statements: str
    tables: list[TableSize] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.current_revision == self.head_revision

    def as_dict(self) -> dict:
        return {**asdict(self), "up_to_date": self.up_to_date}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pg_stat_statements_state(conn) -> str:
    """on / created but not loaded / off. Asked of the view itself, not of
    shared_preload_libraries: only superusers and pg_read_all_settings may read that setting,
    and a managed database's user is neither."""
    from sqlalchemy.exc import DBAPIError

    row = conn.execute(
        text(
            "SELECT e.extversion, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_stat_statements'"
        )
    ).first()
    if row is None:
        return "off"
    version, schema = row
    try:
        with conn.begin_nested():
            conn.execute(text(f"SELECT 1 FROM {_quoted(schema)}.pg_stat_statements LIMIT 1")).all()
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55000":  # object_not_in_prerequisite_state
            return "created but not in shared_preload_libraries"
        return f"created, not readable by this user ({str(exc.orig).strip().splitlines()[0]})"
    return f"on (version {version})"


def _table_sizes(conn) -> list[TableSize]:
    from sqlalchemy.exc import DBAPIError

    tables = []
    for name, estimated, total_bytes, partitions, unknown, heap_bytes in conn.execute(TABLE_SIZES).all():
        table = TableSize(name, estimated, total_bytes, partitions, rows=None if unknown else estimated)
        if (unknown or estimated < EXACT_COUNT_BELOW) and heap_bytes <= EXACT_COUNT_MAX_BYTES:
            try:
                with conn.begin_nested():  # an unpopulated materialized view cannot be read
                    table.rows = conn.execute(text(f"SELECT count(*) FROM public.{_quoted(name)}")).scalar_one()
                table.rows_exact = True
            except DBAPIError:
                pass
        tables.append(table)
    return tables


def database_status(location: DatabaseLocation) -> DatabaseStatus:
    with connect(location.platform_url, location.source) as conn:
        version = conn.execute(text("SHOW server_version")).scalar_one()
        tables = _table_sizes(conn)
        return DatabaseStatus(
            where=location.where,
            url=location.redacted_url,
            database=location.database,
            server_version=version,
            current_revision=current_revision(conn),
            head_revision=head_revision(),
            pg_stat_statements=pg_stat_statements_state(conn),
            tables=tables,
        )
