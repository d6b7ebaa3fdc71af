"""Restore to a point (base backup + WAL) vs today's logical restore of the same data.

    python -m benchmarks.pitr_restore [--quick] [--size-mb 1024] [--repeat 2] [--jobs 2] [--results PATH]

One run, everything sequential (2 cores): an embedded PostgreSQL 18 of its own archiving its
WAL (archive_command into a spool folder, pushed into a local `file://` store the way the
pusher does), a platform database of `--size-mb` MiB generated in it (`benchmarks.platform_data`).
Not timed: a verified dump backup of it (`create_backup`) and a full base backup
(`take_base_backup`), then a few transactions and their WAL archived and pushed. Then, each
`--repeat` times, interleaved (the fastest run counts, every run is recorded):

- baseline: today's logical restore, `restore_backup` of that dump into scratch (download and
  check, pg_restore -j N, every table compared, migrations);
- ours: `restore_to_point(latest)` into scratch: extract the base backup, replay the WAL on a
  temporary server, pg_dump -Fc of the database from it, then the same phases as the baseline;
- and the time to a recovered, queryable temporary server alone (`recovered_server`: extract,
  replay, promoted): what a user waits for to look at the data with psql.

Target: ours <= 0.5x the logical restore. Honest note: the delivery into the live server is
still logical (pg_dump + pg_restore from the temporary server, so that scratch/live, the
swap and its journal stay today's), so a restore to a point costs the logical restore plus
the recovery; only the recovered server alone can be under the target.
Results go to benchmarks/results/pitr_restore.json (or `--results PATH`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results

TARGET = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, one run of each (overrides --size-mb, --repeat)")
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB of platform database (default 1024)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each contender (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="pg_restore -j (default 2)")
    add_results_option(parser, "pitr_restore")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.repeat = 128, 1
    return args


def drop(server, names: list[str]) -> None:
    for name in names:
        server.execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    server.execute("postgres", "CHECKPOINT")
    os.sync()


def logical(store, destinations, jobs: int) -> tuple[float, dict, list[str]]:
    from maestro_pipelines.backup import resolve_restore_point, restore_backup

    started = time.perf_counter()
    report = restore_backup(store, resolve_restore_point(store, "latest"), destinations, jobs=jobs)
    return time.perf_counter() - started, report.step_seconds(), [d.restored_as for d in report.databases]


def to_point(store, destinations, jobs: int) -> tuple[float, dict, list[str]]:
    from maestro_pipelines.backup.pitr.recover import RecoveryTarget
    from maestro_pipelines.backup.pitr.restore import restore_to_point

    started = time.perf_counter()
    report = restore_to_point(store, RecoveryTarget.parse("latest"), destinations, jobs=jobs)
    assert report.ok and report.reached_lsn
    return time.perf_counter() - started, report.step_seconds(), [d.restored_as for d in report.databases]


def recovered_only(store, system_id: str) -> tuple[float, dict, list[str]]:
    from maestro_pipelines.backup.pitr.recover import RecoveryTarget, recovered_server

    started = time.perf_counter()
    with recovered_server(store, system_id, RecoveryTarget.parse("latest")) as server:
        ready = time.perf_counter() - started
        assert "maestro" in server.databases
    return ready, {}, []


def prepare(workdir: Path, size_mb: float, say):
    """The archiving server, its generated database, a verified dump and a base backup."""
    from benchmarks.platform_data import generate_platform_database
    from maestro_pipelines.backup import DatabaseTarget, create_backup, verify_backup
    from maestro_pipelines.backup.pitr.base import take_base_backup
    from maestro_pipelines.storage import open_store
    from tests.pitr.recovery_fixtures import ArchivingServer

    store = open_store((workdir / "store").as_uri(), create=True)
    server = ArchivingServer(workdir / "server", store)
    db_url = server.url.set(database="maestro")
    say(f"generating a {size_mb:g} MiB platform database ...")
    generation = generate_platform_database(db_url, size_mb)
    for segment in server.spool.iterdir():  # WAL from before the base backup: not needed
        segment.unlink()
    destinations = [DatabaseTarget("platform", db_url, "benchmark")]
    say("dump backup and base backup (not timed) ...")
    manifest = create_backup(store, destinations)
    assert verify_backup(store, manifest.backup_id).ok
    base = take_base_backup(store, destinations[0], kind="full")
    server.execute("maestro", "CREATE TABLE bench_marker (at timestamptz DEFAULT now())")
    server.execute("maestro", "INSERT INTO bench_marker DEFAULT VALUES")
    server.archive_now()
    return store, server, destinations, generation, base


def measure(args, say) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-pitr-"))
    workdir.chmod(0o755)
    (workdir / "store").mkdir()
    server = None
    runs: dict[str, list] = {"logical": [], "point": [], "recovered": []}
    try:
        store, server, destinations, generation, base = prepare(workdir, args.size_mb, say)
        contenders = {"logical": lambda: logical(store, destinations, args.jobs),
                      "point": lambda: to_point(store, destinations, args.jobs),
                      "recovered": lambda: recovered_only(store, server.system_id)}
        for attempt in range(args.repeat):
            order = list(contenders)[attempt % 3:] + list(contenders)[:attempt % 3]
            for name in order:
                seconds, steps, made = contenders[name]()
                runs[name].append({"wall_s": r(seconds), "steps_s": steps})
                drop(server, made)
                say(f"run {attempt + 1}/{args.repeat}, {name}: {seconds:.1f} s")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"generation": generation, "base_tar_mb": r(base.tar_bytes / 1e6, 1), "runs": runs}


def result_rows(measured: dict) -> list[dict]:
    best = {name: min(runs, key=lambda run: run["wall_s"]) for name, runs in measured["runs"].items()}
    logical_s, point_s, ready_s = (best[n]["wall_s"] for n in ("logical", "point", "recovered"))
    steps = ", ".join(f"{k} {v:.2f}" for k, v in best["point"]["steps_s"].items())
    return [
        row(f"generate the {measured['generation']['database_mib']} MiB database (s)", None,
            r(measured["generation"]["seconds"], 1), None, "reported", None),
        row("restore to a point (latest) vs today's logical restore of the same data (s)", point_s, logical_s,
            r(point_s / logical_s), f"ours/logical <= {TARGET:g}", point_s / logical_s <= TARGET),
        row("  time to a recovered, queryable temporary server vs the logical restore (s)", ready_s, logical_s,
            r(ready_s / logical_s), f"reported (<= {TARGET:g} would meet it)", None),
        row("  steps of the best restore to a point (s)", steps, None, None, "reported", None),
        row("  every run: point / logical / recovered (s)",
            " / ".join(str([x["wall_s"] for x in measured["runs"][n]]) for n in ("point", "logical", "recovered")),
            None, None, "the fastest counts", None),
        row("  base backup tar (MB)", measured["base_tar_mb"], None, None, "reported", None),
    ]


def main() -> int:
    args = parse_args()
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"size_mib": args.size_mb, "jobs": args.jobs, "repeat": args.repeat, "cpus": os.cpu_count(),
                     "loadavg_start": os.getloadavg()}
    measured = measure(args, say)
    results.update({"runs": measured["runs"], "rows": result_rows(measured), "loadavg_end": os.getloadavg()})
    write_results(args.results, results)
    print(f"platform database: {measured['generation']['database_mib']} MiB; load average at start "
          f"{results['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}\n")
    print_rows(results["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
