"""Platform upkeep in the graph: the statistics views, the prediction partitions, the slow
queries and the admin's summary of the platform. The work is in
`maestro_pipelines.platform_db.upkeep`; these are its Dagster faces.

- `model_statistics`, `tenant_usage_statistics`: refreshed concurrently (readers never wait)
  whenever a tenant's `deployment` or `batch_predictions` changes (an automation condition,
  evaluated by `statistics_refresh_sensor`), and by the daily upkeep schedule.
- `predictions_partitions`: partitions created months ahead, strays moved out of the default
  partition, partitions past the retention archived to the object store then dropped.
- `slow_queries`: pg_stat_statements' top statements; a check warns on slow ones.
- `platform_summary`: per-tenant counts as a table and a chart.
"""

import dagster as dg
from pydantic import Field, field_validator

from maestro_pipelines.dagster_support import DDL_POOL, PLATFORM_DATABASE_POOL, UPKEEP_RETRY, metadata_table, table_cell
from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.resources import ObjectStoreResource, PlatformDatabase

UPKEEP_GROUP = "upkeep"
SLOW_QUERY_CHECK = "no_slow_statements"

# Refresh when a tenant's deployment or predictions changed. Not `eager()`: it waits until no
# dependency is missing, and with one partition per tenant some tenant has always never
# deployed, so the views would never refresh.
STATISTICS_AUTOMATION = (
    (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()).since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after deployments or predictions change")


def _statistics_view(view: str, description: str):
    @dg.asset(
        name=view,
        group_name=UPKEEP_GROUP,
        kinds={"postgres"},
        deps=[dg.AssetKey("deployment"), dg.AssetKey("batch_predictions")],
        automation_condition=STATISTICS_AUTOMATION,
        pool=PLATFORM_DATABASE_POOL,
        description=description,
    )
    @fail_fast_on_user_errors
    def refresh(context: dg.AssetExecutionContext, platform_db: PlatformDatabase) -> dg.MaterializeResult:
        from maestro_pipelines.platform_db.upkeep import refresh_statistics_view

        result = refresh_statistics_view(platform_db.location().platform_url, view)
        how = "concurrently" if result.concurrently else "for the first time (plain refresh)"
        context.log.info(f"refreshed {view} {how} in {result.seconds:.2f} s: {result.row_count} rows")
        return dg.MaterializeResult(metadata={
            "dagster/row_count": result.row_count,
            "refresh_seconds": round(result.seconds, 3),
            "concurrently": result.concurrently,
            "rows": metadata_table(result.rows),
            "rows_shown": len(result.rows),
        })

    return refresh


model_statistics = _statistics_view(
    "model_statistics",
    "Per model: versions, the production version and since when, experiments (failed ones), "
    "predictions. A materialized view refreshed concurrently: readers never wait.",
)
tenant_usage_statistics = _statistics_view(
    "tenant_usage_statistics",
    "Per tenant: models, versions, experiments, active deployments, predictions (last 30 days). "
    "A materialized view refreshed concurrently: readers never wait.",
)


class PartitionUpkeepConfig(dg.Config):
    months_ahead: int = Field(default=3, ge=1, le=24, description="Months after this one that get their partition now.")
    retention_months: int = Field(
        default=13, ge=1, le=240,
        description="Months of predictions kept in the database (this month counts); older partitions are "
                    "archived to the object store (archives/predictions/<YYYY-MM>/) and dropped.",
    )
    lock_timeout: str = Field(default="10s", description="How long a DDL statement may wait for a lock before upkeep gives up.")

    @field_validator("lock_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        from maestro_pipelines.platform_db.upkeep import LOCK_TIMEOUT

        if not LOCK_TIMEOUT.match(value):
            raise ValueError(f"'{value}' is not a duration: use e.g. 500ms, 10s or 1min")
        return value


@dg.asset(
    group_name=UPKEEP_GROUP,
    kinds={"postgres"},
    pool=DDL_POOL,
    retry_policy=UPKEEP_RETRY,
    description="Monthly partitions of `predictions`: created months ahead, stray rows moved out of the "
                "default partition, partitions past the retention archived to the object store, then dropped.",
)
@fail_fast_on_user_errors
def predictions_partitions(context: dg.AssetExecutionContext, config: PartitionUpkeepConfig,
                           platform_db: PlatformDatabase, store: ObjectStoreResource) -> dg.MaterializeResult:
    from maestro_pipelines.platform_db.upkeep import archive_old_partitions, describe_partitions, ensure_partitions

    url = platform_db.location().platform_url
    report = ensure_partitions(url, config.months_ahead, lock_timeout=config.lock_timeout)
    for name in report.created:
        moved = report.moved_from_default.get(name, 0)
        context.log.info(f"created partition {name}" + (f", moved {moved:,} rows into it from the default partition" if moved else ""))
    archive_old_partitions(url, store.get_store(), config.retention_months, lock_timeout=config.lock_timeout, report=report)
    for item in report.archived:
        context.log.info(f"archived {item['partition']} ({item['rows']:,} rows) to {item['key']}, then dropped it")
    describe_partitions(url, report)
    if report.left_in_default:
        context.log.warning(f"{report.left_in_default} rows are still in the default partition")
    return dg.MaterializeResult(metadata={
        "partitions_created": len(report.created),
        "rows_moved_from_default": sum(report.moved_from_default.values()),
        "rows_in_default_partition": report.left_in_default,
        "partitions_archived": len(report.archived),
        "rows_archived": sum(item["rows"] for item in report.archived),
        "archived": metadata_table(report.archived, ["partition", "month", "rows", "key", "compressed_bytes"]) if report.archived
        else dg.MetadataValue.text("none"),
        "partitions": metadata_table(report.partitions, ["partition", "from", "to", "estimated_rows"]),
    })


class SlowQueryConfig(dg.Config):
    limit: int = Field(default=20, ge=1, le=500, description="Statements shown, by total time.")
    mean_ms_threshold: float = Field(default=500.0, gt=0, description="The check warns on a statement whose mean time passes this.")
    min_calls: int = Field(default=5, ge=1, description="Statements called fewer times are not judged (one-off maintenance).")


@dg.asset(
    group_name=UPKEEP_GROUP,
    kinds={"postgres"},
    description="The platform database's top statements by total time (pg_stat_statements): calls, total and mean time, rows.",
    check_specs=[dg.AssetCheckSpec(SLOW_QUERY_CHECK, asset="slow_queries", blocking=False,
                                   description="No statement called at least min_calls times has a mean time over the threshold.")],
)
@fail_fast_on_user_errors
def slow_queries(context: dg.AssetExecutionContext, config: SlowQueryConfig, platform_db: PlatformDatabase):
    from maestro_pipelines.platform_db.upkeep import top_statements

    found = top_statements(platform_db.location().platform_url, config.limit)
    if not found.available:
        context.log.warning(found.reason)
    slow = [s for s in found.statements if s["mean_ms"] > config.mean_ms_threshold and s["calls"] >= config.min_calls]
    yield dg.MaterializeResult(metadata={
        "available": found.available,
        "reason": found.reason or "pg_stat_statements answered",
        "statements": metadata_table(found.statements, ["query", "calls", "total_ms", "mean_ms", "rows"]) if found.statements
        else dg.MetadataValue.text(found.reason or "no statements recorded yet"),
        "slowest_mean_ms": max((s["mean_ms"] for s in found.statements), default=0.0),
    })
    yield dg.AssetCheckResult(
        check_name=SLOW_QUERY_CHECK,
        passed=not slow,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"pg_stat_statements unavailable: {found.reason}" if not found.available
            else f"no statement over {config.mean_ms_threshold:g} ms on average" if not slow
            else f"{len(slow)} statement(s) over {config.mean_ms_threshold:g} ms on average; slowest: "
                 f"{slow[0]['mean_ms']:.0f} ms, {slow[0]['query'][:120]}"
        ),
        metadata={"threshold_ms": config.mean_ms_threshold, "slow_statements": len(slow)},
    )


def summary_chart(rows: list[dict]) -> bytes:
    """The PNG of `summary_figure`."""
    import io

    import matplotlib.pyplot as plt

    fig = summary_figure(rows)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def summary_figure(rows: list[dict]):
    """Bars per tenant: models and active deployments (left), predictions (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [r["tenant_name"] for r in rows] or ["(no tenants)"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    positions = range(len(names))
    width = 0.4
    left.bar([p - width / 2 for p in positions], [r["models"] for r in rows] or [0], width, label="models")
    left.bar([p + width / 2 for p in positions], [r["active_deployments"] for r in rows] or [0], width, label="active deployments")
    left.set_xticks(list(positions), names, rotation=30, ha="right")
    # Above the plot, not over the bars (the tallest bars sit where a legend goes by default).
    left.set_title("models and deployments", pad=24)
    left.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    right.bar(list(positions), [r["predictions"] for r in rows] or [0], color="tab:green")
    right.set_xticks(list(positions), names, rotation=30, ha="right")
    right.set_title("predictions", pad=24)
    for axis in (left, right):  # counts: no 0.5 model, no 2.5 predictions
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


@dg.asset(
    group_name=UPKEEP_GROUP,
    kinds={"postgres"},
    deps=[tenant_usage_statistics, model_statistics],
    description="The platform at a glance, per tenant: models, experiments, deployments, predictions (table and chart).",
)
@fail_fast_on_user_errors
def platform_summary(context: dg.AssetExecutionContext, platform_db: PlatformDatabase) -> dg.MaterializeResult:
    from maestro_pipelines.ml.evaluation import markdown_image
    from maestro_pipelines.platform_db.upkeep import tenant_summary

    rows = tenant_summary(platform_db.location().platform_url)
    totals = {key: sum(r[key] for r in rows) for key in ("models", "experiments", "active_deployments", "predictions")}
    context.log.info(f"{len(rows)} tenants: " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in totals.items()))
    return dg.MaterializeResult(metadata={
        "tenants": len(rows),
        **{f"total_{k}": v for k, v in totals.items()},
        "per_tenant": metadata_table(rows, ["tenant_name", "status", "models", "model_versions", "experiments",
                                    "failed_experiments", "active_deployments", "predictions",
                                    "predictions_last_30_days", "last_prediction_at"]),
        "chart": dg.MetadataValue.md(markdown_image(summary_chart(rows), "per-tenant models, deployments and predictions")),
        "statistics_refreshed_at": table_cell(rows[0]["refreshed_at"]) if rows else "",
    })


upkeep_assets = [model_statistics, tenant_usage_statistics, predictions_partitions, slow_queries, platform_summary]
