"""A platform database of a chosen size, for the backup and restore benchmarks.

    python -m benchmarks.platform_data [--size-mb 1024] [--home DIR]

Starts an embedded PostgreSQL 18 in a MAESTRO_HOME (a temporary one unless `--home`), runs
the real migrations on database `maestro`, then fills it server-side with
`INSERT ... SELECT generate_series` (no rows cross the wire):

- 40 tenants, 25 models each; experiments (JSONB params and metrics, an error text for the
  failed ones), model versions (JSONB metrics and gate results) and deployments (one active
  production deployment per model, retired ones before it) growing with the size;
- most of the bytes in `predictions`, as the batch scorer writes them: batches of rows that
  share a tenant, model version, deployment and timestamp, each row with its entity key, a
  32-hex features hash, a label and a score, over the last six monthly partitions (a few
  strays in the default partition). The schema has no JSONB column in `predictions`: its
  JSONB is in experiments and model versions.

Row counts are linear in `--size-mb` and calibrated so that `pg_database_size` comes out
near it. Then VACUUM ANALYZE and a refresh of the materialized views. The data is
deterministic apart from `random()` scores and the timestamps relative to today.

Reused by other benchmarks: `start_embedded(home)` and `generate_platform_database(url,
size_mb)`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path

TENANTS = 40
MODELS_PER_TENANT = 25
MONTHS = 6                  # monthly partitions that get predictions: this month and 5 before
BATCH_ROWS = 2000           # predictions per scoring batch (same tenant, version, timestamp)
# Per MiB asked for (calibrated on PostgreSQL 18: about 1.0 MiB of database per MiB asked).
EXPERIMENTS_PER_MB = 130
VERSIONS_PER_MB = 60
PREDICTIONS_PER_MB = 4300
WORKERS = 2                 # concurrent INSERT sessions (the machine has 2 cores)
MiB = 1024 * 1024


def start_embedded(home: Path):
    """Start (or attach to) an embedded PostgreSQL 18 whose data lives in `home/pgdata`.

    Returns `(server, url)`: `server.stop()` stops it; `url` is the SQLAlchemy URL of its
    `postgres` database on a Unix socket (`url.set(database=...)` for another one).
    """
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(home))
    return server, server.start()


def prepare_platform_database(home: Path, size_mb: float, reuse: bool, say: Callable[[str], None]):
    """Start the embedded server in `home` and generate a `size_mb` platform database in its
    `maestro` database; with `reuse`, keep the one an earlier run generated at that size (a
    marker file in `home` says which). Returns `(server, db_url, generation)`."""
    server, server_url = start_embedded(home)
    db_url = server_url.set(database="maestro")
    marker = Path(home) / "benchmark-platform-data.json"
    if reuse and marker.exists() and json.loads(marker.read_text())["size_mb_requested"] == size_mb:
        say(f"reusing the database generated in {home}")
        return server, db_url, json.loads(marker.read_text())
    say(f"generating a {size_mb:g} MiB platform database ...")
    generation = generate_platform_database(db_url, size_mb, progress=lambda m: say(f"  {m}"))
    if reuse:
        marker.write_text(json.dumps(generation))
    return server, db_url, generation


AWS = {"region_name": "us-east-1", "aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
BUCKET = "maestro-bench"


@contextmanager
def moto_bucket(workdir: Path) -> Iterator[tuple[str, int]]:
    """A moto S3 server on 127.0.0.1 with an empty BUCKET: yields (endpoint, server pid)."""
    import boto3
    from tests.services import free_port, server_process

    port = free_port()
    moto_dir = Path(workdir) / "moto"
    moto_dir.mkdir()
    moto = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with server_process(moto, port, moto_dir) as process:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **AWS).create_bucket(Bucket=BUCKET)
        yield endpoint, process.pid


def _month_start(day: date, months_later: int = 0) -> date:
    index = day.year * 12 + day.month - 1 + months_later
    return date(index // 12, index % 12 + 1, 1)


def _counts(size_mb: float) -> dict[str, int]:
    models = TENANTS * MODELS_PER_TENANT
    versions_per_model = max(2, round(VERSIONS_PER_MB * size_mb / models))
    return {
        "tenants": TENANTS,
        "models": models,
        "versions_per_model": versions_per_model,
        "model_versions": models * versions_per_model,
        "experiments": max(models, round(EXPERIMENTS_PER_MB * size_mb)),
        "predictions": max(MONTHS * BATCH_ROWS, round(PREDICTIONS_PER_MB * size_mb)),
    }


SESSION = "SET synchronous_commit = off; SET jit = off; SET work_mem = '64MB'"

TENANTS_SQL = """
INSERT INTO tenants (id, name, display_name, status, settings, created_at, updated_at)
SELECT t, format('tenant-%s', lpad(t::text, 3, '0')), format('Tenant %s Inc.', t),
       CASE WHEN t % 17 = 0 THEN 'suspended' ELSE 'active' END,
       jsonb_build_object(
           'quality_gates', jsonb_build_object('min_accuracy', 0.7 + (t % 5) * 0.05,
                                               'min_roc_auc', 0.75, 'max_log_loss', 0.6),
           'source', jsonb_build_object('kind', (ARRAY['postgres','mysql','mongodb','snowflake','bigquery'])[t % 5 + 1],
                                        'table', format('customers_%s', t)),
           'schedule', '0 2 * * *', 'retention_days', 365),
       now() - interval '400 days' + t * interval '1 day', now() - (t % 30) * interval '1 day'
