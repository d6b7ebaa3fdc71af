"""A two-level cache: a bounded in-process LRU (level 1) in front of an optional Redis (level 2).

No Dagster here: `resources/cache.py` wraps it, the ML scoring code uses it directly.

- **Level 1** (`LRUStore`): thread-safe, bounded by item count *and* approximate bytes, with a
  TTL per entry; the least recently used entries go first. It holds the Python objects
  themselves (a loaded model is served without deserializing it).
- **Level 2** (Redis, optional): every key lives under a namespace prefix (`maestro:` by
  default); values are `pickle`d and written with `SET ... PX <ttl>` so they expire in Redis
  exactly as they do in memory. A level-2 hit is promoted to level 1 with the TTL Redis has
  left. Batches (`get_many`/`set_many`) are one pipeline per 10,000 keys: one round trip.
- **Pickle is safe here only because Maestro alone writes this namespace**: unpickling runs
  code chosen by whoever wrote the bytes, so never point `MAESTRO_REDIS_URL` at a Redis (or a
  namespace) that other, less trusted programs write to. A value that fails to unpickle (an
  incompatible library version, say) is a miss, and is deleted.
- **Redis failures never raise.** The first error (connection refused, timeout, a server
  that went away mid-run, an error reply) logs one warning, marks Redis unavailable, and the
  cache carries on with level 1 alone for the rest of its life (one run). Sockets time out
  after about a second and the client does not retry, so a dead Redis costs at most one
  timeout, not a stalled run.
- `delete_prefix`/`delete_pattern` remove keys from both levels; in Redis with `SCAN MATCH`
  and `UNLINK` in batches (never `KEYS`, which blocks the server).
"""

from __future__ import annotations

import fnmatch
import logging
import pickle
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("maestro.cache")

DEFAULT_NAMESPACE = "maestro"
PIPELINE_CHUNK = 10_000  # keys per Redis round trip in get_many / set_many
SCAN_COUNT = 1_000       # SCAN's COUNT hint
UNLINK_BATCH = 500       # keys per UNLINK
CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 1.0
_MISSING = object()


@dataclass
class CacheStats:
    """What the cache did, per level. `hit_rate` counts both levels' hits over all lookups."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    sets: int = 0
    redis_errors: int = 0
    l1_evictions: int = 0
    l1_expired: int = 0
    l2_skipped_large: int = 0
    """values written to level 1 only because their pickled size passed `l2_max_value_bytes`"""

    @property
    def lookups(self) -> int:
        return self.l1_hits + self.l2_hits + self.misses

    @property
    def hit_rate(self) -> float:
        return (self.l1_hits + self.l2_hits) / self.lookups if self.lookups else 0.0

    @property
    def l1_hit_rate(self) -> float:
        return self.l1_hits / self.lookups if self.lookups else 0.0

    @property
    def l2_hit_rate(self) -> float:
        """Share of all lookups served by Redis (those level 1 did not have)."""
        return self.l2_hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "l1_hits": self.l1_hits, "l2_hits": self.l2_hits, "misses": self.misses, "sets": self.sets,
            "redis_errors": self.redis_errors, "l1_evictions": self.l1_evictions, "l1_expired": self.l1_expired,
            "l2_skipped_large": self.l2_skipped_large, "hit_rate": round(self.hit_rate, 4),
            "l1_hit_rate": round(self.l1_hit_rate, 4), "l2_hit_rate": round(self.l2_hit_rate, 4),
        }


def approximate_size(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of a value's memory in bytes (exact for bytes and numpy arrays)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) + 33
    if isinstance(value, str):
        return len(value) + 49
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes + 112
    if _depth < 3 and isinstance(value, (tuple, list, set, frozenset)):
        return sys.getsizeof(value) + sum(approximate_size(v, _depth + 1) for v in value)
    if _depth < 3 and isinstance(value, dict):
        return sys.getsizeof(value) + sum(approximate_size(k, _depth + 1) + approximate_size(v, _depth + 1)
                                          for k, v in value.items())
    return sys.getsizeof(value)


@dataclass
class _Entry:
    value: Any
    size: int
    expires_at: float


class LRUStore:
    """Thread-safe LRU bounded by item count and approximate bytes, with per-entry expiry.

    `clock` (seconds, monotonic) is injectable so tests control time.
    """

    def __init__(self, max_items: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        if max_items <= 0 or max_bytes <= 0:
            raise ValueError("max_items and max_bytes must be positive")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.evictions = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            if entry.expires_at <= self.clock():
                self._remove(key)
                self.expired += 1
                return default
            self._entries.move_to_end(key)
            return entry.value

    def set(self, key: str, value: Any, ttl_seconds: float, size: int | None = None) -> bool:
        """Store `value` for `ttl_seconds`; False when it alone is larger than the byte bound."""
        size = approximate_size(value) if size is None else size
        with self._lock:
            if key in self._entries:
                self._remove(key)
            if size > self.max_bytes or ttl_seconds <= 0:
                return False
            self._entries[key] = _Entry(value, size, self.clock() + ttl_seconds)
            self._bytes += size
            while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self.evictions += 1
            return True

    def delete(self, keys: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for key in list(keys) if self._remove(key))

    def delete_where(self, predicate: Callable[[str], bool]) -> int:
        with self._lock:
            return self.delete([k for k in self._entries if predicate(k)])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True


def describe_redis(url: str | None) -> str:
    """Where a Redis URL points, for logs and metadata: scheme://host:port/db, never credentials."""
    if not url:
        return "none"
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        db = (parts.path or "/0").strip("/") or "0"
        return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"
    except ValueError:
        return "(unparsable Redis URL)"


