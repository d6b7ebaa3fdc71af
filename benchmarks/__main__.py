"""Every benchmark in one run, and one report of their figures.

    .venv/bin/python -m benchmarks [--quick | --full] [--only name,name] [--list]

`--quick` (the default) runs every benchmark at sizes that fit 2 cores in under 15 minutes
in all; `--full` at the sizes of their issues (1 GiB streams and databases, 1M predictions).
Each benchmark runs as its own process (`python -m benchmarks.<name> <size options>`) with a
time budget: one that crashes or overruns is reported as a failed row and the others still
run. A progress line per benchmark goes to stderr, its whole output to
`benchmarks/results/logs/<name>.log`.

Where results go:

- every row of every benchmark (`{figure, ours, baseline, ratio, target, pass}`, see
  `benchmarks.report`) into `benchmarks/results/latest.json`, with the date, the mode, the
  machine (CPUs, load averages at start and end, Python) and each benchmark's arguments,
  wall time and exit status; the same rows as a markdown table in
  `benchmarks/results/latest.md`, which is also printed. Every run rewrites both, `--only`
  too (their first line then says which benchmarks ran);
- each benchmark's own results JSON: with `--quick` into `benchmarks/results/quick/` (not
  committed), so small runs never overwrite the full-size `benchmarks/results/<name>.json`
  that the docs quote; with `--full` into those files.

Exit status: 0 when every benchmark ran to the end and every figure with a target met it;
1 when a benchmark crashed, overran its budget or could not start (missing test
dependencies: `pip install -e '.[dev]'`), or a target was missed (its row says NO).

The README's table of the figures with a target (between its `benchmarks-table` markers) is
rewritten from the same report by every run, so it cannot drift from latest.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.report import HEADER, RESULTS_DIR, markdown_table, verdict

REPO = Path(__file__).parent.parent
QUICK_LIMIT_S = 15 * 60
README = REPO / "README.md"
README_START = "<!-- benchmarks-table:start (written by python -m benchmarks) -->"
README_END = "<!-- benchmarks-table:end -->"


@dataclass
class Benchmark:
    name: str
    what: str
    quick: list[str]
    full: list[str]
    budget_quick_s: int
    budget_full_s: int
    needs: list[str] = field(default_factory=list)  # modules from the `dev` extra

    def arguments(self, mode: str) -> list[str]:
        return self.quick if mode == "quick" else self.full

    def budget(self, mode: str) -> int:
        return self.budget_quick_s if mode == "quick" else self.budget_full_s


SERVERS = ["pytest", "boto3", "moto"]  # tests.services and the moto S3 server
BENCHMARKS = [
    Benchmark("import_time", "loading the code location vs import dagster",
              ["--rounds", "7"], ["--rounds", "9"], 120, 300),
    Benchmark("store_stream", "a stream to S3 (moto) vs boto3 upload_file/download_fileobj, peak RSS; GCS, Azure reported",
              ["--size-mb", "512"], ["--size-mb", "1024"], 300, 900, SERVERS),
    Benchmark("ml_graph", "the ML graph vs a plain script (demo tenants, a generated 100k x 30 one); our prediction COPY vs a raw binary COPY",
              ["--rows", "20000", "--predictions", "500000", "--rounds", "3"],
              ["--rows", "100000", "--features", "30", "--predictions", "1000000", "--rounds", "3"], 300, 900),
    Benchmark("cache", "batch predictions cold vs warm (in-process LRU, then Redis)",
              ["--rows", "20000"], ["--rows", "50000"], 300, 900, ["pytest", "redis"]),
    Benchmark("backup", "our backup vs pg_dump gzip-9 then upload, vs the dump floor",
              ["--size-mb", "512", "--repeat", "2"], ["--size-mb", "1024", "--repeat", "2"], 480, 1800, SERVERS),
    Benchmark("restore", "our restore vs pg_restore -j2 of a local dump; the drill's RTO",
              ["--size-mb", "512", "--repeat", "2"], ["--size-mb", "1024", "--repeat", "3"], 480, 1800, SERVERS),
    Benchmark("pitr_restore", "restore to a point (base backup + WAL) vs today's logical restore", ["--quick"], ["--size-mb", "1024", "--repeat", "2"], 300, 1800, ["pytest"]),
    Benchmark("daemon_path", "one tenant through the daemon vs in process; tenants 4 at a time vs a plain script",
              ["--tenants", "8", "--rounds", "2"], ["--tenants", "100", "--rounds", "3"], 420, 1800, ["pytest"]),
    Benchmark("io_values", "a 1M-row training_data through the IO manager vs plain Parquet, local and S3",
              ["--rows", "200000"], ["--rows", "1000000"], 300, 900, SERVERS),
    Benchmark("pitr_base", "base backup vs pg_basebackup -Ft -X none > /dev/null; an incremental after 5% of rows changed vs a full one",
              ["--size-mb", "256"], ["--size-mb", "1024"], 300, 900, SERVERS),
    Benchmark("pitr_drill", "the RPO the PITR drill measures (archive_timeout 60 s, nothing forced) vs the 60 s target", ["--rounds", "1"], ["--rounds", "3"], 300, 900),
    Benchmark("encryption", "encrypted vs unencrypted backup into the local store: time and size",
              ["--size-mb", "256", "--repeat", "2"], ["--size-mb", "1024", "--repeat", "5"], 420, 1800),
    Benchmark("sensors", "tenant and retraining sensor ticks at 1,000 and 10,000 tenants (< 10 s)", [], [], 300, 600),
]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def stop_group(process: subprocess.Popen) -> None:
    """The benchmark and whatever it started (moto, PostgreSQL, Redis) share its session."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def last_lines(path: Path, count: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


