"""Retention of the physical tier on synthetic histories (pure planning, no store): a WAL
file a kept base backup needs is never expired, an incremental keeps its parents, nothing
goes between the newest verified base backup and now."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.base import BaseEntry
from maestro_pipelines.backup.retention import RetentionPolicy, plan_base_retention, plan_pitr_months
from tests.pitr.base_helpers import SYSTEM_ID, fake_record, segments

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)


def _history(rng: random.Random, days: int, chain_max: int) -> tuple[list[BaseEntry], list[str]]:
    """A nightly base backup for `days` days (a full one every `chain_max`), 4 segments a day;
    some verifications failed or never ran."""
    entries, parent = [], None
    for day in range(days):
        when = NOW - timedelta(days=days - day)
        base_id = f"{when:%Y%m%dT%H%M%SZ}-{day:06x}"
        kind = "full" if day % chain_max == 0 else "incremental"
        start = segments(day * 4 + 1, day * 4 + 1)[0]
        record = fake_record(base_id, start, start, when, kind, None if kind == "full" else parent)
        state = rng.choice([{"ok": True}] * 4 + [{"ok": False, "problems": ["damaged"]}, None])
        entries.append(BaseEntry(SYSTEM_ID, base_id, layout.base_root(SYSTEM_ID, base_id), record=record,
                                 verification=state))
        parent = base_id
    wal = segments(1, days * 4 + 3) + ["00000002.history"]
    return entries, wal


def _check_plan(entries: list[BaseEntry], wal: list[str], policy: RetentionPolicy) -> None:
    plan = plan_base_retention(SYSTEM_ID, entries, wal, policy, NOW)
    kept = {base_id for base_id, _ in plan.keep}
    by_id = {e.base_id: e for e in entries}
    assert kept.isdisjoint(base_id for base_id, _ in plan.delete)
    for base_id in kept:  # every kept incremental's chain is kept, and all WAL from its start on
        record = by_id[base_id].record
        assert record.parent is None or record.parent in kept, f"{base_id}'s parent {record.parent} deleted"
        needed = [n for n in wal if layout.SEGMENT.match(n) and layout.segment_number(n) >= layout.segment_number(record.start_wal)]
        assert not set(needed) & set(plan.delete_wal), f"WAL {base_id} needs expired"
    verified = [e for e in entries if e.verified]
    if verified:
        assert verified[-1].base_id in kept
    assert "00000002.history" not in plan.delete_wal
    newest = max(entries, key=lambda e: e.base_id)
    assert newest.base_id in kept


def test_retention_never_expires_wal_a_kept_base_backup_needs():
    rng = random.Random(16)
    for _ in range(200):
        entries, wal = _history(rng, rng.randint(1, 40), rng.randint(1, 8))
        policy = RetentionPolicy(base_kept=rng.randint(1, 6), base_max_age=rng.choice([None, timedelta(days=rng.randint(1, 10))]))
        _check_plan(entries, wal, policy)


def test_old_base_backups_and_their_wal_expire_incrementals_keep_parents():
    entries, wal = _history(random.Random(1), 20, 7)
    for entry in entries:
        entry.verification = {"ok": True}
    plan = plan_base_retention(SYSTEM_ID, entries, wal, RetentionPolicy(base_kept=3, base_max_age=None), NOW)
    kept = [base_id for base_id, _ in plan.keep]
    # The latest three are day 17, 18, 19: incrementals of the full of day 14, which is kept with its chain.
    assert sorted(kept) == sorted(e.base_id for e in entries[14:])
    assert plan.wal_cutoff == entries[14].record.start_wal
    assert plan.delete_wal == segments(1, 14 * 4)
    assert dict(plan.keep)[entries[15].base_id] == f"parent of {entries[19].base_id}"


def test_newest_verified_base_backup_is_kept_past_unverified_newer_ones():
    entries, wal = _history(random.Random(2), 10, 1)  # fulls only
    for n, entry in enumerate(entries):
        entry.verification = {"ok": True} if n == 2 else None
    plan = plan_base_retention(SYSTEM_ID, entries, wal, RetentionPolicy(base_kept=2, base_max_age=None), NOW)
    assert dict(plan.keep)[entries[2].base_id] == "newest verified base backup"
    assert plan.wal_cutoff == entries[2].record.start_wal


def test_no_base_backup_no_wal_expired():
    plan = plan_base_retention(SYSTEM_ID, [], segments(1, 50), RetentionPolicy(), NOW)
    assert plan.delete_wal == [] and plan.wal_cutoff is None


def test_pitr_monthly_archives_beyond_the_count_expire():
    assert plan_pitr_months(["2026-09", "2026-11", "2026-10"], RetentionPolicy(monthly=2)) == ["2026-09"]
