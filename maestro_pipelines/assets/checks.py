"""Duration checks on the ML graph: each ML asset warns when it ran much slower than usual.

`duration_within_2x_median` (non-blocking, severity WARN) compares the duration of the asset's
latest materialization of a tenant's partition with the median of the (up to) 10 before it,
all read from the Dagster instance's event log: a materialization's duration is its step's
time from STEP_START to STEP_SUCCESS (retries included) in the run that produced it. Only
materializations made by the asset's own step count (a rollback's logged `deployment`
materialization is not a comparable run), and runs tagged for profiling (`maestro/profile`,
which slows Python-heavy steps) do not enter the median; a profiled latest run is still judged
and its description says it was profiled. With fewer than 3 earlier materializations the check
passes and says there is too little history.

The checks are partitioned like their assets (one tenant each): Dagster then records each
evaluation under the tenant's partition, and the UI shows it on that tenant's page (an
unpartitioned check's evaluation has no partition and shows on none). The check runs after its
asset in the same run (the asset is its upstream).
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import dagster as dg

from maestro_pipelines.assets.ml import ml_assets
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.profiling import profiling_requested

DURATION_CHECK = "duration_within_2x_median"
HISTORY = 10  # earlier materializations the median is taken over
MIN_HISTORY = 3  # fewer than this: nothing to compare against
FACTOR = 2.0
PARTITION_TAG = "dagster/partition"
_SCAN_LIMIT = 100  # materializations read at most while looking for HISTORY + 1 comparable ones


@dataclass(frozen=True)
class DurationVerdict:
    passed: bool
    description: str
    duration: float
    median: Optional[float]
    history_count: int
    ratio: Optional[float]


def judge_duration(duration: float, history: list[float], factor: float = FACTOR,
                   min_history: int = MIN_HISTORY) -> DurationVerdict:
    """Pure: `duration` against the median of `history` (earlier durations, in seconds)."""
    from statistics import median as median_of

    if len(history) < min_history:
        return DurationVerdict(
            True,
            f"took {duration:.2f} s; only {len(history)} earlier materialization(s) of this partition, "
            f"fewer than {min_history}: not compared yet",
            duration, None, len(history), None,
        )
    median = float(median_of(history))
    ratio = duration / median if median > 0 else None
    passed = duration <= factor * median
    shown = f"{ratio:.1f}x" if ratio is not None else "more than"
    description = (
        f"took {duration:.2f} s, {shown} the median {median:.2f} s of the last {len(history)} materializations "
        + (f"(within {factor:g}x)" if passed else f"(over the {factor:g}x limit)")
    )
    return DurationVerdict(passed, description, duration, median, len(history), ratio)


@dataclass(frozen=True)
class MaterializationDuration:
    run_id: str
    seconds: float
    profiled: bool = False


def materialization_durations(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: Optional[str],
                              step_key: str, limit: int = HISTORY + 1) -> list[MaterializationDuration]:
    """Newest first: durations of the asset's materializations of `partition` made by `step_key`.

    The newest one always, then older ones until `limit` in all are not profiled runs.
    """
    found: list[MaterializationDuration] = []
    counted = 0
    seen_runs: set[str] = set()
    cursor = None
    scanned = 0
    while scanned < _SCAN_LIMIT:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None),
            limit=limit, cursor=cursor, ascending=False,
        )
        for record in page.records:
            scanned += 1
            entry = record.event_log_entry
            if entry.step_key != step_key or entry.run_id in seen_runs:
                continue
            seen_runs.add(entry.run_id)
            stats = instance.get_run_step_stats(entry.run_id, step_keys=[step_key])
            if not stats or stats[0].start_time is None:
                continue
            # The step's end; the materialization's own time if the step has not ended yet.
            end = stats[0].end_time or entry.timestamp
            run = instance.get_run_by_id(entry.run_id)
            profiled = run is not None and profiling_requested(run.tags)
            found.append(MaterializationDuration(entry.run_id, max(0.0, end - stats[0].start_time), profiled))
            counted += 1 if (len(found) == 1 or not profiled) else 0
            if counted >= limit:
                break
        if counted >= limit or not page.has_more or not page.records:
            break
        cursor = page.cursor
    return found


def evaluate_duration(instance: dg.DagsterInstance, asset_key: dg.AssetKey, step_key: str,
                      partition: Optional[str]) -> dg.AssetCheckResult:
    """The check's result for the latest materialization of `asset_key`'s `partition`."""
    if not partition:
        return dg.AssetCheckResult(
            check_name=DURATION_CHECK, asset_key=asset_key, passed=True, severity=dg.AssetCheckSeverity.WARN,
            description="the run has no single partition (tenant): nothing to compare",
        )
    durations = materialization_durations(instance, asset_key, partition, step_key)
    if not durations:
        return dg.AssetCheckResult(
            check_name=DURATION_CHECK, asset_key=asset_key, passed=True, severity=dg.AssetCheckSeverity.WARN,
            description=f"no materialization of partition '{partition}' yet",
            metadata={"history_count": 0, "partition": partition},
        )
    latest, history = durations[0], [d for d in durations[1:] if not d.profiled]
    verdict = judge_duration(latest.seconds, [d.seconds for d in history])
    description = verdict.description + ("; a profiled run (profiling adds overhead)" if latest.profiled else "")
    metadata: dict = {
        "duration_seconds": dg.MetadataValue.float(round(verdict.duration, 3)),
        "history_count": verdict.history_count,
        "partition": partition,
        "evaluated_run_id": latest.run_id,
    }
    if verdict.median is not None:
        metadata["median_seconds"] = dg.MetadataValue.float(round(verdict.median, 3))
    if verdict.ratio is not None:
        metadata["ratio"] = dg.MetadataValue.float(round(verdict.ratio, 3))
    return dg.AssetCheckResult(
        check_name=DURATION_CHECK, asset_key=asset_key, passed=verdict.passed,
        severity=dg.AssetCheckSeverity.WARN, description=description, metadata=metadata,
    )


def duration_check(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """The non-blocking `duration_within_2x_median` check of one (single-asset) ML asset."""
    asset_key = asset.key
    step_key = asset.op.name

    def _duration_check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        partition = context.partition_key if context.has_partition_key else context.run.tags.get(PARTITION_TAG)
        return evaluate_duration(context.instance, asset_key, step_key, partition)

    with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(
            asset=asset,
            name=DURATION_CHECK,
            blocking=False,
            partitions_def=tenant_partitions,
            description=(
                f"Warns when the latest materialization of a tenant's partition took more than {FACTOR:g}x the "
                f"median of its previous {HISTORY} (step durations from the instance's event log). Passes with "
                f"fewer than {MIN_HISTORY} earlier materializations."
            ),
        )(_duration_check)


ml_duration_checks = [duration_check(asset) for asset in ml_assets]