FROM generate_series(1, :tenants) AS t
"""

MODELS_SQL = """
INSERT INTO models (id, tenant_id, name, description, registry_name, status, created_at, updated_at)
SELECT m, (m - 1) / :mpt + 1,
       format('%s-%s', (ARRAY['churn','fraud','ltv','upsell','risk'])[m % 5 + 1], (m - 1) % :mpt + 1),
       format('Predicts %s for the customers of tenant %s from their %s history, retrained nightly '
              'when the source table changes.',
              (ARRAY['churn','fraud','lifetime value','upsell','credit risk'])[m % 5 + 1], (m - 1) / :mpt + 1,
              (ARRAY['billing','usage','support','payment'])[m % 4 + 1]),
       format('tenant-%s.model-%s', lpad(((m - 1) / :mpt + 1)::text, 3, '0'), m),
       CASE WHEN m % 9 = 0 THEN 'archived' ELSE 'active' END,
       now() - interval '380 days' + (m % 200) * interval '1 day', now() - (m % 60) * interval '1 day'
FROM generate_series(1, :models) AS m
"""

EXPERIMENTS_SQL = """
INSERT INTO experiments (id, tenant_id, model_id, name, status, mlflow_run_id, dagster_run_id,
                         params, metrics, error, started_at, finished_at, created_at)
SELECT e, (x.m - 1) / :mpt + 1, x.m,
       format('tenant-%s-%s', lpad(((x.m - 1) / :mpt + 1)::text, 3, '0'), substr(md5(e::text), 1, 8)),
       x.status,
       CASE WHEN x.status <> 'running' THEN md5('run' || e) END,
       (md5('dagster' || e))::uuid::text,
       jsonb_build_object(
           'model_type', (ARRAY['random_forest','gradient_boosting','logistic_regression','extra_trees'])[e % 4 + 1],
           'n_estimators', 50 + (e % 20) * 25, 'max_depth', 3 + e % 12,
           'learning_rate', round((0.01 + (e % 30) * 0.01)::numeric, 2),
           'min_samples_leaf', 1 + e % 10, 'max_features', (ARRAY['sqrt','log2','auto'])[e % 3 + 1],
           'class_weight', CASE WHEN e % 2 = 0 THEN 'balanced' END, 'random_state', 42,
           'test_size', 0.2, 'subsample', round((0.5 + (e % 6) * 0.1)::numeric, 1),
           'feature_set', format('v%s', 1 + e % 7), 'n_features', 8 + e % 40,
           'training_rows', 1000 + (e * 7919) % 500000,
           'data_hash', md5('data' || (e / 3)),
           'source_table', format('customers_%s', (x.m - 1) / :mpt + 1)),
       CASE WHEN x.status = 'succeeded' THEN jsonb_build_object(
           'accuracy', round(random()::numeric * 0.3 + 0.65, 6), 'precision', round(random()::numeric * 0.3 + 0.6, 6),
           'recall', round(random()::numeric * 0.3 + 0.6, 6), 'f1', round(random()::numeric * 0.3 + 0.6, 6),
           'roc_auc', round(random()::numeric * 0.25 + 0.7, 6), 'log_loss', round(random()::numeric * 0.5 + 0.2, 6),
           'train_rows', 800 + (e * 7919) % 400000, 'test_rows', 200 + (e * 7919) % 100000,
           'fit_seconds', round(random()::numeric * 120, 3), 'threshold', 0.5)
       ELSE '{}'::jsonb END,
       CASE WHEN x.status = 'failed' THEN format(
           E'Traceback (most recent call last):\\n  File "maestro_pipelines/assets/ml.py", line %s, in trained_model\\n'
           || E'    model = build_estimator(params).fit(features.X_train, features.y_train)\\n'
           || E'ValueError: Input X contains NaN (column %s, %s rows); impute or drop before training',
           100 + e % 80, format('feature_%s', e % 40), 1 + e % 5000) END,
       x.started, CASE WHEN x.status <> 'running' THEN x.started + (30 + e % 900) * interval '1 second' END,
       x.started
