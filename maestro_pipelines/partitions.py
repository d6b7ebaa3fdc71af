"""Partition sets shared by assets, jobs, schedules and sensors."""

import dagster as dg

# One partition per active tenant, kept in sync with the `tenants` table by the tenant sensor
# (and by `maestro demo` / `maestro tenants add` when they run training themselves).
tenant_partitions = dg.DynamicPartitionsDefinition(name="tenants")
