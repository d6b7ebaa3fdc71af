"""Tenant partitions follow the `tenants` table; new data triggers retraining."""

import json
import time

import dagster as dg

from maestro_pipelines.jobs.ml import train_and_deploy_job
from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.resources import PlatformDatabase
from maestro_pipelines.resources.sources import DataSource

# Sensor evaluations must finish well under Dagster's 60 s limit.
FINGERPRINT_BUDGET_SECONDS = 40


@dg.sensor(
    name="tenant_partitions_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new active tenant and requests its first training; removes partitions of tenants no longer active.",
)
def tenant_partitions_sensor(context: dg.SensorEvaluationContext, platform_db: PlatformDatabase):
    from maestro_pipelines.platform_db.tenants import list_tenants

    with platform_db.get_connection() as conn:
        active = list_tenants(conn)
    existing = set(context.instance.get_dynamic_partitions(tenant_partitions.name))
    active_names = {t.name for t in active}
    # The cursor is the highest tenant id already handled: a tenant newer than it gets its
    # first training; an older one whose partition was removed by hand only gets it back.
    handled_up_to = int(context.cursor or 0)
    to_add = sorted(t.name for t in active if t.name not in existing)
    to_remove = sorted(existing - active_names)
    first_trainings = [
        dg.RunRequest(partition_key=t.name, run_key=f"first-training-{t.name}-{t.id}", tags={"maestro/trigger": "new-tenant"})
        for t in active
        if t.name in to_add and t.id > handled_up_to
    ]
    new_cursor = str(max([handled_up_to, *(t.id for t in active)]))
    if not to_add and not to_remove:
        return dg.SkipReason(f"{len(active)} active tenants, all with partitions")
    requests = []
    if to_add:
        requests.append(tenant_partitions.build_add_request(to_add))
    if to_remove:
        requests.append(tenant_partitions.build_delete_request(to_remove))
    return dg.SensorResult(run_requests=first_trainings, dynamic_partitions_requests=requests, cursor=new_cursor)


@dg.sensor(
    name="retraining_sensor",
    job=train_and_deploy_job,
    minimum_interval_seconds=300,
    description="Requests a tenant's training when its source data changes (row count or newest timestamp).",
)
def retraining_sensor(context: dg.SensorEvaluationContext, source: DataSource):
    state = json.loads(context.cursor) if context.cursor else {}
    seen: dict = state.get("seen", {})
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name))
    if not tenants:
        return dg.SkipReason("no tenant partitions yet")
    # Resume where the last evaluation stopped, so many tenants are covered over several ticks.
    start = state.get("next", 0) % len(tenants)
    order = tenants[start:] + tenants[:start]
    deadline = time.monotonic() + FINGERPRINT_BUDGET_SECONDS
    requests, checked = [], 0
    for tenant in order:
        if time.monotonic() > deadline:
            break
        fingerprint = source.tenant_fingerprint(tenant)
        current = [fingerprint.row_count, fingerprint.newest.isoformat() if fingerprint.newest else None]
        checked += 1
        previous = seen.get(tenant)
        seen[tenant] = current
        if previous is None or previous == current:
            continue  # first sight only records a baseline: the tenant sensor trains new tenants
        requests.append(
            dg.RunRequest(
                partition_key=tenant,
                run_key=f"retrain-{tenant}-{current[0]}-{current[1]}",
                tags={"maestro/trigger": "data-change"},
            )
        )
    cursor = json.dumps({"seen": {t: seen[t] for t in tenants if t in seen}, "next": (start + checked) % len(tenants)})
    if not requests:
        return dg.SensorResult(skip_reason=f"no data change in {checked} tenants", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
