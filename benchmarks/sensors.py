"""The tenant and retraining sensors' ticks at 1,000 and 10,000 tenants (issue 15: < 10 s a tick).

    python -m benchmarks.sensors [--tenants 1000,10000] [--rows 60] [--results PATH]

For each size, a platform database of its own on the embedded PostgreSQL 18 (a temporary
MAESTRO_HOME) gets that many tenants by one INSERT ... SELECT generate_series, a fifth of them
with `--rows` training rows each and a twentieth with a model version; a SQLite Dagster instance
gets their partitions. Then, as the daemon evaluates them: the tenant sensor's first tick (every
tenant new: partitions to add, first trainings to request) and its next tick; the retraining
sensor's first tick and one after 10 tenants' rows changed. The retraining tick's baseline is what
the sensor did before it asked the source once a tick: one fingerprint query per tenant partition.
The first tick's requests become runs (as the daemon makes them) before the next tick. The results JSON holds `tenants`, `rows` (the figures, in `benchmarks.report`'s format)
and `cursors` (bytes of each sensor's cursor after its last tick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results

TICK_TARGET_S = 10.0
CHANGED = 10  # tenants whose rows change before the second retraining tick


def seed_sql(tenants: int, rows: int) -> list[str]:
    with_rows, with_model = tenants // 5, tenants // 20
    tenant = "'t' || lpad(t::text, 6, '0')"
    return [
        f"INSERT INTO tenants (name) SELECT {tenant} FROM generate_series(1, {tenants}) t",
        f"""INSERT INTO training_rows (tenant, entity_key, features, label, updated_at)
            SELECT {tenant}, 'k' || k, jsonb_build_object('f1', k, 'f2', (k * 7) % 11), (k % 2)::text,
                   now() - interval '1 hour'
            FROM generate_series(1, {with_rows}) t, generate_series(1, {rows}) k""",
        f"""WITH m AS (INSERT INTO models (tenant_id, name, registry_name)
                       SELECT id, 'classifier', 'maestro-' || name FROM tenants WHERE id <= {with_model}
                       RETURNING id, tenant_id)
            INSERT INTO model_versions (model_id, tenant_id, version, status) SELECT id, tenant_id, 1, 'registered' FROM m""",
    ]


def prepare(location, tenants: int, rows: int) -> str:
    """A migrated, seeded platform database of its own: its URL as a user writes it."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for, ensure_database
    from maestro_pipelines.platform_db.location import DatabaseLocation
    from maestro_pipelines.platform_db.migrate import upgrade
    from maestro_pipelines.platform_db.training_rows import ensure_training_rows_table

    name = f"bench_sensors_{tenants}"
    ensure_database(location.admin_url, name, location.source)
    url = location.url_for(name)
    upgrade(DatabaseLocation(platform_url=url, source="benchmark"))
    with engine_for(url).begin() as conn:
        ensure_training_rows_table(conn)
        for statement in seed_sql(tenants, rows):
            conn.execute(text(statement))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def timed_tick(sensor, instance, resources, cursor):
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    started = time.perf_counter()
    result = sensor(context)
    return time.perf_counter() - started, result


def queue_runs(instance, requests) -> None:
    """What the daemon does with a tick's requests: a run each, not started yet."""
    import uuid

    import dagster as dg

    for request in requests:
        instance.add_run(dg.DagsterRun(
            job_name="train_and_deploy", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED,
            tags={**request.tags, "dagster/partition": request.partition_key}))


def per_tenant_fingerprints(source, tenants: list[str]) -> float:
    """What a retraining tick cost before: one fingerprint query per tenant partition."""
    started = time.perf_counter()
    for tenant in tenants:
        source.tenant_fingerprint(tenant)
    return time.perf_counter() - started


def measure(location, workdir: Path, tenants: int, rows: int) -> tuple[list[dict], dict]:
    import dagster as dg
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.resources import PlatformDatabase
    from maestro_pipelines.resources.sources import PostgresDataSource
    from maestro_pipelines.sensors.tenants import retraining_sensor, tenant_partitions_sensor

    url = prepare(location, tenants, rows)
    resources = {"platform_db": PlatformDatabase(database_url=url),
                 "source": PostgresDataSource(url=url, url_variable="MAESTRO_DATABASE_URL")}
    (workdir / f"dagster_{tenants}").mkdir()
    with dg.instance_for_test(temp_dir=str(workdir / f"dagster_{tenants}")) as instance:
        first_s, first = timed_tick(tenant_partitions_sensor, instance, resources, None)
        for request in first.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        queue_runs(instance, first.run_requests)
        next_s, following = timed_tick(tenant_partitions_sensor, instance, resources, first.cursor)
        retrain_first_s, baseline = timed_tick(retraining_sensor, instance, resources, None)
        with engine_for(resources["platform_db"].location().platform_url).begin() as conn:
            conn.execute(text("UPDATE training_rows SET updated_at = now() WHERE entity_key = 'k1' AND tenant IN "
                              f"(SELECT name FROM tenants WHERE id <= {CHANGED})"))
        retrain_s, changed = timed_tick(retraining_sensor, instance, resources, baseline.cursor)
        assert len(changed.run_requests) == CHANGED, f"{len(changed.run_requests)} retrainings, not {CHANGED}"
        before_s = per_tenant_fingerprints(resources["source"], instance.get_dynamic_partitions("tenants"))
    figures = [
        tick_row(f"tenant_partitions_sensor, first tick, {tenants:,} new tenants (s)", first_s),
        tick_row(f"tenant_partitions_sensor, next tick, {tenants:,} tenants (s)", next_s),
        tick_row(f"retraining_sensor, first tick, {tenants:,} tenants (s)", retrain_first_s),
        row(f"retraining_sensor, {CHANGED} changed of {tenants:,} tenants: tick vs a query per tenant (s)", r(retrain_s, 3),
            r(before_s, 3), r(retrain_s / before_s, 3), f"< {TICK_TARGET_S:g} s", retrain_s < TICK_TARGET_S),
    ]
    cursors = {"tenant_partitions_sensor": len(following.cursor), "retraining_sensor": len(changed.cursor)}
    return figures, cursors


def tick_row(figure: str, seconds: float) -> dict:
    return row(figure, r(seconds, 3), None, None, f"< {TICK_TARGET_S:g} s", seconds < TICK_TARGET_S)


def run(sizes: list[int], rows: int, results: Path) -> int:
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import dispose_engines
    from maestro_pipelines.platform_db.migrate import upgrade
    from maestro_pipelines.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-sensors-"))
    location = locate_platform_database(Settings(home=workdir / "home", database_url=None))
    upgrade(location)  # starts the embedded server
    figures, cursors = [], {}
    try:
        for tenants in sizes:
            size_rows, cursors[tenants] = measure(location, workdir, tenants, rows)
            figures += size_rows
        figures += [row(f"cursor bytes, {tenants:,} tenants: {sensor}", size, None, None, "reported", None)
                    for tenants, sizes_of in cursors.items() for sensor, size in sizes_of.items()]
        write_results(results, {"tenants": sizes, "rows": figures, "cursors": cursors})
        print_rows(figures)
    finally:
        dispose_engines()
        location.embedded.stop()
    return 0 if all(f["pass"] is not False for f in figures) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", default="1000,10000", help="comma-separated tenant counts")
    parser.add_argument("--rows", type=int, default=60, help="training rows of each tenant that has rows")
    add_results_option(parser, "sensors")
    args = parser.parse_args()
    return run([int(n) for n in args.tenants.split(",") if n], args.rows, args.results)


if __name__ == "__main__":
    sys.exit(main())
