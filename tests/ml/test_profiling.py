"""Profiling on the `maestro/profile` run tag, and the duration-regression checks.

The graph runs for real (embedded PostgreSQL, MLflow backend); the duration history is written
into a real Dagster instance's event log as runs with step and materialization events at
chosen times, then read back by the same code the check runs.
"""

from __future__ import annotations

import time
import tracemalloc
import uuid

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.execution.plan.objects import StepSuccessData

from maestro_pipelines.assets.checks import (
    DURATION_CHECK,
    duration_check,
    evaluate_duration,
    judge_duration,
    materialization_durations,
)
from maestro_pipelines.profiling import PROFILE_TAG, profile

from .test_ml_graph import ML_ASSETS

PROFILE_KEYS = {"profile_top_functions", "peak_memory_mib", "profiled_seconds"}


def functions(metadata) -> list[str]:
    return [record.data["function"] for record in metadata["profile_top_functions"].value.records]


# --- profiling ----------------------------------------------------------------------------


def test_profile_metadata_only_on_runs_with_the_tag(ml_env):
    plain = ml_env.run("acme")
    assert plain.success, [e.message for e in plain.all_events if e.is_failure]
    for asset in ML_ASSETS:
        metadata = plain.asset_materializations_for_node(asset)[0].metadata
        assert not PROFILE_KEYS & metadata.keys(), asset

    profiled = ml_env.run("acme", tags={PROFILE_TAG: "true"})
    assert profiled.success, [e.message for e in profiled.all_events if e.is_failure]
    for asset in ML_ASSETS:
        metadata = profiled.asset_materializations_for_node(asset)[0].metadata
        assert PROFILE_KEYS <= metadata.keys(), asset
        assert metadata["peak_memory_mib"].value > 0, asset
        assert metadata["profiled_seconds"].value > 0, asset
        rows = metadata["profile_top_functions"].value.records
        assert 0 < len(rows) <= 20
        cumulative = [row.data["cumulative_s"] for row in rows]
        assert cumulative == sorted(cumulative, reverse=True)
        # The asset's own body is profiled (its file:line(name) is in the table); the
        # profiler's wrapper is not.
        assert any(f.endswith(f"({asset})") and "maestro_pipelines/assets/ml.py:" in f for f in functions(metadata)), asset
        assert not any("profiling.py" in f for f in functions(metadata)), asset
        # The asset's own metadata is still there next to the profile.
    assert "accuracy" in profiled.asset_materializations_for_node("model_evaluation")[0].metadata
    assert "rows_scored" in profiled.asset_materializations_for_node("batch_predictions")[0].metadata
    # Which callees make the top 20 depends on timing (scikit-learn's fit did not, once, on a
    # loaded CI machine); what does not: the asset's body is in the table, called once, and
    # training calls far more than 20 distinct functions, so the table is full. Each row's
    # own time is part of its cumulative time.
    trained = profiled.asset_materializations_for_node("trained_model")[0].metadata
    rows = [row.data for row in trained["profile_top_functions"].value.records]
    assert len(rows) == 20, functions(trained)
    [body] = [row for row in rows if row["function"].endswith("(trained_model)")]
    assert body["calls"] == 1 and body["cumulative_s"] > 0, body
    assert all(row["calls"] >= 1 and row["own_s"] <= row["cumulative_s"] + 1e-4 for row in rows), rows
    # model_evaluation is a generator: its checks still arrive after the profiled Output.
    checks = {e.check_name: e for e in profiled.get_asset_check_evaluations()}
    assert checks["metric_floors"].passed and checks["no_regression_vs_production"].passed

    # Other values of the tag do not profile.
    off = ml_env.run("acme", tags={PROFILE_TAG: "false"})
    assert off.success
    assert not PROFILE_KEYS & off.asset_materializations_for_node("features")[0].metadata.keys()


def test_profile_leaves_someone_elses_tracemalloc_running():
    assert not tracemalloc.is_tracing()
    with profile() as result:
        block = [bytearray(1024) for _ in range(2048)]  # ~2 MiB
    assert not tracemalloc.is_tracing()  # we started it, we stopped it
    assert result.peak_memory_mib >= 2 and result.note == ""
    # Calls made inside the block are profiled (the comprehension above, in this file).
    assert any("test_profiling.py:" in row.function and row.function.endswith("(<listcomp>)")
               for row in result.top_functions), result.top_functions

    tracemalloc.start()
    try:
        with profile() as nested:
            more = [bytearray(1024) for _ in range(1024)]  # ~1 MiB above what was traced
        assert tracemalloc.is_tracing()  # not ours to stop
        assert 1 <= nested.peak_memory_mib < 2 and len(block) + len(more) == 3072
        assert "already tracing" in nested.note
    finally:
        tracemalloc.stop()


