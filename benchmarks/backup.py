"""Backing up the platform database: our `create_backup` vs. the original shell script
(`pg_dump -Fc --compress=9` to a file, then upload it) and vs. the dump floor.

    python -m benchmarks.backup [--size-mb 1024] [--explore] [--repeat 2] [--level L] [--threads T]
                                [--no-checksums] [--home DIR] [--results PATH]

One run, everything sequential (the machine has 2 cores): a platform database of
`--size-mb` MiB is generated (`benchmarks.platform_data`) on an embedded PostgreSQL 18 in a
temporary MAESTRO_HOME and a moto S3 server is started in its own process. Then:

- floor: `pg_dump -Fc -Z0 > /dev/null`, twice (the best counts): nothing faster can dump;
  ours and each explore candidate run `--repeat` times too, the fastest counting (the
  others are recorded): on 2 cores a single run is noisy;
- original: `pg_dump -Fc --compress=9 -f FILE`, then the file copied into a folder (the local
  store) and, separately, `upload_file` to S3 (what `aws s3 cp` does);
- ours: `create_backup` into a `file://` store, then into an `s3://` store on moto, each in a
  fresh child process whose peak RSS is "our process" (pg_dump is a process of its own,
  sampled apart; peaks are VmHWM, see `peak_rss_mb`). `--level/--threads/--no-checksums` override the library's defaults;
- what each check costs: ours into the local store again with one check off, in the child
  only (`CHECKS`, `switch_off`: the library keeps every check): the sha256 of the stored
  object, zstd's frame checksums, the tables' content checksums, and the whole counting
  query; the cost is ours minus that run (`verify_backup`'s re-read and `pg_restore --list`
  run after a backup, not in it, and are not timed here);
- what bounds each run (`benchmarks.cpu_time`): the CPU seconds of every party over it (our
  process; pg_dump; the server: every backend, io worker and background process) against
  2 cores x its wall time, the disk's write + fsync throughput, and our process's wait in
  fsync; then the shortest wall time our run's CPU seconds allow on these cores against the
  target, so a target out of reach is shown to be so, measured;
- `--explore`: raw pipelines without our library, to choose format and compression:
  `pg_dump -Fc -Z0` piped into Python `zstandard` (levels, threads), and `pg_dump -Fd -j2 -Z0`
  into a folder then tar-packed through zstd; each writes its output to a file and fsyncs
  it (as the local store does), each in a child process (its RSS is the Python side's).

Targets: ours at least 4x faster than the original method, within 1.25x of the floor into
the local store, no more than 1.1x the size of the gzip-9 file, our peak RSS under 300 MB.
Results go to benchmarks/results/backup.json (or `--results PATH`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parent.parent
from benchmarks.platform_data import AWS, BUCKET
from benchmarks.cpu_time import cpu_row, reach_row
from benchmarks.report import add_results_option, print_rows, print_table, r, row, write_results

MiB = 1024 * 1024
MB = 1_000_000
SPEEDUP_TARGET = 4.0        # ours vs. the original method (dump gzip-9, then upload)
FLOOR_TARGET = 1.25         # ours into the local store vs. pg_dump -Fc -Z0 > /dev/null
SIZE_TARGET = 1.10          # ours vs. the gzip-9 file
RSS_TARGET_MB = 300

# --explore: (name, spec). Levels -3..3 with 0 (in the caller's thread), 1 (one worker:
# reading and compressing overlap) or 2 worker threads, one level-6 point, one read_to_iter.
EXPLORE = [
    ("pg_dump -Fc --compress=1 -f FILE (gzip-1)", {"kind": "gzip", "level": 1}),
    *[(f"-Fc -Z0 => zstd L{level} T{threads} (stream_writer)",
       {"kind": "zstd", "level": level, "threads": threads, "api": "stream_writer"})
      for level in (-3, -1, 1, 3) for threads in (0, 2)],
    ("-Fc -Z0 => zstd L1 T1 (stream_writer)", {"kind": "zstd", "level": 1, "threads": 1, "api": "stream_writer"}),
    ("-Fc -Z0 => zstd L3 T1 (stream_writer)", {"kind": "zstd", "level": 3, "threads": 1, "api": "stream_writer"}),
    ("-Fc -Z0 => zstd L6 T2 (stream_writer)", {"kind": "zstd", "level": 6, "threads": 2, "api": "stream_writer"}),
    ("-Fc -Z0 => zstd L3 T2 (read_to_iter)", {"kind": "zstd", "level": 3, "threads": 2, "api": "read_to_iter"}),
    ("-Fd -j2 -Z0 to a folder, then tar => zstd L1 T2", {"kind": "dir-tar", "level": 1, "threads": 2}),
    ("-Fd -j2 -Z0 to a folder, then tar => zstd L3 T2", {"kind": "dir-tar", "level": 3, "threads": 2}),
]


# ---------------------------------------------------------------- helpers shared with children

def pg_program(name: str) -> str:
    from maestro_pipelines.platform_db.embedded import bin_dir

    return str(Path(bin_dir()) / name)


def pg_environment(db_url: str) -> tuple[dict[str, str], str]:
    """libpq environment and database name for the pg_* programs, from a SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    host = url.query.get("host") or url.host
    if host:
        env["PGHOST"] = host
    if url.port:
        env["PGPORT"] = str(url.port)
    env["PGUSER"] = url.username or "postgres"
    if url.password:
        env["PGPASSWORD"] = url.password
    return env, url.database


