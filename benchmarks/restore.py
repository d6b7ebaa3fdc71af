"""Restoring the platform database: our `restore_backup` vs. the restore floor, and the DR
drill's RTO.

    python -m benchmarks.restore [--size-mb 1024] [--repeat 2] [--jobs 2] [--home DIR] [--results PATH]

One run, everything sequential (the machine has 2 cores): a platform database of `--size-mb`
MiB is generated (`benchmarks.platform_data`) on an embedded PostgreSQL 18 in a temporary
MAESTRO_HOME and a moto S3 server is started in its own process. Not timed: our backup of
it (`create_backup`, the library's defaults) into a `file://` store and into an `s3://` store
on moto, and `pg_dump -Fc -Z0 -f FILE` (the floor's input: local, uncompressed). Then, each
`--repeat` times, interleaved so that drift on the machine hits all three alike (the fastest
run counts, every run is recorded):

- floor: `CREATE DATABASE` + `pg_restore -j N --no-owner --no-privileges` of that local,
  uncompressed file into the empty database: nothing restores a logical dump faster;
- ours, local: `restore_backup(target="scratch")` from the file store: download and check
  (sha256, zstd frame checksums, sizes) decompressing to a local file, `CREATE DATABASE`,
  the same `pg_restore -j N`, row counts and content checksums of every table compared with
  the manifest (most taken while pg_restore loads the other tables), `alembic upgrade head`, the artifact manifest checked;
- ours, S3: the same from the S3 store on moto.

The scratch databases are dropped after each run (not timed). Last, `run_drill` once from
the local store: RTO (start to verified, amcheck included) and where its time goes.

The order of the three rotates from run to run, and each run starts after a CHECKPOINT and a
sync (not timed), so no contender inherits the previous one's writeback.

Targets: ours from the local store within 1.15x of the floor, from S3 (moto) within 1.3x; drill
RTO under 3 minutes. Beside each, the CPU seconds of every party (our process, pg_restore, the
server, from /proc: `benchmarks.cpu_time`) against 2 cores x the wall time, and what bound it.
Results go to benchmarks/results/restore.json (or `--results PATH`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.backup import pg_environment, pg_program
from benchmarks.cpu_time import cpu_row, reach_row
from benchmarks.report import add_results_option, print_rows, r, row, write_results

MiB = 1024 * 1024
MB = 1_000_000
FLOOR_TARGET = 1.15         # ours (local store) vs. pg_restore -j N of a local uncompressed file
S3_TARGET = 1.3             # ours from S3 (moto) vs. the same floor
RTO_TARGET_S = 180.0        # the drill, start to verified


def admin_sql(db_url, sql: str) -> None:
    from maestro_pipelines.backup.pgtools import psycopg_connect

    with psycopg_connect(db_url.set(database="postgres"), autocommit=True) as conn:
        conn.execute(sql)


def settle(db_url) -> None:
    """Not timed: the previous run's dirty pages written out, so it does not slow the next one."""
    admin_sql(db_url, "CHECKPOINT")
    os.sync()


def floor_restore(db_url, dump_file: Path, jobs: int, name: str, server) -> dict:
    """CREATE DATABASE + pg_restore -j N of the local uncompressed file (timed, with the CPU
    seconds of pg_restore and of the server over it), then drop it."""
    from benchmarks.cpu_time import Parties

    env, _ = pg_environment(db_url.render_as_string(hide_password=False))
    with Parties(server) as parties:
        admin_sql(db_url, f'CREATE DATABASE "{name}"')
        done = subprocess.run(
            [pg_program("pg_restore"), "--no-owner", "--no-privileges", f"--jobs={jobs}", f"--dbname={name}",
             "--no-password", str(dump_file)],
            env=env, capture_output=True, text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"pg_restore (floor) failed: {done.stderr[-2000:]}")
    admin_sql(db_url, f'DROP DATABASE "{name}" WITH (FORCE)')
    return parties.figures()


def ours_restore(store, destinations, jobs: int, server) -> dict:
    """Our scratch restore of the newest backup in `store` (timed, with the CPU seconds of this
    process, of pg_restore and of the server over it), then its databases dropped."""
    from benchmarks.cpu_time import Parties
    from maestro_pipelines.backup import resolve_restore_point, restore_backup
    from maestro_pipelines.platform_db.admin import drop_database

    with Parties(server) as parties:
        entry = resolve_restore_point(store, "latest")
        report = restore_backup(store, entry, destinations, jobs=jobs)
    for db in report.databases:
        drop_database(db.url, db.restored_as)
    cpu = parties.figures()
    return {"wall_s": cpu["wall_s"], "duration_s": report.duration_s, "steps_s": report.step_seconds(),
            "ok": report.ok, "rows": sum(d.rows for d in report.databases),
            "tables": sum(d.tables for d in report.databases), "cpu": cpu}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB of platform database (default 1024)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the floor and of ours; the fastest counts (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="pg_restore jobs, the floor's and ours (default 2: the CLI's)")
    parser.add_argument("--home", type=Path,
                        help="MAESTRO_HOME to use and keep; its database is generated once and reused after")
    add_results_option(parser, "restore")
    return parser.parse_args()


