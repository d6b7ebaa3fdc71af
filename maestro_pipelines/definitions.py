"""The code location: assembles what the subpackages define, decides nothing itself."""

import dagster as dg

from maestro_pipelines.assets import all_assets
from maestro_pipelines.environment import resources_for_environment
from maestro_pipelines.jobs import all_jobs
from maestro_pipelines.schedules import all_schedules
from maestro_pipelines.sensors import all_sensors

defs = dg.Definitions(
    assets=all_assets,
    jobs=all_jobs,
    schedules=all_schedules,
    sensors=all_sensors,
    resources=resources_for_environment(),
)
