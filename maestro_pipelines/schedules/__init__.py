"""Schedules: nightly backups, monthly archives, retention, weekly drills, daily upkeep.
"""

from maestro_pipelines.schedules.backups import backup_schedules
from maestro_pipelines.schedules.drills import drill_schedules
from maestro_pipelines.schedules.pitr import pitr_schedules
from maestro_pipelines.schedules.upkeep import upkeep_schedules

all_schedules: list = [*backup_schedules, *drill_schedules, *pitr_schedules, *upkeep_schedules]