FROM generate_series(1, :experiments) AS e
CROSS JOIN LATERAL (
    SELECT (e * 7919) % :models + 1 AS m,
           CASE WHEN e % 20 = 0 THEN 'failed' WHEN e > :experiments - 20 THEN 'running' ELSE 'succeeded' END AS status,
           now() - interval '182 days' + (e::float8 / :experiments) * interval '182 days' AS started
) AS x
"""

VERSIONS_SQL = """
INSERT INTO model_versions (id, model_id, tenant_id, experiment_id, version, registry_version, data_hash,
                            status, metrics, gate_results, created_at)
SELECT (m - 1) * :k + v, m, (m - 1) / :mpt + 1, ((m * 104729 + v * 7919) % :experiments) + 1,
       v, v::text, md5(format('data-%s-%s', m, v)),
       CASE WHEN v = :k THEN 'deployed' WHEN v % 7 = 3 THEN 'rejected' ELSE 'retired' END,
       jsonb_build_object(
           'accuracy', round(random()::numeric * 0.3 + 0.65, 6), 'precision', round(random()::numeric * 0.3 + 0.6, 6),
           'recall', round(random()::numeric * 0.3 + 0.6, 6), 'f1', round(random()::numeric * 0.3 + 0.6, 6),
           'roc_auc', round(random()::numeric * 0.25 + 0.7, 6), 'log_loss', round(random()::numeric * 0.5 + 0.2, 6),
           'train_rows', 800 + (m * v * 7919) % 400000, 'test_rows', 200 + (m * v * 7919) % 100000),
       jsonb_build_object(
           'min_accuracy', jsonb_build_object('threshold', 0.7, 'value', round(random()::numeric * 0.3 + 0.65, 4),
                                              'passed', v % 7 <> 3, 'blocking', true),
           'min_roc_auc', jsonb_build_object('threshold', 0.75, 'value', round(random()::numeric * 0.25 + 0.7, 4),
                                             'passed', v % 7 <> 3, 'blocking', true),
           'max_log_loss', jsonb_build_object('threshold', 0.6, 'value', round(random()::numeric * 0.5 + 0.2, 4),
                                              'passed', true, 'blocking', false),
           'no_regression', jsonb_build_object('baseline_version', greatest(v - 1, 1), 'delta',
                                               round((random()::numeric - 0.4) * 0.05, 4), 'passed', v % 7 <> 3)),
       now() - interval '182 days' + ((v - 1)::float8 / :k) * interval '182 days' + (m % 24) * interval '1 hour'
FROM generate_series(1, :models) AS m CROSS JOIN generate_series(1, :k) AS v
"""

# Deployment id m is model m's active production deployment (of its latest version); the
# retired ones (up to 10 earlier versions per model) come after.
DEPLOYMENTS_SQL = """
INSERT INTO deployments (id, tenant_id, model_id, model_version_id, environment, replicas, status,
                         dagster_run_id, deployed_at, retired_at, created_at)
SELECT m, (m - 1) / :mpt + 1, m, (m - 1) * :k + :k, 'production', 1 + m % 4, 'active',
       (md5('deploy' || m))::uuid::text, now() - (m % 20) * interval '1 day', NULL,
       now() - (m % 20) * interval '1 day'
FROM generate_series(1, :models) AS m;

SELECT setval(pg_get_serial_sequence('deployments', 'id'), :models);

INSERT INTO deployments (tenant_id, model_id, model_version_id, environment, replicas, status,
                         dagster_run_id, deployed_at, retired_at, created_at)
