"""Schedules on MAESTRO_TIMEZONE's clock: the run requests they make at their times.

The time zone and the default status are read when the code location loads, so the
non-UTC cases load it in a fresh interpreter with the environment set, as `dagster dev` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from maestro_pipelines.clock import local_day, previous_month
from maestro_pipelines.automation import (
    AUTOMATION_ON_COMMAND,
    STOPPED_ON_EMBEDDED_SCHEDULES,
    STOPPED_ON_EMBEDDED_SENSORS,
)

PROBE = r"""
import json
from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg

from maestro_pipelines.definitions import defs
from maestro_pipelines.schedules.backups import (
    backup_retention_schedule, monthly_archive_schedule, nightly_backup_schedule,
)
from maestro_pipelines.sensors.backups import backup_failure_alert_sensor, rpo_breach_sensor

berlin = ZoneInfo("Europe/Berlin")

def request(schedule, *when):
    result = schedule(dg.build_schedule_context(scheduled_execution_time=datetime(*when, tzinfo=berlin)))
    if isinstance(result, dg.SkipReason):
        return "skip"
    return {"partition_key": result.partition_key, "run_key": result.run_key, "tags": result.tags,
            "run_config": result.run_config}

out = {
    "schedules": {
        s.name: [s.cron_schedule, s.execution_timezone, s.job_name, s.default_status.value]
        for s in (nightly_backup_schedule, monthly_archive_schedule, backup_retention_schedule)
    },
    "sensors": {s.name: s.default_status.value for s in (rpo_breach_sensor, backup_failure_alert_sensor)},
    # Every schedule and sensor: its default status and the description the UI shows.
    "all": {d.name: [d.default_status.value, d.description] for d in [*defs.schedules, *defs.sensors]},
    # 02:00 in Berlin is 00:00 or 01:00 UTC: the run_key is Berlin's day.
    "nightly_summer": request(nightly_backup_schedule, 2026, 7, 10, 2, 0),
    "nightly_winter": request(nightly_backup_schedule, 2026, 12, 1, 2, 0),
    # 2026-03-29: clocks spring forward at 02:00, Dagster runs the tick at 03:00.
    "nightly_dst": request(nightly_backup_schedule, 2026, 3, 29, 3, 0),
    "archive": request(monthly_archive_schedule, 2026, 12, 1, 4, 0),
    "archive_new_year": request(monthly_archive_schedule, 2027, 1, 1, 4, 0),
    "archive_first_month": request(monthly_archive_schedule, 2026, 1, 1, 4, 0),
    "retention": request(backup_retention_schedule, 2026, 7, 10, 5, 0),
}
print("RESULT " + json.dumps(out))
"""


def load_with(environment: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAESTRO_")}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_schedules_request_one_run_per_local_day_and_month_in_berlin_and_run_in_production(tmp_path):
    out = load_with({
        "MAESTRO_TIMEZONE": "Europe/Berlin",
        "MAESTRO_HOME": str(tmp_path),
        # Production: loading the definitions never connects, so nothing needs to listen here.
        "MAESTRO_DATABASE_URL": "postgresql://maestro:secret@db.invalid:5432/maestro",
    })
    assert out["schedules"] == {
        "nightly_backup_schedule": ["0 2 * * *", "Europe/Berlin", "nightly_backup", "RUNNING"],
        "monthly_archive_schedule": ["0 4 1 * *", "Europe/Berlin", "monthly_archive_job", "RUNNING"],
        "backup_retention_schedule": ["0 5 * * *", "Europe/Berlin", "backup_retention", "RUNNING"],
    }
    assert out["sensors"] == {"rpo_breach_sensor": "RUNNING", "backup_failure_alert_sensor": "RUNNING"}
    # One backup per local day (a tick evaluated twice makes the same run_key: one run), no partition.
    assert out["nightly_summer"] == {
        "partition_key": None, "run_key": "nightly-backup-2026-07-10", "tags": {"maestro/trigger": "schedule"},
        "run_config": {},
    }
    assert out["nightly_winter"]["run_key"] == "nightly-backup-2026-12-01"
    assert out["nightly_dst"]["run_key"] == "nightly-backup-2026-03-29"
    assert out["archive"] == {
        "partition_key": None, "run_key": "monthly-archive-2026-11", "tags": {"maestro/trigger": "schedule"},
        "run_config": {"ops": {"monthly_archive": {"config": {"month": "2026-11"}}}},
    }
    assert out["archive_new_year"]["run_config"] == {"ops": {"monthly_archive": {"config": {"month": "2026-12"}}}}
    # No first month to skip: the archive takes whatever verified backups the store has.
    assert out["archive_first_month"]["run_key"] == "monthly-archive-2025-12"
    assert out["retention"] == {"partition_key": None, "run_key": "retention-2026-07-10",
                                "tags": {"maestro/trigger": "schedule"}, "run_config": {}}
    for name in [*STOPPED_ON_EMBEDDED_SCHEDULES, *STOPPED_ON_EMBEDDED_SENSORS]:
        assert out["all"][name][0] == "RUNNING", name


def test_on_a_laptop_the_schedules_wait_to_be_switched_on(tmp_path):
    out = load_with({"MAESTRO_HOME": str(tmp_path)})
    assert {name: value[3] for name, value in out["schedules"].items()} == dict.fromkeys(out["schedules"], "STOPPED")
    assert out["sensors"] == {"rpo_breach_sensor": "STOPPED", "backup_failure_alert_sensor": "RUNNING"}
    # What the UI shows of each stopped backup schedule and sensor says why, and the one command;
    # that command starts exactly these (tests/test_automation.py), and nothing else starts stopped.
    not_backup = {"platform_upkeep_schedule", "statistics_refresh_sensor", "retraining_sensor"}
    backup_stopped = {
        name: description for name, (status, description) in out["all"].items()
        if status == "STOPPED" and name not in not_backup
    }
    assert set(backup_stopped) == {*STOPPED_ON_EMBEDDED_SCHEDULES, *STOPPED_ON_EMBEDDED_SENSORS}
    for name, description in backup_stopped.items():
        assert "Starts stopped on the embedded default" in description, name
        assert f"`{AUTOMATION_ON_COMMAND}`" in description and AUTOMATION_ON_COMMAND == "maestro backup automation on"


def test_the_day_and_month_are_the_local_ones_where_utc_has_another_date():
    tokyo = ZoneInfo("Asia/Tokyo")
    two_am = datetime(2026, 3, 10, 2, 0, tzinfo=tokyo)  # 2026-03-09 17:00 UTC
    assert local_day(two_am, "Asia/Tokyo") == "2026-03-10"
    assert local_day(two_am.astimezone(timezone.utc), "Asia/Tokyo") == "2026-03-10"
    assert local_day(datetime(2026, 3, 9, 17, 0), "Asia/Tokyo") == "2026-03-10"  # naive = UTC
    first_at_four = datetime(2026, 3, 1, 4, 0, tzinfo=tokyo)  # still February in UTC
    assert previous_month(first_at_four, "Asia/Tokyo") == "2026-02"
    assert previous_month(datetime(2026, 1, 1, 4, 0, tzinfo=tokyo), "Asia/Tokyo") == "2025-12"