def peak_rss_mb() -> float:
    """This process's peak RSS (MB): VmHWM. Not `ru_maxrss`, which a child started with
    vfork (Python's subprocess does) inherits from its parent at exec: every child would
    report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class ChildrenPeak:
    """Samples the peak RSS (VmHWM, monotonic) of this process's child processes (pg_dump)
    every 50 ms until stopped: their `ru_maxrss` would include ours (see peak_rss_mb)."""

    def __init__(self):
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> set[int]:
        pids = set()
        for task in Path("/proc/self/task").iterdir():
            try:
                pids.update(int(p) for p in (task / "children").read_text().split())
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self._children():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except OSError:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_child(args: list[str], timeout: float = 3600) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.backup", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- children

# Each check that makes a backup trustworthy, switched off in the benchmark's child only (the
# library has no such switch, except content checksums): what it costs is ours with it minus
# ours without it. Row counts stay with --without content-checksums (BackupOptions' own
# switch); `table-checks` drops the whole counting query.
CHECKS = {
    "sha256": "the sha256 of the stored object (the local store's hashing)",
    "zstd-checksum": "zstd's frame checksum (write_checksum)",
    "content-checksums": "content checksums of every table (row counts kept)",
    "table-checks": "row counts and content checksums (no query beside the dump)",
}


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def switch_off(check: str) -> dict:
    """Benchmark only: `check` disabled in this child process by patching the library."""
    import types

    import zstandard

    import maestro_pipelines.backup.create as create
    import maestro_pipelines.storage.local as local

    if check == "sha256":
        local.hashlib = types.SimpleNamespace(sha256=_NoHash)
    elif check == "zstd-checksum":
        compressor = zstandard.ZstdCompressor
        zstandard.ZstdCompressor = lambda **kw: compressor(**{**kw, "write_checksum": False})
    elif check == "content-checksums":
        return {"content_checksums": False}
    elif check == "table-checks":
        create.table_checks = lambda connection, checksums=True: []
    else:
        raise ValueError(check)
    return {}


def timing_fsync() -> list[float]:
    """os.fsync wrapped to add up the seconds it waits (the local store's durability)."""
    waited = [0.0]
    fsync = os.fsync

    def timed(fd):
        started = time.perf_counter()
        try:
            return fsync(fd)
        finally:
            waited[0] += time.perf_counter() - started

    os.fsync = timed
    return waited


def child_ours(db_url: str, store_url: str, endpoint: str | None, level, threads, checksums,
               pgdata: str | None = None, without: str | None = None) -> dict:
    """Our backup in this fresh process: its ru_maxrss is "our process"; the CPU seconds of
    each party (this process, pg_dump, the server) over it."""
    from sqlalchemy.engine import make_url

    from benchmarks.cpu_time import Parties, ServerCPU
    from maestro_pipelines.backup import BackupOptions, DatabaseTarget, create_backup
    from maestro_pipelines.storage import open_store

    if store_url.startswith("s3://"):
        store = open_store(store_url, endpoint_url=endpoint, **AWS)
    else:
        store = open_store(store_url, create=True)
    options = {"compression_level": level, "compression_threads": threads, "content_checksums": checksums}
    options.update(switch_off(without) if without else {})
    options = BackupOptions(**{k: v for k, v in options.items() if v is not None})
    fsync_waited = timing_fsync()
    rss_before = peak_rss_mb()
    with ChildrenPeak() as children, Parties(ServerCPU(Path(pgdata)) if pgdata else None) as parties:
        started = time.perf_counter()
        manifest = create_backup(store, [DatabaseTarget(role="platform", url=make_url(db_url))], options, progress=None)
        wall = time.perf_counter() - started
    dump = manifest.databases[0]
    return {
        "wall_s": wall, "duration_s": manifest.duration_s, "backup_id": manifest.backup_id,
        "dump_bytes": dump.dump_bytes, "compressed_bytes": dump.compressed_bytes,
        "options": {k: getattr(options, k, None) for k in ("compression_level", "compression_threads", "content_checksums")},
        "without": without,
        "rss_before_mb": rss_before, "rss_peak_mb": peak_rss_mb(),
        "pg_dump_rss_mb": children.peak_mb, "fsync_s": fsync_waited[0], "cpu": parties.figures(),
    }


def _explore_gzip(pg_dump: str, env: dict, database: str, out: Path, spec: dict, phases: dict) -> int | None:
    subprocess.run([pg_dump, "-Fc", f"--compress={spec['level']}", "-f", str(out), "-d", database],
                   env=env, check=True)
    return None


def _explore_zstd(pg_dump: str, env: dict, database: str, out: Path, spec: dict, phases: dict) -> int:
    """pg_dump -Z0 piped into Python zstandard (stream_writer or read_to_iter), then fsync."""
    import zstandard

    started = time.perf_counter()
    cctx = zstandard.ZstdCompressor(level=spec["level"], threads=spec["threads"])
    proc = subprocess.Popen([pg_dump, "-Fc", "-Z0", "-d", database], env=env, stdout=subprocess.PIPE, bufsize=0)
    dump_bytes = 0
    with out.open("wb") as f:
        if spec["api"] == "stream_writer":
            with cctx.stream_writer(f, closefd=False, write_size=MiB) as writer:
                while chunk := proc.stdout.read(MiB):
                    dump_bytes += len(chunk)
                    writer.write(chunk)
        else:
            class Counting:
                def read(self, n):
                    nonlocal dump_bytes
                    chunk = proc.stdout.read(n)
                    dump_bytes += len(chunk)
                    return chunk

            for piece in cctx.read_to_iter(Counting(), read_size=MiB, write_size=MiB):
                f.write(piece)
        phases["dump+compress_s"] = time.perf_counter() - started
        synced = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
        phases["fsync_s"] = time.perf_counter() - synced
    if proc.wait() != 0:
        raise RuntimeError(f"pg_dump exited with {proc.returncode}")
    return dump_bytes


def _explore_dir_tar(pg_dump: str, env: dict, database: str, out: Path, spec: dict, phases: dict) -> int:
    """pg_dump -Fd -j2 into a folder, then tar | zstd it into one file."""
    import tarfile

    import zstandard

    started = time.perf_counter()
    folder = out.parent / "dump.d"
    subprocess.run([pg_dump, "-Fd", "-j2", "-Z0", "-f", str(folder), "-d", database], env=env, check=True)
    phases["dump_s"] = time.perf_counter() - started
    packing = time.perf_counter()
    dump_bytes = sum(p.stat().st_size for p in folder.iterdir())
    cctx = zstandard.ZstdCompressor(level=spec["level"], threads=spec["threads"])
    with out.open("wb") as f:
        with cctx.stream_writer(f, closefd=False, write_size=MiB) as writer:
            with tarfile.open(fileobj=writer, mode="w|", bufsize=MiB) as tar:
                tar.add(folder, arcname="dump.d")
        f.flush()
        os.fsync(f.fileno())
    phases["tar+compress+fsync_s"] = time.perf_counter() - packing
    shutil.rmtree(folder)
    return dump_bytes


_EXPLORE_KINDS = {"gzip": _explore_gzip, "zstd": _explore_zstd, "dir-tar": _explore_dir_tar}


def child_explore(db_url: str, spec: dict, scratch: str) -> dict:
    """One raw pipeline (no Maestro code): time, bytes in and out, this process's RSS."""
    env, database = pg_environment(db_url)
    out = Path(scratch) / "backup.out"
    phases: dict[str, float] = {}
    if spec["kind"] not in _EXPLORE_KINDS:
        raise ValueError(spec)
    children = ChildrenPeak().__enter__()
    started = time.perf_counter()
    dump_bytes = _EXPLORE_KINDS[spec["kind"]](pg_program("pg_dump"), env, database, out, spec, phases)
    seconds = time.perf_counter() - started
    children.__exit__()
    size = out.stat().st_size
    out.unlink()
    return {"seconds": seconds, "dump_bytes": dump_bytes, "compressed_bytes": size, "phases": phases,
            "rss_mb": peak_rss_mb(), "pg_dump_rss_mb": children.peak_mb}


# ---------------------------------------------------------------- measured in the main process

def dump_floor(env: dict, database: str, server) -> dict:
    """pg_dump -Fc -Z0 > /dev/null: its wall time and the CPU seconds of pg_dump and of the
    server over it (what the floor is bound by)."""
    from benchmarks.cpu_time import Parties

    with Parties(server) as parties:
        subprocess.run([pg_program("pg_dump"), "-Fc", "-Z0", "-d", database], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return parties.figures()


def original_method(env: dict, database: str, scratch: Path, endpoint: str) -> dict:
    """The shell script: pg_dump gzip-9 to a file, then upload the file."""
    import boto3

    dump_file = scratch / "platform.dump"
    started = time.perf_counter()
    subprocess.run([pg_program("pg_dump"), "-Fc", "--compress=9", "-f", str(dump_file), "-d", database],
                   env=env, check=True)
    dump_s = time.perf_counter() - started

    folder = scratch / "local-store"
    folder.mkdir()
    started = time.perf_counter()
    shutil.copyfile(dump_file, folder / dump_file.name)  # cp FILE /backups/
    copy_s = time.perf_counter() - started

    client = boto3.client("s3", endpoint_url=endpoint, **AWS)
    started = time.perf_counter()
    client.upload_file(str(dump_file), BUCKET, "original/platform.dump")  # aws s3 cp FILE s3://...
    upload_s = time.perf_counter() - started
    size = dump_file.stat().st_size
    client.delete_object(Bucket=BUCKET, Key="original/platform.dump")
    dump_file.unlink()
    shutil.rmtree(folder)
    return {"dump_s": dump_s, "copy_s": copy_s, "upload_s": upload_s, "bytes": size,
            "local_s": dump_s + copy_s, "s3_s": dump_s + upload_s}


def best_of(times: int, child_args: list[str], key: str) -> dict:
    """Run a child `times` times: the fastest run, with every run's time and the highest RSS."""
    runs = [run_child(child_args) for _ in range(times)]
    best = dict(min(runs, key=lambda run: run[key]))
    best["runs_s"] = [round(run[key], 2) for run in runs]
    for name in ("rss_mb", "rss_peak_mb", "pg_dump_rss_mb"):
        if name in best:
            best[name] = max(run[name] for run in runs)
    return best


def library_available() -> str | None:
    """None when `create_backup` imports, else the error (checked in a child: main stays clean)."""
    done = subprocess.run(
        [sys.executable, "-c", "from maestro_pipelines.backup import create_backup, BackupOptions, DatabaseTarget"],
        capture_output=True, text=True, cwd=REPO,
    )
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB of platform database (default 1024)")
    parser.add_argument("--explore", action="store_true", help="also time raw pg_dump | zstd pipelines and -Fd + tar")
    parser.add_argument("--level", type=int, help="our compression level (default: the library's)")
    parser.add_argument("--threads", type=int, help="our compression threads (default: the library's)")
    parser.add_argument("--no-checksums", action="store_true", help="content_checksums=False for ours")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of ours and of each explore candidate; the fastest counts (default 2)")
    parser.add_argument("--home", type=Path,
                        help="MAESTRO_HOME to use and keep; its database is generated once and reused after")
    add_results_option(parser, "backup")
    parser.add_argument("--child", choices=["ours", "explore"], help=argparse.SUPPRESS)
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--pgdata", help=argparse.SUPPRESS)
    parser.add_argument("--without", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    return parser.parse_args()


def run_as_child(args: argparse.Namespace) -> None:
    """`--child`: one measured run in this process, its figures printed as JSON."""
    if args.child == "ours":
        checksums = False if args.no_checksums else None
        print(json.dumps(child_ours(args.db_url, args.store_url, args.endpoint, args.level, args.threads, checksums,
                                    args.pgdata, args.without)))
    else:
        print(json.dumps(child_explore(args.db_url, json.loads(args.spec), args.scratch)))


def measure_ours(args: argparse.Namespace, db: str, endpoint: str, workdir: Path, pgdata: Path, say) -> dict[str, dict]:
    """Our backup into the local store and S3, then locally with each check of CHECKS off
    (benchmark only), best of --repeat each."""
    common = ["--db-url", db, "--endpoint", endpoint, "--pgdata", str(pgdata)]
    common += ["--level", str(args.level)] if args.level is not None else []
    common += ["--threads", str(args.threads)] if args.threads is not None else []
    common += ["--no-checksums"] if args.no_checksums else []
    local_store = ["--store-url", (workdir / "store").as_uri()]
    runs = [("local", local_store), ("s3", ["--store-url", f"s3://{BUCKET}/backups"])]
    if not args.no_checksums:
        runs += [(f"local without {check}", [*local_store, "--without", check]) for check in CHECKS]
    ours: dict[str, dict] = {}
    for name, where in runs:
        say(f"ours, {name}, {args.repeat} time(s) ...")
        ours[name] = best_of(args.repeat, ["--child", "ours", *where, *common], "wall_s")
        shutil.rmtree(workdir / "store", ignore_errors=True)
    return ours


def measure_explore(args: argparse.Namespace, db: str, workdir: Path, say) -> list[dict]:
    """Each raw pipeline of EXPLORE, best of --repeat."""
    scratch = workdir / "explore"
    scratch.mkdir()
    explore = []
    for name, spec in EXPLORE:
        say(f"explore: {name} ...")
        result = best_of(args.repeat, ["--child", "explore", "--db-url", db, "--spec", json.dumps(spec),
                                       "--scratch", str(scratch)], "seconds")
        explore.append({"candidate": name, "spec": spec, **result})
    return explore


def measure(args: argparse.Namespace, results: dict, say) -> dict:
    """Generate (or reuse) the database and time the floor, the original method, ours and the
    explore candidates; records the database and moto figures in `results`."""
    from benchmarks.platform_data import moto_bucket, prepare_platform_database

    workdir = Path(tempfile.mkdtemp(prefix="maestro-bench-backup-"))
    home = args.home or workdir / "home"
    server = None
    try:
        server, db_url, generation = prepare_platform_database(home, args.size_mb, reuse=bool(args.home), say=say)
        results["database"] = {k: generation[k] for k in ("database_mib", "seconds", "steps_s", "rows")}
        db = db_url.render_as_string(hide_password=False)
        env, database = pg_environment(db)

        from benchmarks.cpu_time import ServerCPU, disk_write_throughput

        say("dump floor (pg_dump -Fc -Z0 > /dev/null), twice ...")
        floor_runs = [dump_floor(env, database, ServerCPU(server.pgdata)) for _ in range(2)]
        floors = [run["wall_s"] for run in floor_runs]
        results["floor_cpu"] = min(floor_runs, key=lambda run: run["wall_s"])
        results["disk_write_MBps"] = disk_write_throughput(workdir)
        missing = library_available()

        with moto_bucket(workdir) as (endpoint, moto_pid):
            results["moto_pid"] = moto_pid

            say("original method (pg_dump -Fc --compress=9 -f FILE, then copy / upload_file) ...")
            original = original_method(env, database, workdir, endpoint)
            if missing:
                say(f"ours: skipped, the library does not import yet ({missing})")
            ours = {} if missing else measure_ours(args, db, endpoint, workdir, server.pgdata, say)

        explore = measure_explore(args, db, workdir, say) if args.explore else []
    finally:
        if server is not None and args.home is None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"generation": generation, "floors": floors, "floor": min(floors), "missing": missing,
            "floor_cpu": results["floor_cpu"], "disk_write_MBps": results["disk_write_MBps"],
            "original": original, "ours": ours, "explore": explore}


def ours_rows(ours: dict, original: dict, floor: float) -> tuple[list[dict], list[bool]]:
    """The checked rows for our backup (and whether each passed), then the reported ones."""
    local, s3, gz9 = ours["local"], ours["s3"], original["bytes"]
    checks = [
        row("backup into the local store (s): ours vs original", r(local["wall_s"]), r(original["local_s"]),
            r(original["local_s"] / local["wall_s"]), f"original/ours >= {SPEEDUP_TARGET:g}",
            original["local_s"] / local["wall_s"] >= SPEEDUP_TARGET),
        row("backup into S3/moto (s): ours vs original", r(s3["wall_s"]), r(original["s3_s"]),
            r(original["s3_s"] / s3["wall_s"]), f"original/ours >= {SPEEDUP_TARGET:g}",
            original["s3_s"] / s3["wall_s"] >= SPEEDUP_TARGET),
        row("ours into the local store vs the dump floor (s)", r(local["wall_s"]), r(floor),
            r(local["wall_s"] / floor), f"ours/floor <= {FLOOR_TARGET:g}", local["wall_s"] / floor <= FLOOR_TARGET),
        row("ours into S3/moto vs the dump floor (s)", r(s3["wall_s"]), r(floor), r(s3["wall_s"] / floor),
            "reported", None),
        row("backup size (MB): ours vs the gzip-9 file", r(local["compressed_bytes"] / MB, 1), r(gz9 / MB, 1),
            r(local["compressed_bytes"] / gz9), f"ours/gzip-9 <= {SIZE_TARGET:g}",
            local["compressed_bytes"] / gz9 <= SIZE_TARGET),
        row("peak RSS of our process, local store (MB)", r(local["rss_peak_mb"], 1), None, None,
            f"< {RSS_TARGET_MB} MB", local["rss_peak_mb"] < RSS_TARGET_MB),
        row("peak RSS of our process, S3 (MB)", r(s3["rss_peak_mb"], 1), None, None,
            f"< {RSS_TARGET_MB} MB", s3["rss_peak_mb"] < RSS_TARGET_MB),
    ]
    reported = [
        *check_cost_rows(ours, floor),
        cpu_row("ours, local store", local["cpu"], "pg_dump"),
        reach_row("ours, local store", local["cpu"], floor, FLOOR_TARGET),
        *([reach_row("ours without content checksums", ours["local without content-checksums"]["cpu"], floor,
                     FLOOR_TARGET)] if "local without content-checksums" in ours else []),
        row("  ours, local store: waiting in fsync (s)", r(local["fsync_s"]), None, None, "reported", None),
        cpu_row("ours, S3/moto (moto's CPU not counted)", s3["cpu"], "pg_dump"),
        row("  our RSS after imports, before the backup (MB)", r(local["rss_before_mb"], 1), None, None,
            "reported", None),
        row("  pg_dump's own peak RSS under ours (MB)", r(local["pg_dump_rss_mb"], 1), None, None, "reported", None),
        row("  ours, every run: local / S3 (s)", f"{local['runs_s']} / {s3['runs_s']}", None, None,
            "the fastest counts", None),
        row("  manifest duration_s, local / S3 (s)", f"{r(local['duration_s'])} / {r(s3['duration_s'])}", None,
            None, "reported", None),
        row("  uncompressed dump (MB)", r(local["dump_bytes"] / MB, 1), None, None,
            f"options {local['options']}", None),
    ]
    return checks + reported, [c["pass"] for c in checks if c["pass"] is not None]


def check_cost_rows(ours: dict, floor: float) -> list[dict]:
    """What each check costs: ours into the local store with it on (the product) minus the
    same with it off (this benchmark only), in seconds and in x floor."""
    local = ours["local"]["wall_s"]
    rows = []
    for check, what in CHECKS.items():
        without = ours.get(f"local without {check}")
        if without is None:
            continue
        cost = local - without["wall_s"]
        # CPU seconds tell a check's cost apart from a busy machine better than wall time does.
        cpu_cost = ours["local"]["cpu"]["parties_cpu_s"] - without["cpu"]["parties_cpu_s"]
        rows.append(row(f"  cost of {what}: ours with / without it, local store (s)", r(local), r(without["wall_s"]),
                        r(cost / floor), f"{cost:+.2f} s wall (ratio: x floor), {cpu_cost:+.2f} CPU s of every party",
                        None))
    return rows


def result_rows(measured: dict) -> tuple[list[dict], list[bool]]:
    """Every row of the main table, and the pass/fail of the checked ones."""
    generation, original, floor = measured["generation"], measured["original"], measured["floor"]
    rows = [
        row(f"generate the {generation['database_mib']} MiB database (s)", None, r(generation["seconds"], 1), None,
            "reported (well under 120 s)", generation["seconds"] < 120),
        row("dump floor: pg_dump -Fc -Z0 > /dev/null (s, best of 2)", None, r(floor), None, "reported", None),
        cpu_row("dump floor", measured["floor_cpu"], "pg_dump"),
        row("  disk: sequential write + fsync of 256 MB (MB/s)", r(measured["disk_write_MBps"], 0), None, None,
            "reported", None),
        row("original: pg_dump -Fc --compress=9 -f FILE (s)", None, r(original["dump_s"]), r(original["dump_s"] / floor),
            "reported (x floor)", None),
        row("original: copy the file into the local store (s)", None, r(original["copy_s"]), None, "reported", None),
        row("original: upload_file to S3/moto (s)", None, r(original["upload_s"]), None, "reported", None),
    ]
    if not measured["ours"]:
        return rows + [row(f"ours: not measured ({measured['missing']})", None, None, None, "all targets", None)], []
    checked, passes = ours_rows(measured["ours"], original, floor)
    return rows + checked, passes


def explore_rows(explore: list[dict], floor: float, original: dict) -> list[dict]:
    """The explore table: the floor, the original method, then each candidate against them."""
    gz9 = original["bytes"]
    rows = [
        {"candidate": "floor: pg_dump -Fc -Z0 > /dev/null", "s": r(floor), "x_floor": 1.0, "MB": None, "x_gzip9": None},
        {"candidate": "original: pg_dump -Fc --compress=9 -f FILE", "s": r(original["dump_s"]),
         "x_floor": r(original["dump_s"] / floor), "MB": r(gz9 / MB, 1), "x_gzip9": 1.0},
    ]
    for e in explore:
        rows.append({
            "candidate": e["candidate"], "s": r(e["seconds"]), "x_floor": r(e["seconds"] / floor),
            "MB": r(e["compressed_bytes"] / MB, 1), "x_gzip9": r(e["compressed_bytes"] / gz9),
            "dump_to_MB": r(e["dump_bytes"] / e["compressed_bytes"]) if e["dump_bytes"] else None,
            "runs_s": e["runs_s"], "rss_mb": r(e["rss_mb"], 1), "pg_dump_rss_mb": r(e["pg_dump_rss_mb"], 1), "phases": {k: r(v) for k, v in e["phases"].items()},
        })
    return rows


def print_report(results: dict, generation: dict, dump_bytes: int | None, rows: list[dict], explore: list[dict]) -> None:
    print(f"platform database: {generation['database_mib']} MiB, generated in {generation['seconds']} s; "
          f"uncompressed dump {r(dump_bytes / MB, 1) if dump_bytes else '?'} MB; floor runs {results['floor_s']} s; "
          f"load average at start {results['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}\n")
    print_rows(rows)
    if explore:
        print()
        print_table(["candidate", "time (s)", "x floor", "size (MB)", "x gzip-9", "dump/size", "python RSS (MB)",
                     "pg_dump RSS (MB)", "phases of the best (s)", "runs (s)"],
                    [[e["candidate"], e["s"], e["x_floor"], e["MB"], e["x_gzip9"], e.get("dump_to_MB"),
                      e.get("rss_mb"), e.get("pg_dump_rss_mb"), ", ".join(f"{k} {v}" for k, v in (e.get("phases") or {}).items()),
                      e.get("runs_s")]
                     for e in explore])


def main() -> int:
    args = parse_args()
    if args.child:
        run_as_child(args)
        return 0

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    # Other work on the machine skews every figure here: the load averages are recorded.
    results: dict = {"size_mib": args.size_mb, "loadavg_start": os.getloadavg()}
    measured = measure(args, results, say)
    ours, explore, original = measured["ours"], measured["explore"], measured["original"]

    dump_bytes = next((e["dump_bytes"] for e in explore if e["dump_bytes"]), None)
    if ours:
        dump_bytes = ours["local"]["dump_bytes"]
    results["floor_s"] = [r(f) for f in measured["floors"]]
    results["original"] = {k: r(v) for k, v in original.items()}
    results["ours"] = ours or None
    results["ours_missing"] = measured["missing"]
    rows, passes = result_rows(measured)
    results["rows"] = rows
    explored = explore_rows(explore, measured["floor"], original) if explore else []
    if explored:
        results["explore"] = explored
        results["dump_bytes"] = dump_bytes

    results["loadavg_end"] = os.getloadavg()
    write_results(args.results, results)
    print_report(results, measured["generation"], dump_bytes, rows, explored)
    if not ours:
        return 2  # the targets were not checked
    return 0 if all(passes) else 1


if __name__ == "__main__":
    sys.exit(main())
