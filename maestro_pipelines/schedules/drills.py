"""The weekly DR drill: Sunday at 03:00 on MAESTRO_TIMEZONE's clock, an hour after that
night's 02:00 backup. The drill runs in the pool `maestro_backup`, so when the backup is still
running it waits for it and drills with that fresh backup; without a pool limit it drills with
the latest verified one (Saturday's, about 25 h old: inside the RPO target, `RPO_TARGET`).

Default status as the backup schedules (`maestro_pipelines.schedules.backups`): RUNNING in
production (MAESTRO_DATABASE_URL set), STOPPED on the embedded default, where a drill that
restores every database once a week is a click in the UI, not a surprise.
"""

from datetime import datetime, timezone

import dagster as dg

from maestro_pipelines.clock import local_day
from maestro_pipelines.environment import BACKUP_TIMEZONE
from maestro_pipelines.jobs.restore import dr_drill_job
from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_HINT
from maestro_pipelines.schedules.backups import DEFAULT_STATUS

DRILL_HOUR = 3
DRILL_WEEKDAY = 0
"""cron's day of week: 0 = Sunday."""


@dg.schedule(
    name="weekly_drill_schedule",
    cron_schedule=f"0 {DRILL_HOUR} * * {DRILL_WEEKDAY}",
    execution_timezone=BACKUP_TIMEZONE,
    job=dr_drill_job,
    default_status=DEFAULT_STATUS,
    description="Every Sunday at 03:00 (MAESTRO_TIMEZONE): the DR drill (restore, verify, RTO/RPO, alert). "
    + STOPPED_ON_EMBEDDED_HINT,
)
def weekly_drill_schedule(context: dg.ScheduleEvaluationContext):
    day = local_day(context.scheduled_execution_time or datetime.now(timezone.utc), BACKUP_TIMEZONE)
    # One drill per Sunday from the schedule, even if a tick is evaluated twice.
    return dg.RunRequest(run_key=f"dr-drill-{day}", tags={"maestro/trigger": "schedule"})


drill_schedules = [weekly_drill_schedule]
