"""The two-level cache against a real redis-server: hits per level, bounds, TTL in both
levels, prefix deletion, and Redis dying mid-run. Nothing here mocks Redis."""

from __future__ import annotations

import pickle
import time

import dagster as dg
import pytest
from pydantic import ValidationError

from maestro_pipelines.cache import LRUStore, TwoLevelCache, describe_redis, redis_client
from maestro_pipelines.environment import resources_for_environment
from maestro_pipelines.resources import CacheResource
from maestro_pipelines.settings import Settings
from tests.services import free_port


class Clock:
    """A clock the test moves by hand (level 1's TTL without sleeping)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRedis:
    """The real client, counting round trips (commands and pipeline executions)."""

    def __init__(self, client):
        self._client = client
        self.round_trips = 0

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name == "pipeline":
            def pipeline(*args, **kwargs):
                pipe = attribute(*args, **kwargs)
                original = pipe.execute

                def execute(*a, **k):
                    self.round_trips += 1
                    return original(*a, **k)

                pipe.execute = execute
                return pipe
            return pipeline
        if callable(attribute):
            def call(*args, **kwargs):
                self.round_trips += 1
                return attribute(*args, **kwargs)
            return call
        return attribute


def two_level(redis_server, warnings: list[str] | None = None, **kwargs) -> TwoLevelCache:
    return TwoLevelCache(redis_client(redis_server.url), redis_description=describe_redis(redis_server.url),
                         on_warning=(warnings.append if warnings is not None else None), **kwargs)


def test_lru_alone_hits_misses_and_counters():
    cache = TwoLevelCache(None)
    assert cache.redis_state == "off"
    assert cache.get("a") is None
    cache.set("a", {"x": 1})
    assert cache.get("a") == {"x": 1}
    assert cache.get_many(["a", "b"]) == {"a": {"x": 1}}
    counters = cache.counters()
    assert (counters.l1_hits, counters.l2_hits, counters.misses, counters.sets) == (2, 0, 2, 1)
    assert counters.hit_rate == 0.5 and counters.redis_errors == 0


def test_a_second_instance_reads_level_two_then_level_one(redis_server):
    writer = two_level(redis_server)
    writer.set("tenant:acme:v1:model", [1, 2, 3])
    raw = redis_server.client().get("maestro:tenant:acme:v1:model")
    assert raw is not None and pickle.loads(raw) == [1, 2, 3]  # under the namespace, pickled

    reader = two_level(redis_server)  # another process's view: its own, empty level 1
    assert reader.get("tenant:acme:v1:model") == [1, 2, 3]
    assert reader.get("tenant:acme:v1:model") == [1, 2, 3]
    assert reader.get("tenant:acme:v2:model") is None
    counters = reader.counters()
    assert (counters.l1_hits, counters.l2_hits, counters.misses) == (1, 1, 1)
    assert reader.redis_state == "up"


def test_level_two_serves_what_level_one_evicted(redis_server):
    cache = two_level(redis_server, max_items=2)
    for key in ("a", "b", "c"):
        cache.set(key, key.upper())
    assert cache.lru.keys() == ["b", "c"]
    assert cache.get("a") == "A"
    counters = cache.counters()
    assert counters.l2_hits == 1 and counters.l1_evictions >= 1


def test_lru_is_bounded_by_items_and_by_bytes():
    by_items = LRUStore(max_items=3, max_bytes=10**9)
    for key in "abcd":
        by_items.set(key, key, 60)
    assert by_items.keys() == ["b", "c", "d"] and by_items.evictions == 1
    by_items.get("b")  # recently used: survives the next eviction
    by_items.set("e", "e", 60)
    assert by_items.keys() == ["d", "b", "e"]

    by_bytes = LRUStore(max_items=1000, max_bytes=10_000)
    for i in range(10):
        by_bytes.set(f"k{i}", b"x" * 3000, 60)
    assert by_bytes.bytes_used <= 10_000 and len(by_bytes) == 3
    assert by_bytes.keys() == ["k7", "k8", "k9"]
    assert by_bytes.set("huge", b"x" * 20_000, 60) is False and by_bytes.get("huge", None) is None
    by_bytes.set("sized", object(), 60, size=9_000)  # an explicit size is respected
    assert by_bytes.keys() == ["sized"]


def test_ttl_expires_in_level_one():
    clock = Clock()
    cache = TwoLevelCache(None, ttl_seconds=10, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2, ttl_seconds=100)
    clock.now += 9.9
    assert cache.get("a") == 1
    clock.now += 0.2
    assert cache.get("a") is None and cache.get("b") == 2
    assert cache.counters().l1_expired == 1


def test_ttl_expires_in_redis_and_promotion_keeps_what_is_left(redis_server):
    # A 3 s TTL, not a fraction of a second: the reads below must come before Redis expires
    # the key, and on a loaded machine (the suite beside a CPU hog) a few calls can take 0.4 s.
    short_ttl = 3.0
    cache = two_level(redis_server, ttl_seconds=3600)
    cache.set("short", "value", ttl_seconds=short_ttl)
    cache.set("long", "value")
    client = redis_server.client()
    assert 0 < client.pttl("maestro:short") <= short_ttl * 1000
    assert 3_590_000 < client.pttl("maestro:long") <= 3_600_000

    clock = Clock()
    reader = two_level(redis_server, ttl_seconds=3600, clock=clock)
    assert reader.get("short") == "value"  # promoted with the TTL Redis had left, not an hour
    assert reader.lru._entries["short"].expires_at - clock.now <= short_ttl
    clock.now += short_ttl + 0.1
    assert reader.get("short") is None or client.pttl("maestro:short") > 0  # level 1 expired it

    deadline = time.monotonic() + 10 + short_ttl
    while client.pttl("maestro:short") != -2:  # -2: the key no longer exists
        assert time.monotonic() < deadline, "Redis did not expire the key"
        time.sleep(0.05)
    fresh = two_level(redis_server)
    assert fresh.get("short") is None and fresh.get("long") == "value"
    assert fresh.counters().misses == 1


def test_a_batch_is_one_round_trip(redis_server):
    counting = CountingRedis(redis_client(redis_server.url))
    writer = TwoLevelCache(counting)
    items = {f"p:{i:05d}": (str(i % 3), i / 10_000) for i in range(9_999)}
    writer.set_many(items)
    assert counting.round_trips == 1

    reader_client = CountingRedis(redis_client(redis_server.url))
    reader = TwoLevelCache(reader_client)
    found = reader.get_many(list(items) + ["p:missing"])  # 10,000 keys
    assert found == items
    assert reader_client.round_trips == 1
    counters = reader.counters()
    assert counters.l2_hits == 9_999 and counters.misses == 1


def test_delete_prefix_and_pattern_in_both_levels(redis_server):
    cache = two_level(redis_server)
    cache.set_many({f"tenant:acme:v1:p:{i}": i for i in range(1200)})  # several SCAN pages and UNLINK batches
    cache.set_many({"tenant:acme-eu:v1:model": "eu", "tenant:globex:v1:model": "g", "tenant:a*:x": "glob"})
    client = redis_server.client()
    client.set("other:tenant:acme:v1:p:1", b"not ours")

    removed = cache.delete_prefix("tenant:acme:")
    assert removed == 2 * 1200  # level 1 and Redis
    assert not [k for k in cache.lru.keys() if k.startswith("tenant:acme:")]
    assert list(client.scan_iter(match="maestro:tenant:acme:*")) == []
    assert cache.get("tenant:acme-eu:v1:model") == "eu" and cache.get("tenant:globex:v1:model") == "g"
    assert client.get("other:tenant:acme:v1:p:1") == b"not ours"

    assert cache.delete_prefix("tenant:a*") == 2  # '*' in a prefix is literal, not a glob
    assert cache.get("tenant:acme-eu:v1:model") == "eu"

    assert cache.delete_pattern("tenant:*:v1:model") == 4
    assert client.dbsize() == 1  # only the foreign key is left
    assert cache.delete("missing") == 0


def test_large_values_stay_in_process_and_corrupt_ones_are_misses(redis_server):
    cache = two_level(redis_server, l2_max_value_bytes=1000)
    cache.set("big", b"x" * 5000)
    cache.set("small", b"x" * 10)
    client = redis_server.client()
    assert client.exists("maestro:big") == 0 and client.exists("maestro:small") == 1
    assert cache.get("big") == b"x" * 5000 and cache.counters().l2_skipped_large == 1

    client.set("maestro:corrupt", b"not a pickle")
    reader = two_level(redis_server)
    assert reader.get("corrupt") is None
    assert client.exists("maestro:corrupt") == 0


def test_redis_killed_mid_run_degrades_to_level_one_with_one_warning(redis_server):
    warnings: list[str] = []
    cache = two_level(redis_server, warnings)
    started = time.monotonic()
    for i in range(60):
        if i == 20:
            redis_server.kill()
        cache.set(f"k{i}", i)
        cache.set_many({f"b{i}": i})
        assert cache.get(f"k{i}") == i
        assert cache.get_many([f"b{i}", "never"]) == {f"b{i}": i}
        if i > 20:
            assert cache.get(f"k{i - 10}") == i - 10  # level 1 still serves what it holds
        cache.delete_prefix(f"gone{i}")
    assert time.monotonic() - started < 15  # a dead Redis costs one timeout, not one per call
    assert len(warnings) == 1, warnings
    assert "unavailable" in warnings[0] and f"127.0.0.1:{redis_server.port}/0" in warnings[0]
    counters = cache.counters()
    assert counters.redis_errors >= 1 and cache.redis_state == "degraded"
    assert counters.l1_hits >= 60 and counters.misses >= 40


def test_a_redis_that_is_not_there_gives_an_lru_cache_and_one_warning(caplog):
    port = free_port()  # nothing listens here
    resource = CacheResource(redis_url=f"redis://:s3cret-pass@127.0.0.1:{port}/2")
    with caplog.at_level("WARNING", logger="maestro.cache"):
        cache = resource.cache()
        cache.set("a", 1)
        assert cache.get("a") == 1
    assert cache.redis_state == "degraded"
    messages = [r.getMessage() for r in caplog.records if r.name == "maestro.cache"]
    assert len(messages) == 1 and f"redis://127.0.0.1:{port}/2" in messages[0]
    assert "s3cret" not in messages[0] and "s3cret" not in resource.redis_location()


def test_cache_resource_fields_are_described_and_validated(tmp_path):
    for name, field in CacheResource.model_fields.items():
        assert field.description, f"CacheResource.{name} has no description"
    for bad in ({"lru_max_items": 0}, {"lru_max_mb": -1}, {"ttl_seconds": 0}, {"namespace": "a b"}):
        with pytest.raises((ValidationError, dg.DagsterInvalidConfigError, Exception)):
            CacheResource(**bad)

    assert resources_for_environment(Settings(home=tmp_path, database_url=None))["cache"].redis_url is None
    production = resources_for_environment(
        Settings(home=tmp_path, database_url=None, redis_url="redis://:hunter2@cache.internal:6380/1"))["cache"]
    assert isinstance(production.redis_url, dg.EnvVar) and production.redis_url == "MAESTRO_REDIS_URL"
    assert "hunter2" not in repr(production)
    assert describe_redis("rediss://u:hunter2@cache.internal:6380/1") == "rediss://cache.internal:6380/1"
