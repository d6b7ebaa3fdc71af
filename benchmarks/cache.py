"""Batch predictions with the two-level cache: the first (cold) scoring vs. a second one.

    python -m benchmarks.cache [--rows 50000] [--tenant acme] [--results PATH]

One tenant is trained and deployed through the real graph on an embedded PostgreSQL 18 with
its MLflow backend beside it, and a redis-server (Debian's) on a free loopback port as level 2.
The tenant's rows are padded to `--rows` distinct rows (the demo's features with a little
noise). Then `batch_predictions` rescores every row three times (its materialization history
is wiped in between, as after a rollback or in a fresh Dagster instance):

1. cold: empty cache; the model comes from MLflow and every row is predicted;
2. warm, same process: model and predictions from level 1 (the in-process LRU);
3. warm, another process: level 1 emptied, so model and predictions come from Redis.

Printed: wall time of each materialization and its ratio to the cold one, and the hit rates
per level from the step's metadata. Without redis-server, run 3 is skipped. The results JSON
holds `tenant`, `tenant_rows` (the `--rows` scored), `padded_rows`, `runs` (every run's
metadata) and `rows` (the figures, in the shared row format of `benchmarks.report`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks.report import add_results_option, row, write_results

WARM_TARGET = 1.0  # a warm scoring must not be slower than the cold one


def pad_rows(platform_url, tenant: str, rows: int, seed: int = 7) -> int:
    """Add distinct rows (existing features with noise) until the tenant has `rows`."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for

    engine = engine_for(platform_url)
    with engine.begin() as conn:
        existing = conn.execute(text("SELECT entity_key, features, label FROM training_rows WHERE tenant = :t"), {"t": tenant}).all()
        missing = rows - len(existing)
        if missing <= 0:
            return 0
        rng = random.Random(seed)
        stamp = datetime.now(timezone.utc) - timedelta(days=1)
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor:
            with cursor.copy("COPY training_rows (tenant, entity_key, features, label, updated_at) FROM STDIN") as copy:
                for i in range(missing):
                    key, features, label = existing[i % len(existing)]
                    noisy = {k: v * (1 + rng.uniform(-0.05, 0.05)) for k, v in features.items()}
                    copy.write_row((tenant, f"{key}-pad{i}", json.dumps(noisy), label, stamp))
    return missing


def start_redis(stack: ExitStack, workdir: Path) -> str | None:
    from tests.services import find_program, free_port, server_process

    program = find_program("redis-server", Path("/usr/bin/redis-server"))
    if program is None:
        print("redis-server not found: level 2 is not measured")
        return None
    folder = workdir / "redis"
    folder.mkdir()
    port = free_port()
    stack.enter_context(server_process(
        [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        port, folder, deadline_s=30))
    return f"redis://127.0.0.1:{port}/0"


def prepare_platform(stack: ExitStack, location, workdir: Path, tenant: str, rows: int) -> tuple[str | None, int]:
    """Redis (when installed) and the platform database, migrated, holding `tenant` padded to
    `rows` rows, all stopped and removed when `stack` closes: (Redis URL, rows added)."""
    from maestro_pipelines.ml.demo import seed_demo_tenant
    from maestro_pipelines.platform_db.connection import dispose_engines, engine_for
    from maestro_pipelines.platform_db.migrate import upgrade
    from maestro_pipelines.platform_db.tenants import add_tenant

    stack.callback(shutil.rmtree, workdir, True)
    stack.callback(location.embedded.stop)
    stack.callback(dispose_engines)
    redis_url = start_redis(stack, workdir)
    upgrade(location)
    with engine_for(location.platform_url).begin() as conn:
        seed_demo_tenant(conn, tenant)
        add_tenant(conn, tenant)
    return redis_url, pad_rows(location.platform_url, tenant, rows)


def bench_resources(location, workdir: Path, redis_url: str | None) -> dict:
    """The resources of the runs: platform database, MLflow in its own database, the cache."""
    from maestro_pipelines.platform_db.connection import ensure_database
    from maestro_pipelines.resources import CacheResource, MLflowRegistry, PlatformDatabase
    from maestro_pipelines.resources.sources import PostgresDataSource

    platform_url = location.platform_url.render_as_string(hide_password=False)
    ensure_database(location.admin_url, "bench_mlflow_cache", location.source)
    mlflow_uri = location.url_for("bench_mlflow_cache").render_as_string(hide_password=False)
    return {
        "platform_db": PlatformDatabase(database_url=platform_url),
        "mlflow": MLflowRegistry(tracking_uri=mlflow_uri, artifact_root=(workdir / "artifacts").as_uri()),
        "source": PostgresDataSource(url=platform_url, table="training_rows"),
        "cache": CacheResource(redis_url=redis_url, namespace="maestro-bench"),
    }


def train(stack: ExitStack, workdir: Path, tenant: str, resources: dict):
    """A Dagster instance of its own, with `tenant`'s model trained and deployed in it."""
    import dagster as dg

    from maestro_pipelines.definitions import defs

    (workdir / "dagster").mkdir()
    instance = stack.enter_context(dg.instance_for_test(temp_dir=str(workdir / "dagster")))
    instance.add_dynamic_partitions("tenants", [tenant])
    trained = defs.resolve_job_def("train_and_deploy").execute_in_process(
        partition_key=tenant, instance=instance, resources=resources)
    assert trained.success
    return instance


def score(instance, location, tenant: str, resources: dict, label: str) -> dict:
    """One timed `batch_predictions` over every row of the tenant, and its cache figures."""
    import dagster as dg
    from sqlalchemy import text

    from maestro_pipelines.assets.ml import ml_assets
    from maestro_pipelines.platform_db.connection import engine_for

    instance.wipe_assets([dg.AssetKey("batch_predictions")])  # rescore every row
    with engine_for(location.platform_url).begin() as conn:
        conn.execute(text("TRUNCATE predictions"))
        # The scoring watermark lives next to the predictions (migration 0004): cleared too.
        if conn.execute(text("SELECT to_regclass('scoring_watermarks')")).scalar() is not None:
            conn.execute(text("TRUNCATE scoring_watermarks"))
    started = time.perf_counter()
    result = dg.materialize(ml_assets, selection=["batch_predictions"], partition_key=tenant,
                            instance=instance, resources=resources)
    seconds = time.perf_counter() - started
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("batch_predictions")[0].metadata.items()}
    return {"run": label, "seconds": seconds, **{k: meta[k] for k in (
        "rows_scored", "rows_predicted", "rows_from_cache", "model_from", "cache_l1_hit_rate",
        "cache_l2_hit_rate", "cache_hit_rate", "cache_redis")}}


