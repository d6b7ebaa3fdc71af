"""Schedules: nightly backups, monthly archives, retention, weekly drills, daily upkeep.

Drills and upkeep add theirs with their issues.
"""

from maestro_pipelines.schedules.backups import backup_schedules
from maestro_pipelines.schedules.drills import drill_schedules

all_schedules: list = [*backup_schedules, *drill_schedules]