# --- duration check: the pure rule ----------------------------------------------------------


@pytest.mark.parametrize(
    "duration, history, passed, ratio",
    [
        (30.0, [10.0] * 10, False, 3.0),
        (15.0, [10.0] * 10, True, 1.5),
        (20.0, [10.0] * 10, True, 2.0),  # exactly 2x is within
        (21.0, [9.0, 10.0, 11.0, 500.0], True, 2.0),  # the median shrugs off one outlier: 10.5
        (25.0, [9.0, 10.0, 11.0], False, 2.5),
    ],
)
def test_judge_duration(duration, history, passed, ratio):
    verdict = judge_duration(duration, history)
    assert verdict.passed is passed
    assert verdict.ratio == pytest.approx(ratio)
    assert verdict.history_count == len(history)
    assert ("over the 2x limit" in verdict.description) is not passed


def test_judge_duration_with_little_history_passes_and_says_why():
    verdict = judge_duration(100.0, [1.0, 1.0])
    assert verdict.passed and verdict.median is None and verdict.ratio is None
    assert "only 2 earlier" in verdict.description and "fewer than 3" in verdict.description


# --- duration check: through a real event log ------------------------------------------------


def store_materialization(instance: dg.DagsterInstance, asset: str, partition: str, started: float,
                          seconds: float, step_key: str | None = None, tags: dict | None = None) -> str:
    """A run whose step `step_key` (default: the asset's own) ran `seconds` from `started` and
    materialized `asset`'s `partition`: the events Dagster itself writes, with chosen times."""
    step_key = step_key or asset
    run = instance.create_run_for_job(dg.GraphDefinition(name="history").to_job(), run_id=str(uuid.uuid4()),
                                      tags=tags)

    def store(event: DagsterEvent, at: float):
        instance.store_event(EventLogEntry(
            error_info=None, level="DEBUG", user_message="", run_id=run.run_id, timestamp=at,
            step_key=step_key, job_name="history", dagster_event=event,
        ))

    store(DagsterEvent(DagsterEventType.STEP_START.value, "history", step_key=step_key), started)
    store(DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, "history", step_key=step_key,
                       event_specific_data=StepMaterializationData(
                           dg.AssetMaterialization(asset_key=asset, partition=partition))),
          started + seconds - 0.01)
    store(DagsterEvent(DagsterEventType.STEP_SUCCESS.value, "history", step_key=step_key,
                       event_specific_data=StepSuccessData(duration_ms=seconds * 1000)),
          started + seconds)
    return run.run_id


def store_history(instance, durations, asset="trained_model", partition="acme", step_key=None):
    """Materializations one hour apart, oldest first."""
    start = time.time() - 3600 * (len(durations) + 1)
    return [store_materialization(instance, asset, partition, start + 3600 * i, seconds, step_key)
            for i, seconds in enumerate(durations)]


@pytest.fixture
def instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


def check_on(instance, partition="acme", asset="trained_model"):
    return evaluate_duration(instance, dg.AssetKey(asset), asset, partition)


def test_duration_three_times_the_median_warns(instance):
    store_history(instance, [10.0, 11.0, 9.0, 10.0, 12.0, 10.0, 8.0, 10.0, 10.0, 11.0, 30.0])
    result = check_on(instance)
    assert result.passed is False
    assert result.severity == dg.AssetCheckSeverity.WARN
    assert result.metadata["duration_seconds"].value == pytest.approx(30.0)
    assert result.metadata["median_seconds"].value == pytest.approx(10.0)
    assert result.metadata["ratio"].value == pytest.approx(3.0)
    assert result.metadata["history_count"].value == 10
    assert "over the 2x limit" in result.description


def test_duration_one_and_a_half_times_the_median_passes(instance):
    store_history(instance, [10.0] * 10 + [15.0])
    result = check_on(instance)
    assert result.passed is True and result.severity == dg.AssetCheckSeverity.WARN
    assert result.metadata["ratio"].value == pytest.approx(1.5)


