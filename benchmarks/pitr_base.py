"""Base backups of the physical tier: our `take_base_backup` (pg_basebackup -Ft -X none to
stdout, zstd, sha256, the manifest picked out of the stream, into the store) vs. the floor
`pg_basebackup -Ft -X none -D - > /dev/null`; and an incremental one after 5% of the rows
changed vs. a full one.

    python -m benchmarks.pitr_base [--size-mb 1024] [--quick] [--no-s3] [--results PATH]

One run, sequential (2 cores): the backup benchmark's platform database (`benchmarks.platform_data`,
`--size-mb` MiB; `--quick`: 256) on an embedded PostgreSQL 18 in a temporary MAESTRO_HOME,
restarted with WAL archiving on (`archive_command = 'true'`: the WAL is not what is measured,
but `-X none` waits for the archiver) and summarize_wal on. Then:

- floor: the pg_basebackup above, twice, the best counting;
- ours: a full base backup into a `file://` store, twice, the best counting; once into S3
  (a moto server in its own process) unless `--no-s3`;
- incremental: that full backup verified, then 5% of the prediction rows (the newest ones, as
  a day of scoring changes them) updated, then `kind="auto"` (an incremental on the full
  one): its time and stored size against the full one's.

Targets: ours into the local store <= 1.3x the floor; the incremental <= 0.2x the full one
(time; its size is reported). Results: benchmarks/results/pitr_base.json (or --results).

What the figures say (1 GiB, 2 cores, load ~1.5): the floor does no work (the server's file
reads into /dev/null, 0.6 s, plus the one second pg_backup_stop polls for the archiver to take
the last segment: PostgreSQL's own wait, paid by every backup with -X none); ours adds zstd's
pass over every byte on the same two cores (1.7x; the level hardly matters: -1 was 2.2x of
a noisier floor for 55% more bytes) and the store's write. An incremental stores 0.076x of a
full one but takes 0.5x its time: the checkpoint and that one-second wait are most of it.
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

from benchmarks.platform_data import AWS, BUCKET
from benchmarks.report import add_results_option, print_rows, r, row, write_results

FLOOR_TARGET = 1.3
INCREMENTAL_TARGET = 0.2
CHANGED_FRACTION = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pitr_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--quick", action="store_true", help="a 256 MiB database (unless --size-mb is given)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) run")
    parser.add_argument("--level", type=int, default=None, help="zstd level (default: the library's)")
    parser.add_argument("--threads", type=int, default=None, help="zstd worker threads (default: the library's)")
    add_results_option(parser, "pitr_base")
    args = parser.parse_args()
    if args.quick and "--size-mb" not in sys.argv:
        args.size_mb = 256
    return args


def turn_on_archiving(server, url) -> object:
    """ALTER SYSTEM for archiving and WAL summaries, then a restart (archive_mode needs one)."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for

    with engine_for(url).connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for name, value in (("wal_level", "replica"), ("archive_mode", "on"), ("archive_command", "true"),
                            ("summarize_wal", "on")):
            conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
    from maestro_pipelines.platform_db.connection import dispose_engines

    dispose_engines()
    server.stop()
    return server.start()


