"""Cost of loading the code location vs. importing Dagster itself.

Every Dagster process (webserver, daemon, each run worker) imports
`maestro_pipelines.definitions`; anything heavy imported at module level is paid each time.
Target: within 1.3x of `python -c "import dagster"`, measured side by side, alternating so
both see the same machine state.

    python -m benchmarks.import_time [--rounds 9] [--results PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.report import add_results_option, print_rows, row, write_results

TARGET_RATIO = 1.3


def time_import(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    add_results_option(parser, "import_time")
    args = parser.parse_args()

    baseline, ours = [], []
    time_import("import maestro_pipelines.definitions")  # warm the OS file cache for both
    for _ in range(args.rounds):
        baseline.append(time_import("import dagster"))
        ours.append(time_import("import maestro_pipelines.definitions"))
    base_median, our_median = statistics.median(baseline), statistics.median(ours)
    ratio = our_median / base_median
    result = {
        "figure": "import maestro_pipelines.definitions vs import dagster (median wall s)",
        "ours": round(our_median, 3),
        "baseline": round(base_median, 3),
        "ratio": round(ratio, 3),
        "target": f"<= {TARGET_RATIO}",
        "pass": ratio <= TARGET_RATIO,
        "rounds": args.rounds,
    }
    result["rows"] = [row(result["figure"], result["ours"], result["baseline"], result["ratio"], result["target"],
                          result["pass"])]
    write_results(args.results, result)
    print_rows(result["rows"])
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