def score_cold_and_warm(instance, location, tenant: str, resources: dict, redis_url: str | None) -> list[dict]:
    """Cold (both levels empty), warm in the same process (L1), warm as a new process (L2 only)."""
    from maestro_pipelines.cache import shared_lru

    cache = resources["cache"]
    level_one = shared_lru(cache.namespace, cache.lru_max_items, int(cache.lru_max_mb * 1024 * 1024))
    level_one.clear()
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    runs = [score(instance, location, tenant, resources, "1 cold (empty cache)"),
            score(instance, location, tenant, resources, "2 warm, same process (L1)")]
    if redis_url:
        level_one.clear()
        runs.append(score(instance, location, tenant, resources, "3 warm, new process (L2: Redis)"))
    return runs


def report(runs: list[dict], tenant: str, rows: int, added: int, redis_url: str | None, results: Path) -> int:
    """Each warm run against the cold one: results JSON, then the table printed."""
    cold = runs[0]["seconds"]
    figures = []
    for run_ in runs:
        ratio = run_["seconds"] / cold
        warm = run_ is not runs[0]
        figures.append({**run_, "ratio_to_cold": ratio, "target": f"<= {WARM_TARGET}" if warm else "",
                        "pass": (ratio <= WARM_TARGET) if warm else None})
    table = [row(f"batch_predictions, {rows:,} rows of {tenant}: run {f['run']} vs cold (s)", round(f["seconds"], 2),
                 round(cold, 2), round(f["ratio_to_cold"], 2), f["target"] or "reported", f["pass"])
             for f in figures]
    table += [row(f"  run {f['run']}: hit rate (L1 / L2 / all)",
                  f"{f['cache_l1_hit_rate']:.0%} / {f['cache_l2_hit_rate']:.0%} / {f['cache_hit_rate']:.0%}",
                  None, None, f"reported; model from {f['model_from']}", None) for f in figures[1:]]
    write_results(results, {"tenant": tenant, "tenant_rows": rows, "padded_rows": added, "runs": figures,
                            "rows": table})
    print(f"batch_predictions for {tenant}, {rows:,} rows, Redis {'on' if redis_url else 'off'}\n")
    print("| run | seconds | ratio to cold | predicted | from cache | model from | L1 hit rate | L2 hit rate | hit rate | target | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        verdict = "" if f["pass"] is None else ("yes" if f["pass"] else "NO")
        print(f"| {f['run']} | {f['seconds']:.2f} | {f['ratio_to_cold']:.2f} | {f['rows_predicted']:,} | {f['rows_from_cache']:,} | "
              f"{f['model_from']} | {f['cache_l1_hit_rate']:.2%} | {f['cache_l2_hit_rate']:.2%} | {f['cache_hit_rate']:.2%} | "
              f"{f['target']} | {verdict} |")
    return 0 if all(f["pass"] is not False for f in figures) else 1


def run(tenant: str, rows: int, results: Path) -> int:
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-cache-"))
    location = locate_platform_database(Settings(home=workdir / "home", database_url=None))
    with ExitStack() as stack:
        redis_url, added = prepare_platform(stack, location, workdir, tenant, rows)
        resources = bench_resources(location, workdir, redis_url)
        instance = train(stack, workdir, tenant, resources)
        runs = score_cold_and_warm(instance, location, tenant, resources, redis_url)
    return report(runs, tenant, rows, added, redis_url, results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the tenant to score (padded with noisy copies)")
    parser.add_argument("--tenant", default="acme", choices=["acme", "globex", "initech"])
    add_results_option(parser, "cache")
    args = parser.parse_args()
    return run(args.tenant, args.rows, args.results)


if __name__ == "__main__":
    sys.exit(main())
