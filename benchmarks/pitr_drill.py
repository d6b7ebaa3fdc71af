"""The RPO the point-in-time tier really gives, as the weekly drill measures it.

    python -m benchmarks.pitr_drill [--rounds 3] [--results PATH]

An embedded PostgreSQL 18 as a new user runs it (`maestro db start` in a MAESTRO_HOME of its
own: archive_timeout 60 s, the spool and the pusher into the local store), `maestro db
upgrade`, a base backup (`maestro backup run --kind base`), then `--rounds` drills
(`backup.pitr.drill.run_pitr_drill`, what the `pitr_drill` asset runs), one after another:
each commits a marker, waits until its WAL is in the store (the measured RPO: nothing forces a
segment switch, the server's archive_timeout does), recovers to just after it and runs
pg_amcheck (the RTO).

Rows: the worst measured RPO against the 60 s target (the baseline column is the server's
archive_timeout, the bound PostgreSQL itself gives; ratio = RPO / target), and the worst RTO.
Results go to benchmarks/results/pitr_drill.json (or `--results PATH`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="drills, one after another (default 3)")
    add_results_option(parser, "pitr_drill")
    return parser.parse_args()


def maestro(env: dict, *args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("maestro")), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)


def drills(home: Path, rounds: int) -> list:
    from maestro_pipelines.backup.pitr.drill import run_pitr_drill
    from maestro_pipelines.backup.targets import database_targets
    from maestro_pipelines.objectives import PITR_RPO_TARGET
    from maestro_pipelines.settings import load_settings
    from maestro_pipelines.storage import open_configured_store

    settings = load_settings()
    platform = next(t for t in database_targets(settings)[0] if t.role == "platform")
    store = open_configured_store(settings.store_url, settings.home, settings.store_environment)
    reports = []
    for number in range(rounds):
        report = run_pitr_drill(store, platform, rpo_target=PITR_RPO_TARGET)
        print(f"drill {number + 1}: RPO {report.rpo_s:.1f} s, RTO {report.rto_s:.1f} s, ok={report.ok}", flush=True)
        reports.append(report)
    return reports


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="maestro-bench-pitr-drill-") as folder:
        os.chmod(folder, 0o755)
        home = Path(folder) / "home"
        os.environ.update(MAESTRO_HOME=str(home))
        for key in [k for k in os.environ if k.startswith("MAESTRO_") and k != "MAESTRO_HOME"]:
            del os.environ[key]
        env = dict(os.environ)
        maestro(env, "db", "start")
        try:
            maestro(env, "db", "upgrade")
            maestro(env, "backup", "run", "--kind", "base")
            reports = drills(home, args.rounds)
        finally:
            maestro(env, "db", "stop")
    worst_rpo = max(rep.rpo_s for rep in reports)
    worst_rto = max(rep.rto_s for rep in reports)
    target = reports[0].rpo_target_s
    rows = [
        row(f"RPO measured by the drill, worst of {len(reports)} (s)", r(worst_rpo, 1), 60.0,
            r(worst_rpo / target), f"<= {target:.0f} s", worst_rpo <= target),
        row("RTO of the drill: recovery to checked (s)", r(worst_rto, 1), None, None,
            f"<= {reports[0].rto_target_s:.0f} s", worst_rto <= reports[0].rto_target_s),
    ]
    print_rows(rows)
    write_results(args.results, {"rows": rows, "drills": [rep.as_dict() for rep in reports]})
    return 0 if all(rep.ok for rep in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
