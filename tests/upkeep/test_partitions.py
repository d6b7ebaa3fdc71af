"""Prediction partitions: created ahead, strays moved out of the default partition, old ones
archived to the object store and only then dropped."""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timezone

import pytest
import zstandard

from maestro_pipelines.platform_db.upkeep import (
    UpkeepError,
    archive_key,
    archive_manifest_key,
    archive_old_partitions,
    ensure_partitions,
    partition_name,
)

TODAY = date(2026, 11, 27)


def partitions(platform) -> list[str]:
    with platform.connect() as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'predictions'::regclass"
        ).fetchall())


def at(year: int, month: int, day: int = 15) -> datetime:
    return datetime(year, month, day, 12, tzinfo=timezone.utc)


def test_partitions_are_created_ahead_with_the_tables_indexes(platform):
    ensure_partitions(platform.url, months_ahead=3, today=TODAY)

    names = partitions(platform)
    for month in (date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1), date(2027, 2, 1)):
        assert partition_name(month) in names
    # Attached tables get every index defined on the parent (primary key included).
    with platform.connect() as conn:
        indexes = {r[0] for r in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s", [partition_name(date(2027, 2, 1))]
        ).fetchall()}
    assert any("(id, created_at)" in d and "UNIQUE" in d for d in indexes), indexes
    assert any("(tenant_id, created_at DESC)" in d for d in indexes), indexes
    again = ensure_partitions(platform.url, months_ahead=3, today=TODAY)
    assert again.created == []


def test_stray_rows_move_out_of_the_default_partition(platform):
    """Rows written for a month without a partition land in the default one; upkeep gives
    that month a partition and moves them in, none lost, none left behind."""
    platform.add_predictions("acme", [at(2027, 9), at(2027, 9, 30), at(2028, 1, 1)])
    assert platform.scalar("SELECT count(*) FROM predictions_default") == 3

    report = ensure_partitions(platform.url, months_ahead=1, today=TODAY)

    assert report.moved_from_default == {"predictions_y2027m09": 2, "predictions_y2028m01": 1}
    assert report.left_in_default == 0
    assert platform.scalar("SELECT count(*) FROM predictions_default") == 0
    assert platform.scalar("SELECT count(*) FROM predictions_y2027m09") == 2
    assert platform.scalar("SELECT count(*) FROM predictions WHERE tenant_id = (SELECT id FROM tenants WHERE name = 'acme')") == 3


def test_a_long_reader_makes_partition_upkeep_give_up_without_a_trace(platform):
    """ATTACH needs an exclusive lock on the default partition for a moment; behind a reader
    in a long transaction, upkeep gives up after lock_timeout with the reason, creating
    nothing, instead of queueing every other query behind it. Next time it goes through."""
    platform.add_predictions("acme", [at(2027, 9)])
    reader = platform.connect(autocommit=False)
    try:
        reader.execute("SELECT count(*) FROM predictions")
        with pytest.raises(UpkeepError, match="long transaction"):
            ensure_partitions(platform.url, months_ahead=0, today=TODAY, lock_timeout="300ms")
    finally:
        reader.rollback()
        reader.close()
    assert "predictions_y2027m09" not in partitions(platform)
    assert platform.scalar("SELECT count(*) FROM predictions_default") == 1

    assert ensure_partitions(platform.url, months_ahead=0, today=TODAY).moved_from_default == {"predictions_y2027m09": 1}


def read_archive(store, key: str) -> list[dict]:
    with store.open_read(key) as raw:
        data = zstandard.ZstdDecompressor().stream_reader(raw).read()
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def test_old_partitions_are_archived_with_every_row_then_dropped(platform):
    """Predictions older than the 13-month retention: the partition's rows (an entity key with
    a comma, a quote and a newline included) are in the store, checked, with a manifest;
    the partition is gone; the months inside the retention stay."""
    platform.add_predictions("acme", [at(2025, 3), at(2025, 3, 20)], ["plain", 'odd, "key"\nwith a newline'])
    platform.add_predictions("globex", [at(2025, 11)])
    ensure_partitions(platform.url, months_ahead=0, today=TODAY)
    assert {"predictions_y2025m03", "predictions_y2025m11"} <= set(partitions(platform))
    store = platform.store()

    report = archive_old_partitions(platform.url, store, retention_months=13, today=TODAY)

    assert [(a["partition"], a["rows"]) for a in report.archived] == [("predictions_y2025m03", 2)]
    assert "predictions_y2025m03" not in partitions(platform)
    assert "predictions_y2025m11" in partitions(platform), "the 13th month back is kept"
    rows = read_archive(store, archive_key(date(2025, 3, 1)))
    assert sorted(r["entity_key"] for r in rows) == sorted(["plain", 'odd, "key"\nwith a newline'])
    assert {r["created_at"][:10] for r in rows} == {"2025-03-15", "2025-03-20"}
    manifest = json.loads(store.get_bytes(archive_manifest_key(date(2025, 3, 1))))
    assert manifest["rows"] == 2 and manifest["sha256"] == store.head(archive_key(date(2025, 3, 1))).sha256
    assert platform.scalar("SELECT count(*) FROM predictions") == 1


def test_an_unreachable_store_archives_nothing_and_drops_nothing(platform):
    """The store does not answer: the old partition and its rows stay, no manifest exists."""
    from maestro_pipelines.storage import open_store
    from tests.services import free_port
    from tests.stores.conftest import AWS, FAST_RETRY

    platform.add_predictions("acme", [at(2025, 2)])
    ensure_partitions(platform.url, months_ahead=0, today=TODAY)
    dead = open_store("s3://nowhere/maestro", endpoint_url=f"http://127.0.0.1:{free_port()}", retry=FAST_RETRY, **AWS)

    with pytest.raises(Exception) as failed:
        archive_old_partitions(platform.url, dead, retention_months=13, today=TODAY)

    assert "127.0.0.1" in str(failed.value) or "store" in str(failed.value).lower()
    assert "predictions_y2025m02" in partitions(platform)
    assert platform.scalar("SELECT count(*) FROM predictions_y2025m02") == 1


def test_a_retention_that_would_drop_this_month_is_refused(platform):
    with pytest.raises(UpkeepError, match="at least 1 month"):
        archive_old_partitions(platform.url, platform.store(), retention_months=0, today=TODAY)