def dump_floor_input(db_url, dump_file: Path) -> dict:
    """The floor's input: pg_dump -Fc -Z0 -f FILE (not part of any timed figure)."""
    env, database = pg_environment(db_url.render_as_string(hide_password=False))
    started = time.perf_counter()
    subprocess.run([pg_program("pg_dump"), "-Fc", "-Z0", "-f", str(dump_file), "-d", database], env=env, check=True)
    return {"bytes": dump_file.stat().st_size, "dump_s": r(time.perf_counter() - started)}


def back_up_into(stores: dict, destinations, say) -> dict:
    """Our backup into each store, verified (not timed): what the restores read."""
    from maestro_pipelines.backup import BackupOptions, create_backup, verify_backup

    backups = {}
    for where, store in stores.items():
        say(f"our backup into the {where} store (not timed) ...")
        started = time.perf_counter()
        manifest = create_backup(store, destinations, BackupOptions())
        verified = verify_backup(store, manifest.backup_id)
        assert verified.ok, verified.problems
        dump = manifest.databases[0]
        backups[where] = {"id": manifest.backup_id, "seconds": r(time.perf_counter() - started),
                          "dump_bytes": dump.dump_bytes, "stored_bytes": dump.compressed_bytes}
    return backups


def race(args: argparse.Namespace, db_url, dump_file: Path, stores: dict, destinations, server,
         say) -> tuple[list, list, list]:
    """The floor and our restores from each store, --repeat times: (floors, ours local, ours S3)."""
    floors, ours_local, ours_s3 = [], [], []
    contenders = [
        ("floor", lambda attempt: floors.append(
            floor_restore(db_url, dump_file, args.jobs, f"maestro_floor_{attempt}", server))),
        ("ours, local store", lambda attempt: ours_local.append(
            ours_restore(stores["local"], destinations, args.jobs, server))),
        ("ours, S3/moto", lambda attempt: ours_s3.append(ours_restore(stores["s3"], destinations, args.jobs, server))),
    ]
    for attempt in range(args.repeat):
        # The order rotates from run to run (no one always goes first, right after a
        # drop), and every run starts from a checkpointed, synced server.
        for name, run in contenders[attempt % 3:] + contenders[:attempt % 3]:
            settle(db_url)
            started = time.perf_counter()
            run(attempt)
            say(f"run {attempt + 1}/{args.repeat}, {name}: {time.perf_counter() - started:.1f} s")
    return floors, ours_local, ours_s3


def measure(args: argparse.Namespace, results: dict, say) -> dict:
    """Generate (or reuse) the database, back it up, race the restores, run a drill."""
    from benchmarks.platform_data import AWS, BUCKET, moto_bucket, prepare_platform_database
    from maestro_pipelines.backup import DatabaseTarget, run_drill
    from maestro_pipelines.storage import open_store

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-restore-"))
    home = args.home or workdir / "home"
    server = None
    try:
        server, db_url, generation = prepare_platform_database(home, args.size_mb, reuse=bool(args.home), say=say)
        results["database"] = {k: generation[k] for k in ("database_mib", "seconds", "rows")}
        destinations = [DatabaseTarget("platform", db_url, "benchmark")]

        say("floor's input: pg_dump -Fc -Z0 -f FILE (not timed) ...")
        dump_file = workdir / "platform.dump"
        results["floor_input"] = dump_floor_input(db_url, dump_file)

        with moto_bucket(workdir) as (endpoint, moto_pid):
            results["moto_pid"] = moto_pid
            stores = {
                "local": open_store((workdir / "store").as_uri(), create=True),
                "s3": open_store(f"s3://{BUCKET}/backups", endpoint_url=endpoint, **AWS),
            }
            results["backups"] = backups = back_up_into(stores, destinations, say)
            from benchmarks.cpu_time import ServerCPU, disk_write_throughput

            results["disk_write_MBps"] = disk_write_throughput(workdir)
            floors, ours_local, ours_s3 = race(args, db_url, dump_file, stores, destinations,
                                               ServerCPU(server.pgdata), say)

            settle(db_url)
            say("drill from the local store ...")
            drill = run_drill(stores["local"], destinations, jobs=args.jobs)
            say(f"  RTO {drill.rto_s:.1f} s")
    finally:
        if server is not None and args.home is None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"generation": generation, "backups": backups, "floors": floors, "ours_local": ours_local,
            "ours_s3": ours_s3, "drill": drill}


def steps_text(run: dict) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["steps_s"].items())


def serial_row(local: dict, floor: float) -> dict:
    """The steps in series around pg_restore (the download ends before any database is touched;
    what the verify did not check beside pg_restore is checked after it) against what the local
    target leaves them."""
    steps = local["steps_s"]
    serial = sum(seconds for name, seconds in steps.items() if not name.startswith("pg_restore"))
    budget = (FLOOR_TARGET - 1) * floor
    return row("  ours, local store: steps in series around pg_restore (download, verify, ...) vs what "
               f"{FLOOR_TARGET:g}x leaves them (s)", r(serial), r(budget), r(serial / budget) if budget else None,
               "reported: above 1, the target needs them overlapped with pg_restore", None)


