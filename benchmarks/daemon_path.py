"""A run per tenant through the daemon's path vs the same work without it.

    python -m benchmarks.daemon_path [--tenants 100] [--rounds 3] [--concurrency 4] [--pool-slots N] [--results PATH]

The deployment as `deploy/dagster.yaml` describes it: Dagster's storage and the platform
database on PostgreSQL (an embedded PostgreSQL 18 here), runs queued by `dagster job launch`
or `dagster job backfill`, dequeued by a real `dagster-daemon run` into the
QueuedRunCoordinator's limits and started by the DefaultRunLauncher (a run worker process per
run, which imports the code location), `train_and_deploy` with the executor its job sets.

Figures (rows in the format of `benchmarks.report`):

- one tenant through the daemon's path (from its enqueue to its end, the daemon already
  running) vs the same graph `execute_in_process` in a warm process, median of `--rounds`
  (target <= 1.5), and vs `dagster job execute` (a process of its own, reported); the fixed
  latencies of the path (queued to launched, launched to the first step, the steps) reported;
- `--tenants` tenants through the daemon, `--concurrency` at a time (the training limit of
  deploy/dagster.yaml), vs a plain script training them in `--concurrency` processes with the
  library calls alone (benchmarks.ml_graph.plain_script): tenants per minute (target >= 0.5).

The tenants are copies of the three demo datasets (acme, globex, initech, in turn) under new
names; both sides train the same ones, each against an MLflow database of its own.
`--pool-slots` gives the pool `platform_database` that many slots (`dagster instance concurrency
set`) to show what its one slot costs: `trained_model` takes a slot, so with one slot the
trainings of concurrent runs take turns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results

REPO = Path(__file__).parent.parent
VENV_BIN = Path(sys.executable).parent
ONE_TENANT_TARGET = 1.5
THROUGHPUT_TARGET = 0.5
DEMO_DATASETS = ("acme", "globex", "initech")
RUN_DEADLINE_S = 3600
PLATFORM_POOL = "platform_database"


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}


def prepare_deployment(workdir: Path) -> dict[str, str]:
    """An embedded PostgreSQL with Dagster's and the platform's databases, DAGSTER_HOME holding
    deploy/dagster.yaml as it is, a local store: the environment every process gets."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

    admin = EmbeddedPostgres(workdir / "pg").start()
    with engine_for(admin).connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for database in ("platform", "dagster", "plain_mlflow"):
            conn.execute(text(f'CREATE DATABASE "{database}"'))
    for folder in ("dagster_home", "maestro_home", "store", "tmp"):
        (workdir / folder).mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", workdir / "dagster_home" / "dagster.yaml")

    def libpq(database: str) -> str:
        return admin.set(drivername="postgresql", database=database).render_as_string(hide_password=False)

    return {
        "DAGSTER_HOME": str(workdir / "dagster_home"),
        "MAESTRO_HOME": str(workdir / "maestro_home"),
        "MAESTRO_DATABASE_URL": libpq("platform"),
        "MAESTRO_DAGSTER_DATABASE_URL": libpq("dagster"),
        "MAESTRO_STORE_URL": (workdir / "store").as_uri(),
        "TMPDIR": str(workdir / "tmp"),
        "PLAIN_MLFLOW_URL": libpq("plain_mlflow"),
    }


def seed_tenants(tenants: list[str]) -> None:
    """The platform database migrated, each tenant with a copy of a demo dataset, and their
    partitions (added before the daemon starts: its sensors then request no first training)."""
    import dagster as dg
    from sqlalchemy import text

    from maestro_pipelines.ml.demo import seed_demo_tenant
    from maestro_pipelines.partitions import tenant_partitions
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import connect
    from maestro_pipelines.platform_db.migrate import upgrade
    from maestro_pipelines.platform_db.tenants import add_tenant
    from maestro_pipelines.settings import load_settings

    location = locate_platform_database(load_settings())
    upgrade(location)
    with connect(location.platform_url, location.source) as conn:
        for dataset in DEMO_DATASETS:
            seed_demo_tenant(conn, dataset)  # rows only, no tenant
        for position, tenant in enumerate(tenants):
            conn.execute(text(
                "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
                "SELECT :tenant, entity_key, features, label, updated_at FROM training_rows WHERE tenant = :dataset"
            ), {"tenant": tenant, "dataset": DEMO_DATASETS[position % len(DEMO_DATASETS)]})
            add_tenant(conn, tenant)
        conn.commit()
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(tenant_partitions.name, tenants)


