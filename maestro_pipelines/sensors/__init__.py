"""Sensors: tenant partitions, retraining on new data; backups' RPO breaches, failed backup runs
and verification of backups taken outside Dagster; what the CLI did to the store, recorded
as asset events (catalog.py); the statistics views' refresh."""

from maestro_pipelines.sensors.backups import backup_sensors
from maestro_pipelines.sensors.catalog import catalog_sensors
from maestro_pipelines.sensors.upkeep import upkeep_sensors
from maestro_pipelines.sensors.wal import wal_sensors
from maestro_pipelines.sensors.tenants import retraining_sensor, tenant_partitions_sensor

all_sensors = [tenant_partitions_sensor, retraining_sensor, *backup_sensors, *catalog_sensors, *wal_sensors, *upkeep_sensors]
