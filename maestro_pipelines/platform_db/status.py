"""What `maestro db status` and the `platform_schema` asset report about the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sqlalchemy import text

from maestro_pipelines.platform_db.connection import connect
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.platform_db.migrate import current_revision, head_revision

# Partitions are summed into their parent: one row for `predictions`, not one per month.
TABLE_SIZES = text(
    """
    SELECT coalesce(parent.relname, c.relname)                        AS table_name,
           sum(greatest(c.reltuples, 0))::bigint                      AS estimated_rows,
           sum(pg_total_relation_size(c.oid))::bigint                 AS total_bytes,
           count(*) FILTER (WHERE parent.relname IS NOT NULL)::int    AS partitions
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
    LEFT JOIN pg_class parent ON parent.oid = i.inhparent
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') AND c.relname <> 'alembic_version'
    GROUP BY 1
    ORDER BY 1
    """
)


@dataclass
class TableSize:
    table_name: str
    estimated_rows: int
    total_bytes: int
    partitions: int


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


def pg_stat_statements_state(conn) -> str:
    installed = conn.execute(
        text("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'")
    ).scalar()
    preload = conn.execute(text("SHOW shared_preload_libraries")).scalar() or ""
    if installed and "pg_stat_statements" in preload:
        return f"on (version {installed})"
    if installed:
        return "created but not in shared_preload_libraries"
    return "off"


def database_status(location: DatabaseLocation) -> DatabaseStatus:
    with connect(location.platform_url, location.source) as conn:
        version = conn.execute(text("SHOW server_version")).scalar_one()
        tables = [TableSize(*row) for row in conn.execute(TABLE_SIZES)]
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