def test_only_the_last_ten_count_and_only_the_partitions_own(instance):
    # Old slow runs fall out of the window; the other tenant's slow runs never count.
    store_history(instance, [100.0] * 5 + [10.0] * 10 + [25.0])
    store_history(instance, [1.0] * 12, partition="globex")
    result = check_on(instance)
    assert result.metadata["history_count"].value == 10
    assert result.metadata["median_seconds"].value == pytest.approx(10.0)
    assert result.passed is False  # 2.5x
    assert check_on(instance, partition="globex").metadata["median_seconds"].value == pytest.approx(1.0)


def test_a_rollbacks_materialization_is_not_a_comparable_run(instance):
    store_history(instance, [10.0] * 4, asset="deployment")
    # rollback_deployment logs a `deployment` materialization from its own op: 1000 s there
    # would be the "latest" and a false alarm if it counted.
    store_materialization(instance, "deployment", "acme", time.time() - 60, 1000.0, step_key="roll_back_deployment")
    durations = materialization_durations(instance, dg.AssetKey("deployment"), "acme", "deployment")
    assert [d.seconds for d in durations] == pytest.approx([10.0] * 4)
    assert check_on(instance, asset="deployment").passed


def test_profiled_runs_stay_out_of_the_median_but_are_judged(instance):
    start = time.time() - 3600 * 20
    for i in range(10):
        store_materialization(instance, "trained_model", "acme", start + 3600 * i, 10.0)
        # profiled runs in between: slow, and they would lift the median to 30 s if they counted
        store_materialization(instance, "trained_model", "acme", start + 3600 * i + 1800, 50.0,
                              tags={PROFILE_TAG: "true"})
    store_materialization(instance, "trained_model", "acme", start + 3600 * 11, 25.0, tags={PROFILE_TAG: "yes"})
    result = check_on(instance)
    assert result.metadata["history_count"].value == 10
    assert result.metadata["median_seconds"].value == pytest.approx(10.0)
    assert result.passed is False and "profiled run" in result.description


def test_fewer_than_three_earlier_materializations_pass_and_say_so(instance):
    store_history(instance, [10.0, 10.0, 500.0])
    result = check_on(instance)
    assert result.passed is True
    assert "only 2 earlier" in result.description and "fewer than 3" in result.description
    assert result.metadata["history_count"].value == 2 and "median_seconds" not in result.metadata


def test_the_check_definition_reads_the_runs_partition_from_the_event_log(instance):
    """The real check, executed by Dagster in a run for partition `acme`, judges the latest
    materialization in the history (the asset itself is not run)."""
    from maestro_pipelines.partitions import tenant_partitions

    instance.add_dynamic_partitions(tenant_partitions.name, ["acme"])

    @dg.asset(partitions_def=tenant_partitions, name="trained_model")
    def stand_in():
        raise AssertionError("only the check runs")

    check = duration_check(stand_in)
    store_history(instance, [10.0] * 10 + [30.0])
    result = dg.materialize([stand_in, check], selection=dg.AssetSelection.checks(check),
                            tags={"dagster/partition": "acme"}, instance=instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == DURATION_CHECK and evaluation.asset_key == dg.AssetKey("trained_model")
    assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["ratio"].value == pytest.approx(3.0)


def test_a_slow_step_against_a_fast_history_warns_in_its_own_run(instance):
    """Asset and check in one run: the check reads the step that just ran."""
    from maestro_pipelines.partitions import tenant_partitions

    instance.add_dynamic_partitions(tenant_partitions.name, ["acme"])

    @dg.asset(partitions_def=tenant_partitions, name="features")
    def stand_in():
        time.sleep(0.3)

    store_history(instance, [0.01] * 10, asset="features")
    result = dg.materialize([stand_in, duration_check(stand_in)], partition_key="acme", instance=instance)
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.metadata["evaluated_run_id"].value == result.run_id
    assert evaluation.metadata["duration_seconds"].value >= 0.3
    assert evaluation.passed is False and evaluation.metadata["ratio"].value >= 20


def test_every_ml_asset_gets_its_duration_check_after_it_in_the_same_run(ml_env):
    result = ml_env.run("acme")
    assert result.success
    evaluations = {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()
                   if e.check_name == DURATION_CHECK}
    assert sorted(evaluations) == sorted(ML_ASSETS)
    for asset, evaluation in evaluations.items():
        assert evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        assert "only 0 earlier" in evaluation.description, evaluation.description
        # The duration is this run's step, read back from the event log.
        assert evaluation.metadata["evaluated_run_id"].value == result.run_id
        (stats,) = ml_env.instance.get_run_step_stats(result.run_id, step_keys=[asset])
        assert evaluation.metadata["duration_seconds"].value == pytest.approx(stats.end_time - stats.start_time, abs=1e-3)
