"""Sensors: tenant partitions, retraining on new data (RPO breach and run alerts come with backups)."""

from maestro_pipelines.sensors.tenants import retraining_sensor, tenant_partitions_sensor

all_sensors = [tenant_partitions_sensor, retraining_sensor]