def redis_client(url: str, connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S):
    """A redis-py client for `url` with short timeouts and no retries (a dead Redis costs one
    timeout, then the cache stops asking it). Needs the `redis` extra."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        from maestro_pipelines.errors import MaestroError

        raise MaestroError("MAESTRO_REDIS_URL is set but the redis package is not installed",
                           "pip install 'maestro-pipelines[redis]'") from None
    return redis.Redis.from_url(
        url, socket_connect_timeout=connect_timeout, socket_timeout=read_timeout,
        retry=Retry(NoBackoff(), 0), health_check_interval=0, client_name="maestro-cache",
    )


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # no redis package: only OSError can come from anywhere
        return (OSError,)
    return (RedisError, OSError)


def _glob_escape(text: str) -> str:
    """`text` with Redis glob metacharacters escaped, so it matches itself literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class TwoLevelCache:
    """get/set/get_many/set_many/delete/delete_prefix over an `LRUStore` and optional Redis.

    Keys given by callers are relative: the cache puts them under `namespace:` in Redis.
    `on_warning` receives the one warning written when Redis fails (default: `logging`).
    """

    def __init__(
        self,
        redis=None,
        *,
        lru: LRUStore | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        ttl_seconds: float = 3600.0,
        max_items: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        l2_max_value_bytes: int = 64 * 1024 * 1024,
        redis_description: str = "redis",
        on_warning: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.lru = lru if lru is not None else LRUStore(max_items, max_bytes, clock)
        self.redis = redis
        self.namespace = namespace.rstrip(":") + ":"
        self.ttl_seconds = ttl_seconds
        self.l2_max_value_bytes = l2_max_value_bytes
        self.redis_description = redis_description
        self.on_warning = on_warning or log.warning
        self.stats = CacheStats()
        self._evictions_at_start = self.lru.evictions
        self._expired_at_start = self.lru.expired
        self._redis_down = False
        self._lock = threading.Lock()
        self._errors = _redis_errors()

    # -- state -----------------------------------------------------------------------------
    @property
    def redis_state(self) -> str:
        """`off` (none configured), `up`, or `degraded` (failed during this cache's life)."""
        if self.redis is None:
            return "off"
        return "degraded" if self._redis_down else "up"

    @property
    def redis_usable(self) -> bool:
        return self.redis is not None and not self._redis_down

    def counters(self) -> CacheStats:
        """A copy of the counters, with level 1's evictions/expiries since this cache began."""
        with self._lock:
            snapshot = CacheStats(**{k: getattr(self.stats, k) for k in CacheStats.__dataclass_fields__})
        snapshot.l1_evictions = self.lru.evictions - self._evictions_at_start
        snapshot.l1_expired = self.lru.expired - self._expired_at_start
        return snapshot

    def ping(self) -> bool:
        """Whether Redis answers now (a failure degrades the cache like any other error)."""
        return bool(self._redis(lambda r: r.ping(), False))

    # -- single keys -----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        found = self.get_many([key])
        return found.get(key, default)

    def set(self, key: str, value: Any, ttl_seconds: float | None = None, *, l2: bool = True) -> None:
        self.set_many({key: value}, ttl_seconds, l2=l2)

    def delete(self, *keys: str) -> int:
        """Remove keys from both levels; returns how many level 1 held plus how many Redis held."""
        removed = self.lru.delete(keys)
        full = [self.namespace + k for k in keys]
        if full:
            removed += int(self._redis(lambda r: r.unlink(*full), 0) or 0)
        return removed

    # -- batches ---------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of `keys` (absent ones are left out): level 1, then one Redis
        pipeline (GET + PTTL per key) per 10,000 keys still missing."""
        found: dict[str, Any] = {}
        missing: list[str] = []
        for key in keys:
            value = self.lru.get(key)
            if value is _MISSING:
                missing.append(key)
            else:
                found[key] = value
        l1_hits = len(found)
        l2_hits = 0
        if missing and self.redis_usable:
            for start in range(0, len(missing), PIPELINE_CHUNK):
                chunk = missing[start:start + PIPELINE_CHUNK]
                replies = self._redis(lambda r: self._get_pipeline(r, chunk), None)
                if replies is None:
                    break  # Redis just failed: the rest are misses
                corrupt = []
                for key, (blob, pttl) in zip(chunk, replies):
                    if blob is None:
                        continue
                    try:
                        value = pickle.loads(blob)
                    except Exception:  # written by an incompatible version: treat as a miss
                        corrupt.append(key)
                        continue
                    found[key] = value
                    l2_hits += 1
                    remaining = pttl / 1000.0 if pttl and pttl > 0 else self.ttl_seconds
                    self.lru.set(key, value, min(remaining, self.ttl_seconds), size=len(blob))
                if corrupt:
                    self.delete(*corrupt)
        with self._lock:
            self.stats.l1_hits += l1_hits
            self.stats.l2_hits += l2_hits
            self.stats.misses += len(missing) - l2_hits
        return found

    def set_many(self, items: Mapping[str, Any], ttl_seconds: float | None = None, *, l2: bool = True) -> None:
        """Store every item in level 1 and (with `l2`) in Redis with `SET ... PX`, one pipeline
        per 10,000 items. Values whose pickle is larger than `l2_max_value_bytes` stay in level 1."""
        ttl = self.ttl_seconds if ttl_seconds is None else ttl_seconds
        if ttl <= 0:
            raise ValueError("ttl_seconds must be positive")
        write_l2 = l2 and self.redis_usable
        blobs: list[tuple[str, bytes]] = []
        skipped = 0
        for key, value in items.items():
            size = None
            if write_l2:
                blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                size = len(blob)
                if size <= self.l2_max_value_bytes:
                    blobs.append((key, blob))
                else:
                    skipped += 1
            self.lru.set(key, value, ttl, size=size)
        px = max(1, int(ttl * 1000))
        for start in range(0, len(blobs), PIPELINE_CHUNK):
            chunk = blobs[start:start + PIPELINE_CHUNK]
            if self._redis(lambda r: self._set_pipeline(r, chunk, px), None) is None:
                break
        with self._lock:
            self.stats.sets += len(items)
            self.stats.l2_skipped_large += skipped

    # -- invalidation ----------------------------------------------------------------------
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with `prefix` from both levels; returns the count removed
        (level 1 plus Redis)."""
        removed = self.lru.delete_where(lambda k: k.startswith(prefix))
        return removed + self._delete_matching_redis(_glob_escape(self.namespace + prefix) + "*")

    def delete_pattern(self, pattern: str) -> int:
        """Remove keys matching a Redis glob (`*`, `?`, `[abc]`) from both levels."""
        removed = self.lru.delete_where(lambda k: fnmatch.fnmatchcase(k, pattern))
        return removed + self._delete_matching_redis(_glob_escape(self.namespace) + pattern)

    def _delete_matching_redis(self, match: str) -> int:
        def scan_and_unlink(r) -> int:
            removed = 0
            batch: list[bytes] = []
            for key in r.scan_iter(match=match, count=SCAN_COUNT):
                batch.append(key)
                if len(batch) >= UNLINK_BATCH:
                    removed += r.unlink(*batch)
                    batch.clear()
            if batch:
                removed += r.unlink(*batch)
            return removed

        return int(self._redis(scan_and_unlink, 0) or 0)

    # -- Redis plumbing --------------------------------------------------------------------
    def _get_pipeline(self, r, keys: list[str]) -> list[tuple[bytes | None, int]]:
        pipe = r.pipeline(transaction=False)
        for key in keys:
            full = self.namespace + key
            pipe.get(full)
            pipe.pttl(full)
        replies = pipe.execute()
        return list(zip(replies[0::2], replies[1::2]))

    def _set_pipeline(self, r, blobs: list[tuple[str, bytes]], px: int) -> bool:
        pipe = r.pipeline(transaction=False)
        for key, blob in blobs:
            pipe.set(self.namespace + key, blob, px=px)
        pipe.execute()
        return True

    def _redis(self, call: Callable[[Any], Any], fallback: Any) -> Any:
        """Run `call(redis)`; on any Redis or socket error degrade to level 1 (one warning)."""
        if not self.redis_usable:
            return fallback
        try:
            return call(self.redis)
        except self._errors as exc:
            with self._lock:
                self.stats.redis_errors += 1
                first = not self._redis_down
                self._redis_down = True
            if first:
                self.on_warning(
                    f"Redis cache at {self.redis_description} is unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                    "continuing with the in-process cache only for the rest of this run"
                )
            return fallback

    def close(self) -> None:
        if self.redis is not None:
            try:
                self.redis.close()
            except Exception:  # closing a dead connection must not fail anything
                pass


_SHARED_LRUS: dict[tuple, LRUStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_lru(namespace: str, max_items: int, max_bytes: int) -> LRUStore:
    """One level-1 store per process and configuration: runs executed in the same process
    (in-process executor, `maestro demo`) share it, so a model loaded by one is reused by the next."""
    key = (namespace, max_items, max_bytes)
    with _SHARED_LOCK:
        store = _SHARED_LRUS.get(key)
        if store is None:
            store = _SHARED_LRUS[key] = LRUStore(max_items, max_bytes)
        return store
