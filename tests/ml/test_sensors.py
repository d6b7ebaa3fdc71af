"""Tenant and retraining sensors, evaluated with real databases and cursors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.sensors.tenants import retraining_sensor, tenant_partitions_sensor


def evaluate(sensor, ml_env, cursor=None, **resources):
    context = dg.build_sensor_context(instance=ml_env.instance, cursor=cursor, resources=resources)
    return sensor(context), context.cursor


def apply_partition_requests(ml_env, result):
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            ml_env.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                ml_env.instance.delete_dynamic_partition(request.partitions_def_name, key)


def test_a_new_tenant_gets_a_partition_and_its_first_training(ml_env):
    platform_db = ml_env.resources["platform_db"]
    # acme and globex already have partitions (the fixture added them): nothing to do.
    first, cursor = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db)
    assert isinstance(first, dg.SkipReason)

    ml_env.sql("INSERT INTO tenants (name) VALUES ('umbrella')")
    result, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=cursor, platform_db=platform_db)
    assert isinstance(result, dg.SensorResult)
    (added,) = result.dynamic_partitions_requests
    assert list(added.partition_keys) == ["umbrella"]
    (run,) = result.run_requests
    assert run.partition_key == "umbrella" and run.run_key.startswith("first-training-umbrella")
    apply_partition_requests(ml_env, result)
    assert "umbrella" in ml_env.instance.get_dynamic_partitions(tenant_partitions.name)

    again, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=result.cursor, platform_db=platform_db)
    assert isinstance(again, dg.SkipReason), "a tenant is trained once by this sensor, not every tick"

    ml_env.sql("UPDATE tenants SET status = 'deleted' WHERE name = 'globex'")
    removed, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=result.cursor, platform_db=platform_db)
    (delete,) = removed.dynamic_partitions_requests
    assert isinstance(delete, dg.DeleteDynamicPartitionsRequest) and list(delete.partition_keys) == ["globex"]
    assert not removed.run_requests


def test_a_partition_removed_by_hand_comes_back_without_retraining(ml_env):
    platform_db = ml_env.resources["platform_db"]
    _, cursor = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db)
    ml_env.instance.delete_dynamic_partition(tenant_partitions.name, "acme")
    result, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=cursor or "2", platform_db=platform_db)
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["acme"]
    assert not result.run_requests


def test_retraining_is_requested_when_a_tenants_data_change(ml_env):
    source = ml_env.resources["source"]
    baseline, _ = evaluate(retraining_sensor, ml_env, source=source)
    assert not baseline.run_requests, "first sight records fingerprints only"
    unchanged, _ = evaluate(retraining_sensor, ml_env, cursor=baseline.cursor, source=source)
    assert not unchanged.run_requests

    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    ml_env.sql(
        "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
        "SELECT tenant, entity_key || '-v2', features, label, :later FROM training_rows WHERE tenant = 'globex' LIMIT 3",
        later=later,
    )
    changed, _ = evaluate(retraining_sensor, ml_env, cursor=unchanged.cursor, source=source)
    (run,) = changed.run_requests
    assert run.partition_key == "globex" and run.tags["maestro/trigger"] == "data-change"
    settled, _ = evaluate(retraining_sensor, ml_env, cursor=changed.cursor, source=source)
    assert not settled.run_requests
