"""`statistics_refresh_sensor`: evaluates the statistics views' automation condition
(`maestro_pipelines.assets.upkeep.STATISTICS_AUTOMATION`) and refreshes them after a tenant's
deployment or batch predictions change. Named rather than Dagster's implicit default sensor
so its default status follows the other automation: RUNNING in production, STOPPED on the
embedded default."""

import dagster as dg

from maestro_pipelines.environment import AUTOMATION_ON_BY_DEFAULT
from maestro_pipelines.assets.upkeep import model_statistics, tenant_usage_statistics

statistics_refresh_sensor = dg.AutomationConditionSensorDefinition(
    "statistics_refresh_sensor",
    target=dg.AssetSelection.assets(model_statistics, tenant_usage_statistics),
    default_status=dg.DefaultSensorStatus.RUNNING if AUTOMATION_ON_BY_DEFAULT else dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Refreshes model_statistics and tenant_usage_statistics after deployments or predictions change.",
)

upkeep_sensors = [statistics_refresh_sensor]