SELECT (m - 1) / :mpt + 1, m, (m - 1) * :k + v, CASE WHEN v % 3 = 0 THEN 'staging' ELSE 'production' END,
       1 + m % 4, CASE WHEN v % 11 = 5 THEN 'rolled_back' ELSE 'retired' END,
       (md5(format('deploy-%s-%s', m, v)))::uuid::text,
       now() - interval '182 days' + ((v - 1)::float8 / :k) * interval '182 days',
       now() - interval '182 days' + (v::float8 / :k) * interval '182 days',
       now() - interval '182 days' + ((v - 1)::float8 / :k) * interval '182 days'
FROM generate_series(1, :models) AS m CROSS JOIN generate_series(greatest(1, :k - 10), :k - 1) AS v
"""

# One month's predictions: row i belongs to scoring batch i / BATCH_ROWS, which fixes the model,
# version, deployment and timestamp; each row has its own entity, features hash, label, score.
PREDICTIONS_SQL = """
INSERT INTO predictions (tenant_id, model_version_id, deployment_id, entity_key, features_hash,
                         label, score, created_at)
SELECT (b.m - 1) / :mpt + 1, (b.m - 1) * :k + b.v, CASE WHEN b.v = :k THEN b.m END,
       format('cust-%s-%s', (b.m - 1) / :mpt + 1, lpad(((i * 2654435761) % 10000000)::text, 7, '0')),
       substr(md5(format('%s:%s', :seed, i)), 1, 32),
       CASE WHEN b.m % 3 = 0 THEN (ARRAY['setosa','versicolor','virginica'])[1 + (i * 31) % 3]
            WHEN s.score >= 0.5 THEN '1' ELSE '0' END,
       s.score,
       b.at
