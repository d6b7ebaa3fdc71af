"""The weekly drill schedule: Sunday 03:00 on MAESTRO_TIMEZONE's clock, one run per Sunday."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg

from maestro_pipelines.assets.backups import BACKUP_TIMEZONE
from maestro_pipelines.schedules.backups import DEFAULT_STATUS, nightly_backup_schedule
from maestro_pipelines.schedules.drills import weekly_drill_schedule


def test_the_drill_runs_every_sunday_at_three_after_the_nightly_backup():
    assert weekly_drill_schedule.cron_schedule == "0 3 * * 0"
    assert weekly_drill_schedule.execution_timezone == BACKUP_TIMEZONE == nightly_backup_schedule.execution_timezone
    assert weekly_drill_schedule.job_name == "dr_drill_job"
    assert weekly_drill_schedule.default_status == DEFAULT_STATUS == nightly_backup_schedule.default_status

    sunday = datetime(2026, 11, 29, 3, 0, tzinfo=ZoneInfo(BACKUP_TIMEZONE))
    request = weekly_drill_schedule(dg.build_schedule_context(scheduled_execution_time=sunday))
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "dr-drill-2026-11-29" and request.tags == {"maestro/trigger": "schedule"}
    assert request.partition_key is None and request.run_config == {}



PROBE = r"""
import json
from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg

from maestro_pipelines.definitions import defs

schedule = defs.resolve_schedule_def("weekly_drill_schedule")
# Sunday 03:00 in Tokyo is Saturday 18:00 UTC: the run key is Tokyo's Sunday.
when = datetime(2026, 11, 29, 3, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
request = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when)).run_requests[0]
print("RESULT " + json.dumps([schedule.execution_timezone, schedule.default_status.value, request.run_key]))
"""


def test_in_production_the_drill_runs_on_the_configured_clock(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAESTRO_")}
    env.update({
        "MAESTRO_TIMEZONE": "Asia/Tokyo",
        "MAESTRO_HOME": str(tmp_path),
        "MAESTRO_DATABASE_URL": "postgresql://maestro:secret@db.invalid:5432/maestro",
    })
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert json.loads(line.removeprefix("RESULT ")) == ["Asia/Tokyo", "RUNNING", "dr-drill-2026-11-29"]
