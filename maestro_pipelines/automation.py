"""The backup automation that starts STOPPED on the embedded default, and the one command that
turns it on. Dagster-free, so the CLI (`maestro backup info`) and the definitions' descriptions
say the same thing.

Why stopped there: on a laptop (`dagster dev` after `maestro demo`) nothing should start pg_dump
at 02:00, restore a drill's scratch copy or delete backups taken by hand without being asked. In
production (MAESTRO_DATABASE_URL set) all of it starts RUNNING. Either way a status set in the UI
or by the command below wins: Dagster only uses the default for a schedule it has no state for.
"""

AUTOMATION_ON_COMMAND = "maestro backup automation on"
"""Starts every schedule and sensor below in the Dagster instance of DAGSTER_HOME (the demo's,
MAESTRO_HOME/dagster, when unset); already running ones are left as they are."""

AUTOMATION_STATUS_COMMAND = "maestro backup automation status"
"""Says RUNNING or STOPPED for each, read from that instance: the one place outside the UI that
knows (`maestro backup info` reads only the store, never Dagster's state)."""

STOPPED_ON_EMBEDDED_SCHEDULES = (
    "nightly_backup_schedule",
    "monthly_archive_schedule",
    "backup_retention_schedule",
    "weekly_drill_schedule",
    "nightly_base_backup_schedule",
    "weekly_pitr_drill_schedule",
)
STOPPED_ON_EMBEDDED_SENSORS = ("rpo_breach_sensor", "verify_new_backup_sensor", "wal_rpo_sensor")

STOPPED_ON_EMBEDDED_HINT = (
    "Starts stopped on the embedded default (a laptop: nothing backs up, drills or deletes backups "
    f"unasked); running in production. Turn all backup schedules and sensors on with `{AUTOMATION_ON_COMMAND}`."
)
"""The sentence each of those schedules' and sensors' descriptions ends with."""
