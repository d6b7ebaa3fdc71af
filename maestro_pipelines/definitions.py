"""The code location: assembles what the subpackages define, decides nothing itself."""

import warnings

import dagster as dg

from maestro_pipelines.assets import all_assets
from maestro_pipelines.dagster_support import DEFAULT_EXECUTOR
from maestro_pipelines.environment import resources_for_environment
from maestro_pipelines.jobs import all_jobs
from maestro_pipelines.schedules import all_schedules
from maestro_pipelines.sensors import all_sensors

# Dagster 1.13 copies every sensor when it binds resources (SensorDefinition.with_attributes)
# and passes the copy its empty `owners`, which warns that `owners` is in beta: no sensor of
# ours sets owners, and nobody can act on the warning (it came first in `maestro demo`).
warnings.filterwarnings("ignore", message=r"Parameter `owners` of initializer `SensorDefinition.__init__`",
                        category=dg.BetaWarning)

defs = dg.Definitions(
    assets=all_assets,
    jobs=all_jobs,
    schedules=all_schedules,
    sensors=all_sensors,
    resources=resources_for_environment(),
    executor=DEFAULT_EXECUTOR,
)
