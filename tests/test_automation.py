"""`maestro backup automation on`, the one command the stopped schedules' descriptions name, on a
real Dagster instance: then `dagster schedule list` and `dagster sensor list`, run from the
repository as `dagster dev` is, show them running (the UI and the daemon find them the same
way), and nothing else was started; `status` says the same as those, `off` stops them again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maestro_pipelines.automation import (
    AUTOMATION_ON_COMMAND,
    AUTOMATION_STATUS_COMMAND,
    STOPPED_ON_EMBEDDED_SCHEDULES,
    STOPPED_ON_EMBEDDED_SENSORS,
)

from .services import REPO_ROOT
from .test_cli import run_maestro

DAGSTER = Path(sys.executable).parent / "dagster"


def statuses(kind: str, env: dict[str, str]) -> dict[str, str]:
    """`dagster schedule|sensor list` in the repository: name -> RUNNING|STOPPED."""
    listed = subprocess.run([str(DAGSTER), kind, "list"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=180)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return dict(re.findall(rf"^{kind.capitalize()}: (\w+) \[(RUNNING|STOPPED)\]", listed.stdout, re.M))


def side_by_side(*calls):
    """The calls' results, the calls run at the same time. For commands that only read the
    instance: each loads the code location (about 10 s), one after another they were most of
    this test's time."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def all_statuses(env: dict[str, str]) -> dict[str, str]:
    """`dagster schedule list` and `dagster sensor list`, side by side: every schedule's and sensor's status."""
    schedules, sensors = side_by_side(lambda: statuses("schedule", env), lambda: statuses("sensor", env))
    return {**schedules, **sensors}


def test_automation_on_starts_the_backup_schedules_and_sensors_once(tmp_path):
    assert AUTOMATION_ON_COMMAND.split() == ["maestro", "backup", "automation", "on"]
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (tmp_path / "tmp").mkdir()
    # The embedded default (no MAESTRO_DATABASE_URL): the backup automation starts stopped.
    env = {"MAESTRO_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "TMPDIR": str(tmp_path / "tmp")}
    shell = {**{k: v for k, v in os.environ.items() if not k.startswith("MAESTRO_")}, **env}
    wanted = {*STOPPED_ON_EMBEDDED_SCHEDULES, *STOPPED_ON_EMBEDDED_SENSORS}
    # `status` reads the same instance and location as `dagster schedule list` does. (First:
    # it makes the instance's storage, which the two lists side by side then only read.)
    assert automation_status(env) == dict.fromkeys(wanted, ("STOPPED", "default"))
    before = all_statuses(shell)
    assert {before[name] for name in wanted} == {"STOPPED"}

    turned_on = run_maestro(*AUTOMATION_ON_COMMAND.split()[1:], env=env)
    assert turned_on.returncode == 0, turned_on.stderr[-2000:]
    # Only its own lines: no code server INFO lines, no colour codes into a pipe.
    assert "\x1b[" not in turned_on.stdout + turned_on.stderr and "code_server" not in turned_on.stdout + turned_on.stderr
    assert turned_on.stderr == "", turned_on.stderr
    for name in wanted:
        assert re.search(rf"^(schedule|sensor) +{name} +started$", turned_on.stdout, re.M), turned_on.stdout
    after = all_statuses(shell)
    assert {name: after[name] for name in wanted} == dict.fromkeys(wanted, "RUNNING")
    assert {n: s for n, s in after.items() if n not in wanted} == {n: s for n, s in before.items() if n not in wanted}

    again = run_maestro(*AUTOMATION_ON_COMMAND.split()[1:], env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already running") == len(wanted) and "started" not in again.stdout
    status, shown = side_by_side(lambda: automation_status(env),
                                 lambda: run_maestro(*AUTOMATION_STATUS_COMMAND.split()[1:], env=env))
    assert status == dict.fromkeys(wanted, ("RUNNING", "instance"))
    assert re.search(r"^schedule +nightly_backup_schedule +RUNNING +\(set in the instance\)$", shown.stdout, re.M)
    assert f"(0 of {len(wanted)} stopped)" in shown.stdout, shown.stdout

    turned_off = run_maestro("backup", "automation", "off", env=env)
    assert turned_off.returncode == 0 and turned_off.stderr == "", turned_off.stderr[-2000:]
    for name in wanted:
        assert re.search(rf"^(schedule|sensor) +{name} +stopped$", turned_off.stdout, re.M), turned_off.stdout
    off = all_statuses(shell)
    assert {name: off[name] for name in wanted} == dict.fromkeys(wanted, "STOPPED")
    status, shown = side_by_side(lambda: automation_status(env),
                                 lambda: run_maestro(*AUTOMATION_STATUS_COMMAND.split()[1:], env=env))
    assert status == dict.fromkeys(wanted, ("STOPPED", "instance"))
    assert f"({len(wanted)} of {len(wanted)} stopped; `{AUTOMATION_ON_COMMAND}` starts them)" in shown.stdout


def automation_status(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """`maestro backup automation status --json`: name -> (RUNNING|STOPPED, default|instance)."""
    shown = run_maestro(*AUTOMATION_STATUS_COMMAND.split()[1:], "--json", env=env)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr[-2000:]
    report = json.loads(shown.stdout)
    assert report["dagster_home"] == env["DAGSTER_HOME"] and report["location"] == "maestro"
    return {row["name"]: (row["status"], row["set_by"]) for row in report["automation"]}
