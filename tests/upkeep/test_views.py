"""The statistics views: refreshed concurrently, so a reader in a long transaction neither
blocks the refresh nor is blocked by it (a plain refresh would be)."""

from __future__ import annotations

import psycopg
import pytest

from maestro_pipelines.platform_db.upkeep import UpkeepError, refresh_statistics_view


def test_refresh_goes_through_while_a_reader_holds_a_long_transaction(platform):
    """A dashboard reading tenant_usage_statistics in a long REPEATABLE READ transaction: the
    upkeep refresh completes under a short lock_timeout, the reader keeps its snapshot and
    can still read, and a new session sees the new counts. A plain REFRESH under the same
    lock_timeout gives up (that is the lock the reader would otherwise wait behind)."""
    from datetime import datetime, timezone

    refresh_statistics_view(platform.url, "tenant_usage_statistics")
    reader = platform.connect(autocommit=False)
    try:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        before = reader.execute("SELECT predictions FROM tenant_usage_statistics WHERE tenant_name = 'acme'").fetchone()[0]
        platform.add_predictions("acme", [datetime.now(timezone.utc)] * 5)

        result = refresh_statistics_view(platform.url, "tenant_usage_statistics", lock_timeout="2s")

        assert result.concurrently
        assert reader.execute("SELECT predictions FROM tenant_usage_statistics WHERE tenant_name = 'acme'").fetchone()[0] == before
        with platform.connect() as other:
            other.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute("REFRESH MATERIALIZED VIEW tenant_usage_statistics")
    finally:
        reader.rollback()
        reader.close()
    assert platform.scalar("SELECT predictions FROM tenant_usage_statistics WHERE tenant_name = 'acme'") == before + 5
    assert {r["tenant_name"] for r in result.rows} == {"acme", "globex", "initech"}
    assert result.row_count == 3


def test_a_view_never_populated_gets_one_plain_refresh_then_concurrent_ones(platform):
    with platform.connect() as conn:
        conn.execute("REFRESH MATERIALIZED VIEW model_statistics WITH NO DATA")

    first = refresh_statistics_view(platform.url, "model_statistics")
    second = refresh_statistics_view(platform.url, "model_statistics")

    assert not first.concurrently and second.concurrently
    assert [(r["tenant_name"], r["production_version"]) for r in second.rows] == [
        ("acme", 1), ("globex", 1), ("initech", 1)
    ]


def test_an_unknown_view_is_refused_by_name(platform):
    with pytest.raises(UpkeepError, match="'tenants' is not one of Maestro's statistics views"):
        refresh_statistics_view(platform.url, "tenants")
