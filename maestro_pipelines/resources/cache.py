"""`CacheResource`: the two-level cache (`maestro_pipelines.cache`) as a Dagster resource.

Level 1 is an in-process LRU shared by the runs of one process; level 2 is Redis when
MAESTRO_REDIS_URL is set. The URL may carry a password: it is passed as `dg.EnvVar`, marked
secret, and only `scheme://host:port/db` is ever logged or shown.
"""

from __future__ import annotations

import logging
from typing import Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.resources.secret_fields import SECRET_FIELD


class CacheResource(dg.ConfigurableResource):
    """An in-process LRU in front of Redis (optional); Redis failures degrade, never fail a run."""

    redis_url: Optional[str] = Field(
        default=None,
        description=(
            "Redis URL (redis://, rediss:// or unix://), set from the MAESTRO_REDIS_URL environment variable; "
            "it may hold a password, so it never shows in the UI or the logs. Empty: the in-process LRU works alone."
        ),
        json_schema_extra=SECRET_FIELD,
    )
    lru_max_items: int = Field(default=200_000, gt=0, description="Most entries the in-process LRU holds.")
    lru_max_mb: float = Field(default=256.0, gt=0, description="Approximate memory bound of the in-process LRU, in MiB.")
    ttl_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0,
        description="Lifetime of an entry in both levels (Redis SET ... PX), in seconds.",
    )
    l2_max_value_mb: float = Field(
        default=64.0, gt=0,
        description="Values whose pickle is larger (a huge model) are kept in process only, not in Redis. In MiB.",
    )
    namespace: str = Field(
        default="maestro", pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="Prefix of every Redis key (`<namespace>:...`). Only Maestro may write under it: values are pickles.",
    )

    def redis_location(self) -> str:
        """scheme://host:port/db of the configured Redis (no credentials), or `none`."""
        from maestro_pipelines.cache import describe_redis

        return describe_redis(self.redis_url)

    def cache(self, log: Optional[logging.Logger] = None):
        """A `TwoLevelCache` with fresh counters over this process's shared LRU. A Redis that
        is unreachable now gives one warning and an LRU-only cache."""
        from maestro_pipelines.cache import TwoLevelCache, redis_client, shared_lru

        max_bytes = int(self.lru_max_mb * 1024 * 1024)
        client = redis_client(self.redis_url) if self.redis_url else None
        cache = TwoLevelCache(
            client,
            lru=shared_lru(self.namespace, self.lru_max_items, max_bytes),
            namespace=self.namespace,
            ttl_seconds=self.ttl_seconds,
            l2_max_value_bytes=int(self.l2_max_value_mb * 1024 * 1024),
            redis_description=self.redis_location(),
            on_warning=(log or logging.getLogger("maestro.cache")).warning,
        )
        if client is not None:
            cache.ping()  # learn now whether Redis is there (a failure is the one warning)
        return cache

    def invalidate_tenant(self, tenant: str, log: Optional[logging.Logger] = None) -> int:
        """Drop everything cached for `tenant` (models, predictions) in both levels, after its
        `production` alias moved; return how many entries went. Redis being down only costs a
        warning (the keys also carry the version)."""
        from maestro_pipelines.ml.scoring import tenant_cache_prefix

        cached = self.cache(log)
        try:
            invalidated = cached.delete_prefix(tenant_cache_prefix(tenant))
        finally:
            cached.close()
        (log or logging.getLogger("maestro.cache")).info(
            f"cache: {invalidated} entries of {tenant} invalidated (redis {cached.redis_state})"
        )
        return invalidated
