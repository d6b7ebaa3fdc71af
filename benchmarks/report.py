"""One row format for every benchmark, and the helpers that build and print it.

Every benchmark's results JSON carries `rows`: a list of
`{figure, ours, baseline, ratio, target, pass}`, where `pass` is True or False for a figure
with a target and None for a figure that is reported only. `python -m benchmarks` collects
these rows from every benchmark into `benchmarks/results/latest.json` and `latest.md`.

Each benchmark takes `--results PATH` (default `benchmarks/results/<name>.json`, the
committed full-size figures the docs quote); `python -m benchmarks --quick` points it into
`benchmarks/results/quick/` so small runs never overwrite the full-size files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
HEADER = ["figure", "ours", "baseline", "ratio", "target", "pass"]


def row(figure, ours, baseline, ratio, target, passed) -> dict:
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target, "pass": passed}


def r(value, digits=2):
    return None if value is None else round(value, digits)


def verdict(passed) -> str:
    return "" if passed is None else ("yes" if passed else "NO")


def fmt(value) -> str:
    """A cell: numbers to a readable precision, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:#.3g}"
    return str(value).replace("|", "\\|")


def print_table(header: list[str], rows: list[list]) -> None:
    print(markdown_table(header, rows))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


def print_rows(rows: list[dict]) -> None:
    """The standard table of a benchmark's rows."""
    print_table(HEADER, [[x["figure"], x["ours"], x["baseline"], x["ratio"], x["target"], verdict(x["pass"])]
                         for x in rows])


def add_results_option(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help=f"where to write the results JSON (default benchmarks/results/{name}.json)")


def write_results(path: Path, results) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
