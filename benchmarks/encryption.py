"""Encrypted vs unencrypted backups into the local store, in the same run.

    python -m benchmarks.encryption [--size-mb 1024] [--repeat 3] [--no-base] [--results PATH]

One run, sequential (2 cores): the backup benchmark's platform database
(`benchmarks.platform_data`, `--size-mb` MiB) on an embedded PostgreSQL 18 in a temporary
MAESTRO_HOME. Then `create_backup` (pg_dump -> zstd -> store, the nightly backup's path) into a
`file://` store, without a key and with MAESTRO_BACKUP_KEY's kind of key (a local KEK; every
dump sealed in 1 MiB AES-256-GCM chunks after compression): one warm-up, then `--repeat`
pairs back to back, the order swapped every pair. The figure judged is the median of the
pairs' ratios: on 2 cores a single backup's time varies by 20-40% (pg_dump, the server and zstd
share them), and a pair sees the same minute of the machine; the fastest against the fastest
and the CPU time of our own process (where sealing's cost shows without the others' noise) are
reported beside it. Unless `--no-base`, the same for a full base backup (archiving on, `archive_command
= 'true'`: the WAL is not what is measured).

Targets (issue 17): encrypted <= 1.1x the unencrypted time, stored size within 1% (encryption
after compression adds 16 bytes per MiB and a 60-byte header). Results:
benchmarks/results/encryption.json (or --results).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results

TIME_TARGET = 1.10
SIZE_TARGET = 1.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encryption", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-base", action="store_true", help="skip the base backup pair")
    add_results_option(parser, "encryption")
    return parser.parse_args()


def keyring():
    from maestro_pipelines.crypto import generate_key, keyring_from_values

    return keyring_from_values(generate_key(), None, None, None)


def one_dump(store, url) -> dict:
    from maestro_pipelines.backup import BackupOptions, DatabaseTarget, create_backup

    started = time.perf_counter()
    manifest = create_backup(store, [DatabaseTarget("platform", url)], BackupOptions(artifact_prefix=None))
    return {"wall_s": time.perf_counter() - started, "stored_bytes": manifest.compressed_bytes,
            "dump_bytes": manifest.dump_bytes}


def one_base(store, url) -> dict:
    from maestro_pipelines.backup.pitr.base import take_base_backup
    from maestro_pipelines.backup.types import DatabaseTarget

    started = time.perf_counter()
    record = take_base_backup(store, DatabaseTarget("platform", url), kind="full")
    return {"wall_s": time.perf_counter() - started, "stored_bytes": record.compressed_bytes}


def timed(run, store, url) -> dict:
    """One backup: wall time, and this process's CPU time (zstd, sealing, hashing: what the
    key adds shows there without the other processes' noise)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = run(store, url)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def alternate(run, plain_store, sealed_store, url, repeat: int, say, what: str) -> dict:
    """One unmeasured warm-up, then `repeat` pairs back to back, the order swapped every pair
    (the first of a pair finds colder caches); a pair's ratio compares like with like."""
    run(plain_store, url)
    plain, sealed = [], []
    for n in range(repeat):
        say(f"{what} {n + 1}/{repeat} ...")
        order = ((plain_store, plain), (sealed_store, sealed)) if n % 2 == 0 else ((sealed_store, sealed), (plain_store, plain))
        for store, results in order:
            results.append(timed(run, store, url))
    ratios = sorted(s["wall_s"] / p["wall_s"] for p, s in zip(plain, sealed))
    return {"plain": plain, "sealed": sealed, "pair_ratios": ratios, "median_ratio": statistics.median(ratios),
            "best_plain": min(plain, key=lambda x: x["wall_s"]), "best_sealed": min(sealed, key=lambda x: x["wall_s"])}


def measure(args, say) -> dict:
    from benchmarks.pitr_base import turn_on_archiving
    from benchmarks.platform_data import prepare_platform_database
    from maestro_pipelines.storage import open_store

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-encryption-"))
    os.chmod(workdir, 0o755)
    server = None
    try:
        server, url, generation = prepare_platform_database(workdir / "home", args.size_mb, reuse=False, say=say)
        plain = open_store((workdir / "plain").as_uri(), create=True)
        sealed = open_store((workdir / "sealed").as_uri(), create=True)
        sealed.keyring = keyring()
        dumps = alternate(one_dump, plain, sealed, url, args.repeat, say, "logical backup")
        bases = None
        if not args.no_base:
            url = turn_on_archiving(server, url).set(database="maestro")
            bases = alternate(one_base, plain, sealed, url, max(2, args.repeat - 1), say, "base backup")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"generation": {k: generation[k] for k in ("database_mib", "seconds")}, "dumps": dumps, "bases": bases}


def result_rows(m: dict) -> list[dict]:
    rows = []
    for name, pair in (("logical backup (pg_dump, zstd)", m["dumps"]), ("base backup (pg_basebackup, zstd)", m["bases"])):
        if pair is None:
            continue
        plain, sealed = pair["best_plain"], pair["best_sealed"]
        judged = name.startswith("logical")  # the target is on the logical backup
        median = pair["median_ratio"]
        rows.append(row(f"{name}: encrypted vs unencrypted into the local store, median of back-to-back pairs (s)",
                        r(sealed["wall_s"]), r(plain["wall_s"]), r(median), TIME_TARGET if judged else None,
                        median <= TIME_TARGET if judged else None))
        rows.append(row(f"{name}: the same, fastest vs fastest (s)", r(sealed["wall_s"]), r(plain["wall_s"]),
                        r(sealed["wall_s"] / plain["wall_s"]), None, None))
        cpu_plain = statistics.median(x["cpu_s"] for x in pair["plain"])
        cpu_sealed = statistics.median(x["cpu_s"] for x in pair["sealed"])
        rows.append(row(f"{name}: CPU of our process, median (s)", r(cpu_sealed), r(cpu_plain),
                        r(cpu_sealed / cpu_plain), None, None))
        size_ratio = sealed["stored_bytes"] / plain["stored_bytes"]
        rows.append(row(f"{name}: encrypted vs unencrypted, stored bytes", sealed["stored_bytes"], plain["stored_bytes"],
                        r(size_ratio, 4), SIZE_TARGET if judged else None, size_ratio <= SIZE_TARGET if judged else None))
    return rows


def main() -> int:
    args = parse_args()
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"size_mib": args.size_mb, "repeat": args.repeat, "loadavg_start": os.getloadavg()}
    measured = measure(args, say)
    results.update(measured)
    results["rows"] = rows = result_rows(measured)
    results["loadavg_end"] = os.getloadavg()
    write_results(args.results, results)
    dumps = measured["dumps"]["best_plain"]
    print(f"database {measured['generation']['database_mib']} MiB; dump {dumps['dump_bytes'] / 2**20:.0f} MiB, "
          f"stored {dumps['stored_bytes'] / 2**20:.0f} MiB")
    print_rows(rows)
    return 0 if all(x["pass"] is not False for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
