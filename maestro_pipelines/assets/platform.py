"""The platform database's schema as an asset: materializing it runs the migrations."""

import dagster as dg

from maestro_pipelines.dagster_support import DDL_POOL, Column, markdown_list, metadata_table
from maestro_pipelines.resources import PlatformDatabase

TABLE_COLUMNS = [
    Column("table", "string"),
    Column("estimated_rows", "int"),
    Column("rows", "int", "exact when rows_exact, else the estimate"),
    Column("rows_exact", "bool"),
    Column("size_mb", "float"),
    Column("partitions", "int"),
]


@dg.asset(
    group_name="platform",
    kinds={"postgres"},
    # DDL takes strong locks: never two migrations, and never beside the backup that will
    # share this pool (issue on backups).
    pool=DDL_POOL,
    description=(
        "The platform database's schema at the newest alembic revision (tables, partitioned "
        "predictions, indexes, statistics views). Materializing runs `maestro db upgrade`."
    ),
)
def platform_schema(context: dg.AssetExecutionContext, platform_db: PlatformDatabase) -> dg.MaterializeResult:
    result = platform_db.upgrade()
    for warning in result.warnings:
        context.log.warning(warning)
    status = platform_db.status()
    context.log.info(
        f"{status.database} at {status.where}: revision {result.before or 'base'} -> {result.after}"
    )
    table_rows = [
        {
            "table": t.table_name,
            "estimated_rows": t.estimated_rows,
            "rows": t.rows,
            "rows_exact": t.rows_exact,
            "size_mb": round(t.total_bytes / 2**20, 2),
            "partitions": t.partitions,
        }
        for t in status.tables
    ]
    return dg.MaterializeResult(
        metadata={
            "revision": dg.MetadataValue.text(status.current_revision or "base"),
            "previous_revision": dg.MetadataValue.text(result.before or "base"),
            "server_version": dg.MetadataValue.text(status.server_version),
            "where": dg.MetadataValue.text(status.where),
            "pg_stat_statements": dg.MetadataValue.text(status.pg_stat_statements),
            "warnings": markdown_list(result.warnings),
            "tables": metadata_table(table_rows, TABLE_COLUMNS),
        }
    )