def run_one(bench: Benchmark, mode: str, results_dir: Path, logs_dir: Path) -> dict:
    """Run one benchmark in its own process group; its record and its rows."""
    args = bench.arguments(mode)
    results_path = results_dir / f"{bench.name}.json"
    log_path = logs_dir / f"{bench.name}.log"
    record = {"name": bench.name, "args": args, "results": str(results_path.relative_to(REPO)),
              "log": str(log_path.relative_to(REPO)), "budget_s": bench.budget(mode),
              "loadavg_start": loadavg(), "wall_s": 0.0, "exit_code": None}
    missing = [module for module in bench.needs if importlib.util.find_spec(module) is None]
    if missing:
        record.update(status=f"not run: missing {', '.join(missing)} (pip install -e '.[dev]')",
                      loadavg_end=loadavg(), log=None)
        return record

    command = [sys.executable, "-m", f"benchmarks.{bench.name}", *args, "--results", str(results_path)]
    started_wall = time.time()
    started = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=bench.budget(mode))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(process)
            code = process.returncode
        finally:
            if process.returncode is None:  # interrupted (Ctrl-C): take its servers down too
                stop_group(process)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["exit_code"] = code
    record["loadavg_end"] = loadavg()

    rows = []
    fresh = results_path.exists() and results_path.stat().st_mtime >= started_wall - 1
    if fresh and not timed_out:
        try:
            rows = json.loads(results_path.read_text()).get("rows") or []
        except (OSError, ValueError, AttributeError) as error:
            record["results_error"] = str(error)
    record["rows"] = rows
    if timed_out:
        record["status"] = f"timeout after {bench.budget(mode)} s"
    elif code == 0 and rows:
        record["status"] = "ok"
    elif code != 0 and any(x.get("pass") is False for x in rows):
        record["status"] = "target missed"
    elif code == 0:
        record["status"] = "no rows in its results"
    else:
        record["status"] = f"failed (exit {code})"
    return record


def failure_row(record: dict) -> dict:
    if record["log"] is None:
        return {"figure": record["status"], "ours": None, "baseline": None, "ratio": None,
                "target": "runs to the end", "pass": False}
    tail = [line for line in last_lines(REPO / record["log"])[1:] if line.strip()]
    why = f"; last line: {tail[-1][:160]}" if tail else ""
    return {"figure": f"did not finish: {record['status']}{why} (log: {record['log']})", "ours": None,
            "baseline": None, "ratio": None, "target": "runs to the end", "pass": False}


def rows_table(rows: list[dict]) -> str:
    """The markdown table of report rows, as latest.md and the README show them."""
    return markdown_table(["benchmark", *HEADER],
                          [[x["benchmark"], x["figure"], x["ours"], x["baseline"], x["ratio"], x["target"],
                            verdict(x["pass"])] for x in rows])


def render_markdown(report: dict) -> str:
    machine = report["machine"]
    minutes, seconds = divmod(round(report["total_s"]), 60)
    lines = [
        "# Benchmarks: the last run",
        "",
        f"`{report['command']}` on {report['date']} (commit {report['git_commit']}): {report['mode']} sizes, "
        f"{machine['cpus']} CPUs, Python {machine['python']}, load average (1/5/15 min) "
        f"{' / '.join(map(str, machine['loadavg_start']))} at start and "
        f"{' / '.join(map(str, machine['loadavg_end']))} at the end; {minutes} min {seconds} s in all. "
        "Pass is empty for figures that are reported only. Other work on the machine skews the times.",
        "",
        rows_table(report["rows"]),
        "",
        markdown_table(["benchmark", "arguments", "wall time (s)", "exit", "status", "load average at start"],
                       [[b["name"], " ".join(b["args"]), b["wall_s"], b["exit_code"], b["status"],
                         b["loadavg_start"][0]] for b in report["benchmarks"]]),
        "",
    ]
    return "\n".join(lines)


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="sizes that fit 2 cores in under 15 minutes (the default)")
    sizes.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="the issues' sizes (1 GiB streams and databases, 1M predictions); overwrites "
                            "benchmarks/results/<name>.json")
    parser.add_argument("--only", help="comma-separated benchmark names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and their sizes, run nothing")
    return parser, parser.parse_args()


