"""Schedules of the physical tier, on MAESTRO_TIMEZONE's clock, with the default status of the
other backup schedules (RUNNING in production, STOPPED on the embedded default):

- `nightly_base_backup_schedule`: 01:00 every day, an hour before the dumps (both are in the
  pool `maestro_backup`, so they never run at once); the WAL since the previous base backup
  is what a restore replays, so one a night keeps a restore's replay under a day of WAL;
- `weekly_pitr_drill_schedule`: Sunday 04:30, after the dump drill (03:00).
"""

from datetime import datetime, timezone

import dagster as dg

from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_HINT
from maestro_pipelines.clock import local_day
from maestro_pipelines.environment import BACKUP_TIMEZONE
from maestro_pipelines.jobs.pitr import nightly_base_backup, pitr_drill_job
from maestro_pipelines.schedules.backups import DEFAULT_STATUS

BASE_BACKUP_HOUR = 1
PITR_DRILL_HOUR, PITR_DRILL_MINUTE, PITR_DRILL_WEEKDAY = 4, 30, 0


def _day(context: dg.ScheduleEvaluationContext) -> str:
    return local_day(context.scheduled_execution_time or datetime.now(timezone.utc), BACKUP_TIMEZONE)


@dg.schedule(
    name="nightly_base_backup_schedule",
    cron_schedule=f"0 {BASE_BACKUP_HOUR} * * *",
    execution_timezone=BACKUP_TIMEZONE,
    job=nightly_base_backup,
    default_status=DEFAULT_STATUS,
    description="A base backup at 01:00 (MAESTRO_TIMEZONE) of each server whose WAL is archived. " + STOPPED_ON_EMBEDDED_HINT,
)
def nightly_base_backup_schedule(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"base-backup-{_day(context)}", tags={"maestro/trigger": "schedule"})


@dg.schedule(
    name="weekly_pitr_drill_schedule",
    cron_schedule=f"{PITR_DRILL_MINUTE} {PITR_DRILL_HOUR} * * {PITR_DRILL_WEEKDAY}",
    execution_timezone=BACKUP_TIMEZONE,
    job=pitr_drill_job,
    default_status=DEFAULT_STATUS,
    description="Every Sunday at 04:30 (MAESTRO_TIMEZONE): the point-in-time recovery drill. " + STOPPED_ON_EMBEDDED_HINT,
)
def weekly_pitr_drill_schedule(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"pitr-drill-{_day(context)}", tags={"maestro/trigger": "schedule"})


pitr_schedules = [nightly_base_backup_schedule, weekly_pitr_drill_schedule]