class Daemon:
    """`dagster-daemon run` on the repository's workspace, in its own process group."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log = env, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                cwd=self.env["MAESTRO_HOME"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited: {self.log.read_text()[-3000:]}")


def dagster_cli(env: dict[str, str], *args: str) -> float:
    """A `dagster` command as a user types it; its wall time."""
    started = time.perf_counter()
    done = subprocess.run([str(VENV_BIN / "dagster"), *args], cwd=env["MAESTRO_HOME"], env=env,
                          capture_output=True, text=True, timeout=RUN_DEADLINE_S)
    if done.returncode != 0:
        raise RuntimeError(f"dagster {' '.join(args[:3])} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def wait_for_runs(instance, daemon: Daemon, tenants: list[str], since: float) -> list:
    """The records of the train_and_deploy runs of `tenants` created after `since`, once all ended."""
    import dagster as dg

    deadline = time.monotonic() + RUN_DEADLINE_S
    wanted = set(tenants)
    while time.monotonic() < deadline:
        records = [r for r in instance.get_run_records(dg.RunsFilter(job_name="train_and_deploy"), limit=len(wanted) + 50)
                   if r.dagster_run.tags.get("dagster/partition") in wanted and r.create_timestamp.timestamp() >= since]
        if len(records) == len(wanted) and all(r.dagster_run.is_finished for r in records):
            failed = [r.dagster_run.tags["dagster/partition"] for r in records
                      if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
            if failed:
                raise RuntimeError(f"train_and_deploy failed for {', '.join(failed)}")
            return records
        daemon.check()
        time.sleep(0.5)
    raise RuntimeError(f"runs of {len(wanted)} tenants not finished after {RUN_DEADLINE_S} s")


def launched_at(instance, run_id: str) -> float:
    """When the daemon took the run off the queue (PIPELINE_STARTING)."""
    import dagster as dg

    (starting,) = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.PIPELINE_STARTING).records
    return starting.timestamp


def through_the_daemon(env, instance, daemon: Daemon, tenant: str) -> dict:
    """One run queued by `dagster job launch` (not timed: a sensor or the UI does this), from
    its enqueue to its end, and where that time went."""
    import dagster as dg

    since = time.time()
    dagster_cli(env, "job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "train_and_deploy",
                "--tags", json.dumps({"dagster/partition": tenant}))
    (record,) = wait_for_runs(instance, daemon, [tenant], since)
    run_id = record.dagster_run.run_id
    (first_step,) = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START, limit=1).records
    enqueued, launched = record.create_timestamp.timestamp(), launched_at(instance, run_id)
    return {"total": record.end_time - enqueued, "queued": launched - enqueued,
            "worker_start": first_step.timestamp - launched, "steps": record.end_time - first_step.timestamp}


def in_process(job, instance, tenant: str) -> float:
    started = time.perf_counter()
    result = job.execute_in_process(partition_key=tenant, instance=instance)
    elapsed = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"train_and_deploy in process failed for {tenant}")
    return elapsed


def race_one_tenant(env, instance, daemon: Daemon, rounds: int) -> dict[str, list]:
    """Each round, one new tenant each way, alternating so all three see the same machine."""
    from maestro_pipelines.definitions import defs

    job = defs.resolve_job_def("train_and_deploy")
    in_process(job, instance, "warm-up-in-process")  # imports and MLflow's first use, not timed
    through_the_daemon(env, instance, daemon, "warm-up-daemon")  # the daemon's code server loads
    figures: dict[str, list] = {"warm": [], "cli": [], "daemon": []}
    for number in range(rounds):
        figures["warm"].append(in_process(job, instance, f"one-warm-{number}"))
        figures["cli"].append(dagster_cli(env, "job", "execute", "-m", "maestro_pipelines.definitions", "-j",
                                          "train_and_deploy", "--tags",
                                          json.dumps({"dagster/partition": f"one-cli-{number}"})))
        figures["daemon"].append(through_the_daemon(env, instance, daemon, f"one-daemon-{number}"))
    return figures


_PLAIN: dict = {}


def _plain_worker_start(platform_url: str, mlflow_url: str, artifacts: str) -> None:
    from maestro_pipelines.ml.registry import ModelRegistry
    from maestro_pipelines.platform_db.urls import parse_postgres_url

    _PLAIN["platform_url"] = parse_postgres_url(platform_url, "MAESTRO_DATABASE_URL")
    _PLAIN["registry"] = ModelRegistry(mlflow_url, artifacts)


def _plain_train(tenant: str) -> float:
    from benchmarks.ml_graph import plain_script

    return plain_script(tenant, _PLAIN["platform_url"], _PLAIN["registry"])


def plain_script_pool(env: dict[str, str], tenants: list[str], concurrency: int, artifacts: Path) -> float:
    """The same library calls without Dagster in `concurrency` processes (started, imports and
    all, inside the clock), each training tenants in turn; the wall time."""
    import multiprocessing

    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(
        concurrency, _plain_worker_start, (env["MAESTRO_DATABASE_URL"], env["PLAIN_MLFLOW_URL"], artifacts.as_uri()),
    ) as pool:
        pool.map(_plain_train, tenants, chunksize=1)
    return time.perf_counter() - started


def daemon_throughput(env, instance, daemon: Daemon, tenants: list[str]) -> dict:
    """All tenants queued by one `dagster job backfill` with the daemon stopped, then the daemon
    started: from the first run it launches to the last run's end."""
    from tests.services import most_at_once

    daemon.stop()
    since = time.time()
    dagster_cli(env, "job", "backfill", "-w", str(REPO / "workspace.yaml"), "-j", "train_and_deploy",
                "--partitions", ",".join(tenants), "--noprompt")
    daemon.start()
    records = wait_for_runs(instance, daemon, tenants, since)
    windows = [(launched_at(instance, r.dagster_run.run_id), r.end_time) for r in records]
    return {"wall": max(end for _, end in windows) - min(start for start, _ in windows),
            "at_once": most_at_once(windows)}