def floor_seconds(url) -> float:
    from maestro_pipelines.backup.pgtools import libpq_environment, program

    started = time.perf_counter()
    subprocess.run([program("pg_basebackup"), "-Ft", "-X", "none", "-D", "-", "--checkpoint=fast", "--no-password"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=libpq_environment(url))
    return time.perf_counter() - started


COMPRESSION: dict = {}
"""--level / --threads given: passed to take_base_backup."""


def ours(store, url, kind: str) -> dict:
    from maestro_pipelines.backup.pitr.base import take_base_backup
    from maestro_pipelines.backup.types import DatabaseTarget

    started = time.perf_counter()
    record = take_base_backup(store, DatabaseTarget("platform", url), kind=kind, **COMPRESSION)
    return {"wall_s": time.perf_counter() - started, "kind": record.kind, "base_id": record.base_id,
            "tar_bytes": record.tar_bytes, "stored_bytes": record.compressed_bytes}


def change_rows(url) -> int:
    """Update the newest 5% of the predictions (by id): a day of scoring corrects recent rows."""
    from sqlalchemy import text

    from maestro_pipelines.platform_db.connection import engine_for

    with engine_for(url).begin() as conn:
        total = conn.execute(text("SELECT count(*) FROM predictions")).scalar_one()
        changed = conn.execute(text(
            "UPDATE predictions SET features_hash = md5(features_hash) "
            "WHERE id > (SELECT max(id) FROM predictions) - :n"), {"n": int(total * CHANGED_FRACTION)}).rowcount
    return changed


def measure(args, say) -> dict:
    from benchmarks.platform_data import moto_bucket, prepare_platform_database
    from maestro_pipelines.backup.pitr.base import verify_base_backup
    from maestro_pipelines.storage import open_store

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-pitr-"))
    os.chmod(workdir, 0o755)
    server = None
    try:
        server, url, generation = prepare_platform_database(workdir / "home", args.size_mb, reuse=False, say=say)
        server_url = turn_on_archiving(server, url)
        url = server_url.set(database="maestro")
        say("floor: pg_basebackup -Ft -X none -D - > /dev/null, twice ...")
        floors = [floor_seconds(url) for _ in range(2)]
        store = open_store((workdir / "store").as_uri(), create=True)
        say("ours: a full base backup into the local store, twice ...")
        fulls = [ours(store, url, "full") for _ in range(2)]
        s3 = None
        if not args.no_s3:
            with moto_bucket(workdir) as (endpoint, _pid):
                say("ours: a full base backup into S3 (moto) ...")
                s3 = ours(open_store(f"s3://{BUCKET}/pitr", endpoint_url=endpoint, **AWS), url, "full")
        best = min(fulls, key=lambda f: f["wall_s"])
        say("verifying the full one, changing 5% of the rows, then an incremental ...")
        verify_base_backup(store, fulls[-1]["base_id"])
        changed = change_rows(url)
        incremental = ours(store, url, "auto")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"generation": {k: generation[k] for k in ("database_mib", "seconds")}, "floors_s": [r(f) for f in floors],
            "fulls": fulls, "s3": s3, "best_full": best, "rows_changed": changed, "incremental": incremental}


def result_rows(m: dict) -> list[dict]:
    floor, full, inc = min(m["floors_s"]), m["best_full"], m["incremental"]
    local_ratio = full["wall_s"] / floor
    inc_ratio = inc["wall_s"] / full["wall_s"]
    rows = [row("base backup into the local store vs pg_basebackup -Ft -X none > /dev/null (s)", r(full["wall_s"]),
                r(floor), r(local_ratio), FLOOR_TARGET, local_ratio <= FLOOR_TARGET)]
    if m["s3"]:
        rows.append(row("base backup into S3 (moto) vs the same floor (s)", r(m["s3"]["wall_s"]), r(floor),
                        r(m["s3"]["wall_s"] / floor), None, None))
    rows.append(row(f"incremental after {CHANGED_FRACTION:.0%} of rows changed vs a full one (s)", r(inc["wall_s"]),
                    r(full["wall_s"]), r(inc_ratio), INCREMENTAL_TARGET,
                    inc["kind"] == "incremental" and inc_ratio <= INCREMENTAL_TARGET))
    rows.append(row("incremental vs full, stored bytes", inc["stored_bytes"], full["stored_bytes"],
                    r(inc["stored_bytes"] / full["stored_bytes"], 3), None, None))
    return rows


def main() -> int:
    args = parse_args()
    if args.level is not None:
        COMPRESSION["compression_level"] = args.level
    if args.threads is not None:
        COMPRESSION["compression_threads"] = args.threads
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"size_mib": args.size_mb, "compression": COMPRESSION or "library default",
                     "loadavg_start": os.getloadavg()}
    measured = measure(args, say)
    results.update(measured)
    results["rows"] = rows = result_rows(measured)
    results["loadavg_end"] = os.getloadavg()
    write_results(args.results, results)
    print(f"database {measured['generation']['database_mib']} MiB; full base backup "
          f"{measured['best_full']['tar_bytes'] / 2**20:.0f} MiB tar, {measured['best_full']['stored_bytes'] / 2**20:.0f} "
          f"MiB stored; {measured['rows_changed']:,} rows changed")
    print_rows(rows)
    return 0 if all(x["pass"] is not False for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