def result_rows(args: argparse.Namespace, measured: dict, results: dict) -> list[dict]:
    """The table: the floor, ours from each store against it, the drill's RTO, then what is reported."""
    generation, drill, backups = measured["generation"], measured["drill"], measured["backups"]
    floor_run = min(measured["floors"], key=lambda run: run["wall_s"])
    floor, local, s3 = floor_run["wall_s"], results["ours"]["local"], results["ours"]["s3"]
    drill_result = results["drill"]
    return [
        row(f"generate the {generation['database_mib']} MiB database (s)", None, r(generation["seconds"], 1), None,
            "reported", None),
        row(f"floor: CREATE DATABASE + pg_restore -j{args.jobs} of a local -Fc -Z0 file (s, best of {args.repeat})",
            None, r(floor), None, "reported", None),
        row("restore from the local store vs the floor (s)", r(local["wall_s"]), r(floor), r(local["wall_s"] / floor),
            f"ours/floor <= {FLOOR_TARGET:g}", local["wall_s"] / floor <= FLOOR_TARGET),
        row("restore from S3/moto vs the floor (s)", r(s3["wall_s"]), r(floor), r(s3["wall_s"] / floor),
            f"ours/floor <= {S3_TARGET:g}", s3["wall_s"] / floor <= S3_TARGET),
        cpu_row("floor", floor_run, "pg_restore"),
        row("  disk: sequential write + fsync of 256 MB (MB/s)", r(results["disk_write_MBps"], 0), None, None,
            "reported", None),
        cpu_row("ours, local store", local["cpu"], "pg_restore"),
        reach_row("ours, local store", local["cpu"], floor, FLOOR_TARGET),
        cpu_row("ours, S3/moto (moto's CPU not counted)", s3["cpu"], "pg_restore"),
        row("drill RTO, local store (s)", r(drill.rto_s), None, None, f"< {RTO_TARGET_S:g} s",
            drill.rto_s is not None and drill.rto_s < RTO_TARGET_S and drill.ok),
        serial_row(local, floor),
        row("  our pg_restore step alone vs the floor (s)", r(local["steps_s"].get("pg_restore platform")), r(floor),
            r(local["steps_s"].get("pg_restore platform", 0) / floor), "reported", None),
        row("  ours, every run: local / S3 (s)", f"{local['runs_s']} / {s3['runs_s']}",
            f"{results['floor_s']}", None, "the fastest counts", None),
        row("  steps of the best local restore (s)", steps_text(local), None, None, "reported", None),
        row("  steps of the best S3 restore (s)", steps_text(s3), None, None, "reported", None),
        row("  steps of the drill (s)", ", ".join(f"{k} {v:.2f}" for k, v in drill_result["steps"].items()), None, None,
            f"{drill_result['indexes_checked']} indexes amchecked; problems: {drill_result['problems'] or 'none'}", None),
        row("  backup restored: uncompressed dump / stored (MB)",
            f"{r(backups['local']['dump_bytes'] / MB, 1)} / {r(backups['local']['stored_bytes'] / MB, 1)}",
            r(results["floor_input"]["bytes"] / MB, 1), None, "floor's file (MB) as baseline", None),
    ]


def main() -> int:
    args = parse_args()
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"size_mib": args.size_mb, "jobs": args.jobs, "repeat": args.repeat,
                     "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    measured = measure(args, results, say)

    ours_local, ours_s3 = measured["ours_local"], measured["ours_s3"]
    local = min(ours_local, key=lambda run: run["wall_s"])
    s3 = min(ours_s3, key=lambda run: run["wall_s"])
    results["floor_s"] = [r(x["wall_s"]) for x in measured["floors"]]
    results["floor_runs"] = measured["floors"]
    results["ours"] = {"local": {**local, "runs_s": [r(x["wall_s"]) for x in ours_local]},
                       "s3": {**s3, "runs_s": [r(x["wall_s"]) for x in ours_s3]},
                       "every_run_steps_s": {"local": [x["steps_s"] for x in ours_local],
                                             "s3": [x["steps_s"] for x in ours_s3]}}
    results["drill"] = measured["drill"].as_dict()
    rows = result_rows(args, measured, results)
    results["rows"] = rows
    results["loadavg_end"] = os.getloadavg()
    write_results(args.results, results)

    print(f"platform database: {measured['generation']['database_mib']} MiB ({local['tables']} tables, "
          f"{local['rows']:,} rows restored and compared); pg_restore -j{args.jobs}; load average at start "
          f"{results['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}\n")
    print_rows(rows)
    passes = [x["pass"] for x in rows if x["pass"] is not None]
    return 0 if all(passes) else 1


if __name__ == "__main__":
    sys.exit(main())
