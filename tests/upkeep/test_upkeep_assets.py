"""The upkeep assets as the UI shows them: materialized in process on a real platform
database, their metadata (tables, the chart), the slow-query check, the automation that
refreshes the views after deployments, and the daily schedule."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pytest

from maestro_pipelines.assets.upkeep import SLOW_QUERY_CHECK, upkeep_assets


def materialize(platform, instance, selection=None, run_config=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        upkeep_assets, selection=selection, resources=platform.resources(), instance=instance,
        run_config=run_config or {}, raise_on_error=False,
    )


def metadata_of(result, asset: str) -> dict:
    [event] = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == asset]
    return event.materialization.metadata


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance


def test_the_upkeep_job_shows_the_statistics_the_partitions_and_the_summary(platform, instance):
    platform.add_predictions("acme", [datetime.now(timezone.utc)] * 4)
    platform.add_predictions("globex", [datetime.now(timezone.utc)] * 2)

    result = materialize(platform, instance)

    assert result.success
    usage = metadata_of(result, "tenant_usage_statistics")
    assert usage["concurrently"].value is True and usage["dagster/row_count"].value == 3
    by_tenant = {r.data["tenant_name"]: r.data for r in usage["rows"].value.records}
    assert (by_tenant["acme"]["predictions"], by_tenant["globex"]["predictions"], by_tenant["initech"]["predictions"]) == (4, 2, 0)
    models = metadata_of(result, "model_statistics")
    assert [(r.data["tenant_name"], r.data["production_version"]) for r in models["rows"].value.records] == [
        ("acme", 1), ("globex", 1), ("initech", 1)
    ]

    partitions = metadata_of(result, "predictions_partitions")
    assert partitions["rows_in_default_partition"].value == 0
    assert len(partitions["partitions"].value.records) >= 4  # this month and three ahead

    summary = metadata_of(result, "platform_summary")
    assert summary["tenants"].value == 3 and summary["total_predictions"].value == 6
    assert summary["total_active_deployments"].value == 3
    assert summary["chart"].value.startswith("![per-tenant models, deployments and predictions](data:image/png;base64,")
    assert [r.data["tenant_name"] for r in summary["per_tenant"].value.records] == ["acme", "globex", "initech"]

    slow = metadata_of(result, "slow_queries")
    assert slow["available"].value is True, slow["reason"].value


def test_the_slow_query_check_warns_on_a_slow_statement_only(platform, instance):
    """pg_stat_statements on the embedded server: a statement taking 60 ms, run 5 times,
    passes a 20 ms threshold (a WARN, the run still succeeds) but not a 5 s one."""
    with platform.connect() as conn:
        for _ in range(5):
            conn.execute("SELECT pg_sleep(0.06)")

    strict = materialize(platform, instance, selection=["slow_queries"],
                         run_config={"ops": {"slow_queries": {"config": {"mean_ms_threshold": 20}}}})
    lenient = materialize(platform, instance, selection=["slow_queries"],
                          run_config={"ops": {"slow_queries": {"config": {"mean_ms_threshold": 5000}}}})

    assert strict.success and lenient.success
    [warned] = strict.get_asset_check_evaluations()
    assert warned.check_name == SLOW_QUERY_CHECK and not warned.passed
    assert warned.severity == dg.AssetCheckSeverity.WARN
    assert "pg_sleep" in warned.description
    statements = metadata_of(strict, "slow_queries")["statements"].value.records
    sleeping = [r.data for r in statements if "pg_sleep" in r.data["query"]]
    assert sleeping and sleeping[0]["calls"] >= 5 and sleeping[0]["mean_ms"] >= 60
    [passed] = lenient.get_asset_check_evaluations()
    assert passed.passed


def test_the_views_refresh_after_a_deployment_and_not_otherwise(instance):
    """The statistics views' automation condition, evaluated as the sensor does: nothing is
    requested until a tenant's deployment or batch predictions change; then both views,
    once per change."""
    from maestro_pipelines.definitions import defs
    from maestro_pipelines.partitions import tenant_partitions

    instance.add_dynamic_partitions(tenant_partitions.name, ["acme", "globex"])
    views = dg.AssetSelection.assets("model_statistics", "tenant_usage_statistics")

    def requested(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=views, cursor=cursor)
        return result.total_requested, result.cursor

    first, cursor = requested(None)
    assert first == 0
    instance.report_runless_asset_event(dg.AssetMaterialization("deployment", partition="acme"))
    after_deployment, cursor = requested(cursor)
    assert after_deployment == 2
    quiet, cursor = requested(cursor)
    assert quiet == 0, "handled once"
    instance.report_runless_asset_event(dg.AssetMaterialization("batch_predictions", partition="globex"))
    after_predictions, cursor = requested(cursor)
    assert after_predictions == 2


def test_upkeep_runs_daily_after_the_nights_backup_work_and_alerts_when_it_fails():
    from maestro_pipelines.definitions import defs
    from maestro_pipelines.schedules.upkeep import platform_upkeep_schedule
    from maestro_pipelines.sensors.backups import is_backup_run

    assert platform_upkeep_schedule.cron_schedule == "0 6 * * *"
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 27, 6, tzinfo=timezone.utc))
    [request] = platform_upkeep_schedule.evaluate_tick(context).run_requests
    assert request.run_key == "platform-upkeep-2026-11-27"
    job = defs.resolve_job_def("platform_upkeep")
    assert {key.to_user_string() for key in job.asset_layer.selected_asset_keys} == {
        "model_statistics", "tenant_usage_statistics", "predictions_partitions", "slow_queries", "platform_summary"
    }
    run = dg.DagsterRun(job_name="platform_upkeep", run_id="r", tags=job.tags)
    assert is_backup_run(run), "a failed upkeep run alerts"


def test_the_summary_chart_keeps_its_legend_off_the_bars_and_counts_whole():
    """The chart as drawn: the legend sits above the plot, not over the (equal, full-height)
    bars of a tenant with one model and one deployment; count axes tick 0, 1, 2, never 0.5."""
    import matplotlib.pyplot as plt

    from maestro_pipelines.assets.upkeep import summary_figure

    rows = [{"tenant_name": name, "models": 1, "active_deployments": 1, "predictions": count}
            for name, count in (("acme", 2), ("globex", 3), ("initech", 1))]
    fig = summary_figure(rows)
    try:
        fig.canvas.draw()
        left, right = fig.axes
        legend = left.get_legend().get_window_extent()
        for bar in left.patches:
            assert not legend.overlaps(bar.get_window_extent()), "the legend covers a bar"
        for axis in (left, right):
            ticks = [t for t in axis.get_yticks() if axis.get_ylim()[0] <= t <= axis.get_ylim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
