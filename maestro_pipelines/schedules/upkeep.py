"""`platform_upkeep_schedule`: every day at 06:00 (MAESTRO_TIMEZONE), after the nightly
backup (02:00), the monthly archive (04:00) and retention (05:00), so the partitions it
archives and drops are already in last night's backup. Default status as the backup
schedules: RUNNING in production, STOPPED on the embedded default."""

import dagster as dg

from maestro_pipelines.environment import BACKUP_TIMEZONE
from maestro_pipelines.jobs.upkeep import platform_upkeep
from maestro_pipelines.schedules.backups import DEFAULT_STATUS, _scheduled

UPKEEP_HOUR = 6


@dg.schedule(
    name="platform_upkeep_schedule",
    cron_schedule=f"0 {UPKEEP_HOUR} * * *",
    execution_timezone=BACKUP_TIMEZONE,
    job=platform_upkeep,
    default_status=DEFAULT_STATUS,
    description="Platform upkeep at 06:00 (MAESTRO_TIMEZONE), after the night's backup, archive and retention.",
)
def platform_upkeep_schedule(context: dg.ScheduleEvaluationContext):
    day = _scheduled(context).date().isoformat()
    return dg.RunRequest(run_key=f"platform-upkeep-{day}", tags={"maestro/trigger": "schedule"})


upkeep_schedules = [platform_upkeep_schedule]