FROM generate_series(:first, :last) AS i
CROSS JOIN LATERAL (
    SELECT (((i / :batch) * 7919) % :models) + 1 AS m,
           :k - ((i / :batch) % least(:k, 3)) AS v,
           :lower::timestamptz + (((i - :first) / :batch)::float8 * :batch / :rows)
               * (:upper::timestamptz - :lower::timestamptz) AS at
) AS b
CROSS JOIN LATERAL (SELECT random() AS score) AS s
"""


def _partition_ddl(month: date) -> str:
    upper = _month_start(month, 1)
    return (
        f"CREATE TABLE IF NOT EXISTS predictions_y{month:%Y}m{month:%m} PARTITION OF predictions "
        f"FOR VALUES FROM ('{month:%Y-%m-%d} 00:00:00+00') TO ('{upper:%Y-%m-%d} 00:00:00+00')"
    )


def _bind(sql: str, params: dict) -> str:
    """Inline integer/literal parameters (the statements are ours, values are numbers or
    ISO timestamps): one round trip, and generate_series bounds the planner can see."""
    for name in sorted(params, key=len, reverse=True):
        value = params[name]
        literal = f"'{value}'" if isinstance(value, str) else str(value)
        sql = sql.replace(f":{name}", literal)
    return sql


class _Steps:
    """Seconds per named step of the generation, each said as it ends."""

    def __init__(self, say):
        self.say = say
        self.started = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 2)
        self.say(f"{name}: {self.seconds[name]} s")
        self.mark = now


def _seed_catalog(conn, months: list[date], common: dict) -> None:
    """The monthly partitions, then tenants, models, experiments, versions and deployments."""
    for month in months:
        conn.execute(_partition_ddl(month))
    for sql in (TENANTS_SQL, MODELS_SQL, EXPERIMENTS_SQL, VERSIONS_SQL, DEPLOYMENTS_SQL):
        for statement in _bind(sql, common).split(";\n\n"):
            conn.execute(statement)
    for table in ("tenants", "models", "experiments", "model_versions", "deployments"):
        conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")


def _prediction_jobs(months: list[date], total: int, common: dict) -> list[dict]:
    """One INSERT job a month, biggest first, plus a few strays before the partitions."""
    # Predictions grow month after month (weights 1..MONTHS); the current month is cut at now.
    weights = list(range(1, MONTHS + 1))
    strays = max(1, total // 2000)
    jobs, first = [], 0
    for index, month in enumerate(months):
        rows = (total - strays) * weights[index] // sum(weights)
        if index == MONTHS - 1:
            rows = total - strays - first
        lower = datetime(month.year, month.month, 1, tzinfo=timezone.utc)
        upper = datetime.now(timezone.utc) if index == MONTHS - 1 else \
            datetime.combine(_month_start(month, 1), datetime.min.time(), tzinfo=timezone.utc)
        jobs.append({**common, "first": first, "last": first + rows - 1, "rows": rows,
                     "lower": lower.isoformat(), "upper": upper.isoformat()})
        first += rows
    # A few strays from before the partitions (a late backfill): they land in the default one.
    old = datetime.combine(_month_start(months[0], -3), datetime.min.time(), tzinfo=timezone.utc)
    jobs.append({**common, "first": first, "last": first + strays - 1, "rows": strays,
                 "lower": old.isoformat(), "upper": (old.replace(day=20)).isoformat()})
    # Biggest first so the two sessions finish together.
    jobs.sort(key=lambda job: -job["rows"])
    return jobs


def _measure_database(conn) -> dict:
    """What was made: the database's size, each relation's, row counts, the partitions."""
    database_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    sizes = conn.execute(
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') ORDER BY 2 DESC"
    ).fetchall()
    rows = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("tenants", "models", "experiments", "model_versions", "deployments", "predictions")}
    partitions = [name for name, _ in conn.execute(
        "SELECT c.relname, 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'predictions'::regclass ORDER BY 1").fetchall()]
    return {
        "database_bytes": database_bytes,
        "database_mib": round(database_bytes / MiB, 1),
        "rows": rows,
        "partitions": partitions,
        "relation_mib": {name: round(size / MiB, 1) for name, size in sizes},
    }


def generate_platform_database(url, size_mb: float, seed: int = 20261126, progress=None) -> dict:
    """Create (if needed), migrate and fill the platform database at `url` with about
    `size_mb` MiB of data; return what was made (row counts, bytes, seconds per step).

    `url`: SQLAlchemy URL (or string) of the database to fill, e.g. the embedded server's
    `url.set(database="maestro")`. It must be empty: the tables are filled with fixed ids.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    from maestro_pipelines.platform_db.location import DatabaseLocation
    from maestro_pipelines.platform_db.migrate import upgrade

    url = make_url(url) if isinstance(url, str) else url
    steps = _Steps(progress or (lambda message: None))
    migration = upgrade(DatabaseLocation(platform_url=url, source="benchmark"))
    steps.done("migrations")

    counts = _counts(size_mb)
    common = {"mpt": MODELS_PER_TENANT, "models": counts["models"], "k": counts["versions_per_model"],
              "tenants": counts["tenants"], "experiments": counts["experiments"], "seed": seed,
              "batch": BATCH_ROWS}
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)

    def connect():
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(SESSION)
        conn.execute(f"SELECT setseed({(seed % 1000) / 1000.0})")
        return conn

    today = datetime.now(timezone.utc).date()
    months = [_month_start(today, -back) for back in range(MONTHS - 1, -1, -1)]
    with connect() as conn:
        _seed_catalog(conn, months, common)
    steps.done("tenants, models, experiments, versions, deployments")

    def insert(job):
        with connect() as conn:
            conn.execute(_bind(PREDICTIONS_SQL, job))

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(insert, _prediction_jobs(months, counts["predictions"], common)))
    steps.done("predictions")

    with connect() as conn:
        conn.execute("VACUUM ANALYZE")
        steps.done("vacuum analyze")
        conn.execute("REFRESH MATERIALIZED VIEW model_statistics")
        conn.execute("REFRESH MATERIALIZED VIEW tenant_usage_statistics")
        steps.done("refresh materialized views")
        made = _measure_database(conn)
    seconds = round(time.perf_counter() - steps.started, 2)
    return {"size_mb_requested": size_mb, "database_bytes": made["database_bytes"],
            "database_mib": made["database_mib"], "seconds": seconds, "steps_s": steps.seconds, "rows": made["rows"],
            "partitions": made["partitions"], "relation_mib": made["relation_mib"], "migration": migration.after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB of database to make (default 1024)")
    parser.add_argument("--home", type=Path, help="MAESTRO_HOME to use and keep (default: a temporary one, removed)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="maestro-platform-data-"))
    server = None
    try:
        server, url = start_embedded(home)
        info = generate_platform_database(url.set(database="maestro"), args.size_mb,
                                          progress=lambda message: print(message, file=sys.stderr))
        print(json.dumps(info, indent=2))
    finally:
        if server is not None and args.home is None:
            server.stop()
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
