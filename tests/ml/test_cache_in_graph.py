"""The two-level cache inside the ML graph, with a real redis-server: the model and rows
already scored come from the cache on the next scoring, a new deployment drops the tenant's
entries, and a dead Redis only costs a warning."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from maestro_pipelines.cache import shared_lru
from maestro_pipelines.resources import CacheResource
from tests.cache.conftest import start_redis


@pytest.fixture
def redis_server(tmp_path_factory):
    yield from start_redis(tmp_path_factory)


@pytest.fixture
def cached_env(ml_env, redis_server):
    namespace = f"maestro-test-{uuid.uuid4().hex[:8]}"  # this test's own level 1 and keys
    ml_env.resources["cache"] = CacheResource(redis_url=redis_server.url, namespace=namespace)
    ml_env.namespace = namespace
    yield ml_env
    resource = ml_env.resources["cache"]
    shared_lru(namespace, resource.lru_max_items, int(resource.lru_max_mb * 1024 * 1024)).clear()


def scoring(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("batch_predictions")[0].metadata.items()}


def score_again(env):
    from maestro_pipelines.assets.ml import ml_assets

    result = dg.materialize(ml_assets, selection=["batch_predictions"], partition_key="acme",
                            instance=env.instance, resources=env.resources)
    assert result.success
    return result


def add_copies(env, suffix: str, count: int = 7) -> None:
    """`count` new acme rows whose features equal existing rows' (already scored ones)."""
    later = datetime.now(timezone.utc) + timedelta(minutes=5 + len(suffix))
    env.sql(
        "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
        f"SELECT tenant, entity_key || '{suffix}', features, label, :later FROM training_rows "
        "WHERE tenant = 'acme' AND entity_key NOT LIKE '%-copy%' ORDER BY entity_key LIMIT :n",
        later=later, n=count,
    )


def redis_keys(redis_server, pattern: str) -> list[str]:
    return sorted(k.decode() for k in redis_server.client().scan_iter(match=pattern, count=1000))


def forget_level_one(env) -> None:
    """What another process sees: Redis, but an empty in-process LRU."""
    resource = env.resources["cache"]
    shared_lru(env.namespace, resource.lru_max_items, int(resource.lru_max_mb * 1024 * 1024)).clear()


def test_the_next_scoring_serves_the_model_and_scored_rows_from_the_cache(cached_env, redis_server):
    env = cached_env
    (rows,), = env.sql("SELECT count(*) FROM training_rows WHERE tenant = 'acme'")
    first = env.run("acme")
    assert first.success
    scored = scoring(first)
    assert scored["model_from"] == "loaded" and scored["cache_redis"] == "up"
    assert scored["rows_predicted"] == rows and scored["rows_from_cache"] == 0
    live = env.registry().production_version("acme")
    prefix = f"{env.namespace}:tenant:acme:v1:{live.run_id}:"
    assert redis_keys(redis_server, prefix + "model") == [prefix + "model"]
    (distinct,), = env.sql("SELECT count(DISTINCT features_hash) FROM predictions")
    assert len(redis_keys(redis_server, prefix + "p:*")) == distinct

    add_copies(env, "-copy1")
    again = scoring(score_again(env))
    assert again["rows_scored"] == 7 and again["rows_from_cache"] == 7 and again["rows_predicted"] == 0
    assert again["model_from"] == "l1"  # same process: the loaded model object itself
    assert again["cache_l1_hits"] == 8 and again["cache_misses"] == 0 and again["cache_hit_rate"] == 1.0

    forget_level_one(env)
    add_copies(env, "-copy22")
    other = scoring(score_again(env))
    assert other["model_from"] == "l2" and other["rows_from_cache"] == 7 and other["rows_predicted"] == 0
    assert other["cache_l2_hits"] == 8 and other["cache_l1_hits"] == 0 and other["cache_l2_hit_rate"] == 1.0

    # Served from the cache means the same prediction the model gave the original row.
    mismatched = env.sql(
        "SELECT c.entity_key FROM predictions c JOIN predictions o "
        "ON o.entity_key = regexp_replace(c.entity_key, '-copy[0-9]+$', '') "
        "WHERE c.entity_key LIKE '%-copy%' AND (c.label, c.score, c.features_hash) "
        "IS DISTINCT FROM (o.label, o.score, o.features_hash)")
    assert mismatched == []
    (copies,), = env.sql("SELECT count(*) FROM predictions WHERE entity_key LIKE '%-copy%'")
    assert copies == 14


def test_a_new_deployment_or_a_rollback_invalidates_the_tenants_entries(cached_env, redis_server):
    env = cached_env
    assert env.run("acme").success
    v1 = env.registry().production_version("acme")
    client = redis_server.client()
    client.set(f"{env.namespace}:tenant:globex:v1:run:model", b"\x80\x04K\x01.")  # another tenant's entry
    assert redis_keys(redis_server, f"{env.namespace}:tenant:acme:v1:*")

    second = env.run("acme")
    assert second.success
    deployed = second.asset_materializations_for_node("deployment")[0].metadata
    assert deployed["production_version"].value == 2 and deployed["cache_invalidated"].value > 0
    assert redis_keys(redis_server, f"{env.namespace}:tenant:acme:v1:*") == []
    assert client.exists(f"{env.namespace}:tenant:globex:v1:run:model") == 1
    scored = scoring(second)
    (rows,), = env.sql("SELECT count(*) FROM training_rows WHERE tenant = 'acme'")
    assert scored["model_version"] == 2 and scored["model_from"] == "loaded"
    assert scored["rows_predicted"] == rows and scored["rows_from_cache"] == 0
    v2 = env.registry().production_version("acme")
    assert v2.run_id != v1.run_id
    assert redis_keys(redis_server, f"{env.namespace}:tenant:acme:v2:{v2.run_id}:model")

    # Rolling back moves the alias too: the tenant's entries go, other tenants' stay.
    rolled = env.run("acme", job="rollback_deployment",
                     run_config={"ops": {"roll_back_deployment": {"config": {"tenant": "acme"}}}})
    assert rolled.success
    [event] = [e for e in rolled.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert event.event_specific_data.materialization.metadata["cache_invalidated"].value > 0
    assert redis_keys(redis_server, f"{env.namespace}:tenant:acme:*") == []
    assert client.exists(f"{env.namespace}:tenant:globex:v1:run:model") == 1


def test_a_dead_redis_costs_a_warning_not_the_run(cached_env, redis_server):
    env = cached_env
    redis_server.kill()
    result = env.run("acme")
    assert result.success
    scored = scoring(result)
    assert scored["cache_redis"] == "degraded" and scored["cache_redis_errors"] >= 1
    assert scored["model_from"] == "loaded" and scored["rows_from_cache"] == 0
    assert scored["cache_redis_at"] == f"redis://127.0.0.1:{redis_server.port}/0"
    warnings = [
        e for e in env.instance.all_logs(result.run_id)
        if e.step_key == "batch_predictions" and e.level == 30 and "Redis cache at" in (e.user_message or "")
    ]
    assert len(warnings) == 1 and "in-process cache only" in warnings[0].user_message

    add_copies(env, "-copy1")
    again = scoring(score_again(env))  # the level 1 of this process still serves
    assert again["model_from"] == "l1" and again["rows_from_cache"] == 7
