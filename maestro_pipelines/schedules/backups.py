"""Backup schedules, all on MAESTRO_TIMEZONE's clock (UTC when unset):

- `nightly_backup_schedule`: 02:00 every day, one backup (a materialization of
  `database_backup`; run_key `nightly-backup-<local day>`, so a tick evaluated twice takes one);
- `monthly_archive_schedule`: 04:00 on day `ARCHIVE_DAY_OF_MONTH` (the 1st), the archive of
  the month before (config `month`, run_key `monthly-archive-<YYYY-MM>`), after that month's
  last nightly backup had two hours to finish;
- `backup_retention_schedule`: 05:00 every day, after the backup and the archive.

The hours and the archive day are module constants, not settings: changing them changes
the RPO the sensors assume (`RPO_TARGET` in `maestro_pipelines.objectives`), so they
change together, in code review. On the day clocks spring forward 02:00 does not exist and
Dagster runs the backup at 03:00; the day they fall back it runs once.

Default status: RUNNING in production (MAESTRO_DATABASE_URL set), STOPPED on the embedded
default. In production a backup schedule that waits for someone to switch it on in the UI
is the classic way to find out, on the day of the restore, that there are no backups; the
definitions are the deployment's truth. On a laptop (`dagster dev` after `maestro demo`)
nothing should start pg_dump at 02:00 or delete backups taken by hand with the CLI without
being asked. Each description says so, with the one command that starts them all
(`maestro_pipelines.automation`). Both apply only to a schedule the instance has no state for:
a status set in the UI or by that command wins.
"""

from datetime import datetime, timezone

import dagster as dg

from maestro_pipelines.clock import local_day, previous_month
from maestro_pipelines.environment import AUTOMATION_ON_BY_DEFAULT, BACKUP_TIMEZONE
from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_HINT
from maestro_pipelines.jobs.backups import backup_retention, monthly_archive_job, nightly_backup
from maestro_pipelines.objectives import DAILY_BACKUPS_KEPT, MONTHLY_ARCHIVES_KEPT

NIGHTLY_BACKUP_HOUR = 2
ARCHIVE_DAY_OF_MONTH = 1
ARCHIVE_HOUR = 4
RETENTION_HOUR = 5

DEFAULT_STATUS = dg.DefaultScheduleStatus.RUNNING if AUTOMATION_ON_BY_DEFAULT else dg.DefaultScheduleStatus.STOPPED


def _scheduled(context: dg.ScheduleEvaluationContext) -> datetime:
    return context.scheduled_execution_time or datetime.now(timezone.utc)




@dg.schedule(
    name="nightly_backup_schedule",
    cron_schedule=f"0 {NIGHTLY_BACKUP_HOUR} * * *",
    execution_timezone=BACKUP_TIMEZONE,
    job=nightly_backup,
    default_status=DEFAULT_STATUS,
    description="Back up every database at 02:00 (MAESTRO_TIMEZONE): one database_backup. " + STOPPED_ON_EMBEDDED_HINT,
)
def nightly_backup_schedule(context: dg.ScheduleEvaluationContext):
    day = local_day(_scheduled(context), BACKUP_TIMEZONE)
    # One backup per day from the schedule, even if a tick is evaluated twice.
    return dg.RunRequest(run_key=f"nightly-backup-{day}", tags={"maestro/trigger": "schedule"})


@dg.schedule(
    name="monthly_archive_schedule",
    cron_schedule=f"0 {ARCHIVE_HOUR} {ARCHIVE_DAY_OF_MONTH} * *",
    execution_timezone=BACKUP_TIMEZONE,
    job=monthly_archive_job,
    default_status=DEFAULT_STATUS,
    description="On the 1st at 04:00 (MAESTRO_TIMEZONE), archive the month before. " + STOPPED_ON_EMBEDDED_HINT,
)
def monthly_archive_schedule(context: dg.ScheduleEvaluationContext):
    month = previous_month(_scheduled(context), BACKUP_TIMEZONE)
    return dg.RunRequest(
        run_key=f"monthly-archive-{month}",
        run_config={"ops": {"monthly_archive": {"config": {"month": month}}}},
        tags={"maestro/trigger": "schedule"},
    )


@dg.schedule(
    name="backup_retention_schedule",
    cron_schedule=f"0 {RETENTION_HOUR} * * *",
    execution_timezone=BACKUP_TIMEZONE,
    job=backup_retention,
    default_status=DEFAULT_STATUS,
    description=(
        f"At 05:00 (MAESTRO_TIMEZONE), delete backups the policy no longer keeps ({DAILY_BACKUPS_KEPT} daily, "
        f"{MONTHLY_ARCHIVES_KEPT} monthly). "
        + STOPPED_ON_EMBEDDED_HINT
    ),
)
def backup_retention_schedule(context: dg.ScheduleEvaluationContext):
    day = local_day(_scheduled(context), BACKUP_TIMEZONE)
    return dg.RunRequest(run_key=f"retention-{day}", tags={"maestro/trigger": "schedule"})


backup_schedules = [nightly_backup_schedule, monthly_archive_schedule, backup_retention_schedule]