def list_benchmarks() -> None:
    for bench in BENCHMARKS:
        print(f"{bench.name:13} {bench.what}\n{'':13} quick: {' '.join(bench.quick) or '(defaults)'} "
              f"(budget {bench.budget_quick_s} s); full: {' '.join(bench.full) or '(defaults)'} "
              f"(budget {bench.budget_full_s} s)")


def chosen_benchmarks(parser: argparse.ArgumentParser, only: str | None) -> list[Benchmark]:
    """Every benchmark, or those `--only` names (an unknown name is a usage error)."""
    if not only:
        return BENCHMARKS
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; see --list")
    return [b for b in BENCHMARKS if b.name in names]


def run_all(chosen: list[Benchmark], mode: str, results_dir: Path, logs_dir: Path) -> tuple[list[dict], list[dict]]:
    """Run each benchmark in turn, a progress line each: (their records, all their rows)."""
    records, rows = [], []
    for index, bench in enumerate(chosen, 1):
        say(f"[{index}/{len(chosen)}] {bench.name} {' '.join(bench.arguments(mode))} "
            f"(budget {bench.budget(mode)} s, log {logs_dir.relative_to(REPO)}/{bench.name}.log) ...")
        record = run_one(bench, mode, results_dir, logs_dir)
        bench_rows = record.pop("rows", [])
        failed = sum(1 for x in bench_rows if x.get("pass") is False)
        say(f"    {record['wall_s']:.1f} s, {record['status']}: {len(bench_rows)} rows"
            + (f", {failed} missed target(s)" if failed else ""))
        if record["status"] not in ("ok", "target missed"):
            for line in last_lines(REPO / record["log"]) if record["log"] else []:
                say(f"    | {line}")
            bench_rows = [*bench_rows, failure_row(record)]
        records.append(record)
        rows += [{"benchmark": bench.name, **{k: x.get(k) for k in HEADER}} for x in bench_rows]
    return records, rows


def readme_table(report: dict) -> str:
    """What the README says of the last run: its command, machine and load, and the rows
    that have a target (every row stays in latest.md)."""
    machine = report["machine"]
    minutes, seconds = divmod(round(report["total_s"]), 60)
    targeted = [x for x in report["rows"] if x["pass"] is not None]
    lines = [
        f"The last run (`{report['command']}`, {report['date']}, commit {report['git_commit']}, "
        f"{machine['cpus']} CPUs, load average {machine['loadavg_start'][0]} at start and "
        f"{machine['loadavg_end'][0]} at the end; {minutes} min {seconds} s in all): the figures with a "
        f"target, {sum(1 for x in targeted if x['pass'])} of {len(targeted)} met. All {len(report['rows'])} rows "
        "are in [latest.md](benchmarks/results/latest.md).",
        "",
        rows_table(targeted),
    ]
    # Indented: the block sits in a list item of the README.
    return "\n".join(f"  {line}" if line else "" for line in "\n".join(lines).splitlines())


def update_readme(report: dict) -> bool:
    """Rewrite the README's block between the markers; False when the markers are missing."""
    text = README.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    block = readme_table(report)
    README.write_text(text[: start + len(README_START)] + "\n" + block + "\n  " + text[end:])
    return True


def write_report(report: dict) -> list[dict]:
    """latest.json and latest.md (printed too); returns the rows that missed their target."""
    finished = all(r["status"] in ("ok", "target missed") for r in report["benchmarks"])
    missed = [x for x in report["rows"] if x["pass"] is False]
    report["exit_status"] = 0 if finished and not missed else 1
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (RESULTS_DIR / "latest.md").write_text(markdown)
    print(markdown)
    if not update_readme(report):
        say(f"warning: {README.name} has no {README_START!r} marker: its table was not updated")
    return missed


def main() -> int:
    parser, args = parse_args()
    mode = args.mode or "quick"
    if args.list:
        list_benchmarks()
        return 0
    chosen = chosen_benchmarks(parser, args.only)

    results_dir = RESULTS_DIR / "quick" if mode == "quick" else RESULTS_DIR
    logs_dir = RESULTS_DIR / "logs"
    results_dir.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks " + f"--{mode}" + (f" --only {args.only}" if args.only else "")
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "mode": mode,
        "only": [b.name for b in chosen] if args.only else None,
        "git_commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": loadavg()},
    }
    say(f"{command}: {len(chosen)} benchmark(s), {mode} sizes, {os.cpu_count()} CPUs, "
        f"load average {report['machine']['loadavg_start']}")
    started = time.perf_counter()
    records, rows = run_all(chosen, mode, results_dir, logs_dir)

    report["total_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_end"] = loadavg()
    report["benchmarks"] = records
    report["rows"] = rows
    missed = write_report(report)
    say(f"{report['total_s'] / 60:.1f} min in all; {len(rows)} rows, {len(missed)} failed; "
        f"wrote {(RESULTS_DIR / 'latest.json').relative_to(REPO)} and {(RESULTS_DIR / 'latest.md').relative_to(REPO)}")
    if mode == "quick" and not args.only and report["total_s"] > QUICK_LIMIT_S:
        say(f"warning: the quick run took over {QUICK_LIMIT_S // 60} minutes")
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