def one_tenant_rows(figures: dict[str, list]) -> list[dict]:
    median = {side: statistics.median(f if side != "daemon" else [x["total"] for x in f]) for side, f in figures.items()}
    parts = {part: statistics.median(x[part] for x in figures["daemon"]) for part in ("queued", "worker_start", "steps")}
    rounds = len(figures["warm"])
    ratio = median["daemon"] / median["warm"]
    return [
        row(f"one tenant: through the daemon (enqueued to done) vs execute_in_process in a warm process "
            f"(s, median of {rounds})", r(median["daemon"]), r(median["warm"]), r(ratio), f"<= {ONE_TENANT_TARGET}",
            ratio <= ONE_TENANT_TARGET),
        row("  vs `dagster job execute` (in process too, in a process of its own: the same imports)",
            r(median["daemon"]), r(median["cli"]), r(median["daemon"] / median["cli"]), "reported", None),
        row("  queued to launched (dequeue_interval_seconds: 1)", r(parts["queued"]), None, None, "reported", None),
        row("  launched to the first step (run worker start: the code location's import)", r(parts["worker_start"]),
            None, None, "reported", None),
        row("  first step to done (14 steps, with MLflow's and scikit-learn's first use)", r(parts["steps"]), None,
            None, "reported", None),
    ]


def throughput_rows(tenants: int, concurrency: int, daemon: dict, plain_wall: float) -> list[dict]:
    ours, baseline = tenants / daemon["wall"] * 60, tenants / plain_wall * 60
    return [
        row(f"{tenants} tenants, {concurrency} at a time: through the daemon vs a plain script in {concurrency} "
            "processes (tenants per minute)", r(ours, 1), r(baseline, 1), r(ours / baseline),
            f">= {THROUGHPUT_TARGET}", ours / baseline >= THROUGHPUT_TARGET),
        row("  wall time (s)", r(daemon["wall"], 1), r(plain_wall, 1), r(daemon["wall"] / plain_wall), "reported", None),
        row("  most runs at once (the maestro/kind: training limit)", daemon["at_once"], concurrency, None,
            f"<= {concurrency}", daemon["at_once"] <= concurrency),
    ]


def run(tenants: int, rounds: int, concurrency: int, pool_slots: int | None, results: Path) -> int:
    import dagster as dg

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-daemon-"))
    env = prepare_deployment(workdir)
    os.environ.update(env)  # this process is the warm one: the same storage and databases
    names = [f"bulk-{i:03d}" for i in range(tenants)]
    one = ["warm-up-in-process", "warm-up-daemon", *(f"one-{side}-{n}" for n in range(rounds)
                                                     for side in ("warm", "cli", "daemon"))]
    seed_tenants([*one, *names])
    daemon_env = {**clean_environment(), **env}
    if pool_slots is not None:  # deploy/dagster.yaml gives each pool one slot unless set like this
        dagster_cli(daemon_env, "instance", "concurrency", "set", PLATFORM_POOL, str(pool_slots))
    daemon = Daemon(daemon_env, workdir / "daemon.log")
    instance = dg.DagsterInstance.get()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    try:
        daemon.start()
        figures = race_one_tenant(daemon_env, instance, daemon, rounds)
        through = daemon_throughput(daemon_env, instance, daemon, names)
    finally:
        daemon.stop()
    plain_wall = plain_script_pool(env, names, concurrency, workdir / "plain_artifacts")
    rows = [*one_tenant_rows(figures), *throughput_rows(tenants, concurrency, through, plain_wall)]
    write_results(results, {"tenants": tenants, "rounds": rounds, "concurrency": concurrency,
                            "platform_database_pool_slots": pool_slots or 1, "one_tenant": figures,
                            "loadavg": {"start": loadavg_start, "end": [round(x, 2) for x in os.getloadavg()]},
                            "rows": rows})
    print_rows(rows)
    instance.dispose()
    from maestro_pipelines.platform_db.connection import dispose_engines
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

    dispose_engines()
    EmbeddedPostgres(workdir / "pg").stop()
    return 0 if all(x["pass"] is not False for x in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100, help="tenants for the throughput figure")
    parser.add_argument("--rounds", type=int, default=3, help="one-tenant rounds (median)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="the plain script's processes; deploy/dagster.yaml's training limit is the daemon's")
    parser.add_argument("--pool-slots", type=int, help=f"slots of the pool {PLATFORM_POOL} (trained_model, "
                        "deployment and batch_predictions take one each); default: deploy/dagster.yaml's one")
    add_results_option(parser, "daemon_path")
    args = parser.parse_args()
    return run(args.tenants, args.rounds, args.concurrency, args.pool_slots, args.results)


if __name__ == "__main__":
    sys.exit(main())
