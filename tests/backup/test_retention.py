"""Retention and monthly archives: which backups are kept, that deletion never leaves a
half-deleted backup that still lists, that nothing is deleted while a backup or restore
runs, and that a month's archive is a verified backup that outlives the daily ones."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta, timezone

import pytest

from maestro_pipelines.backup import (
    BackupEntry,
    BackupError,
    BackupManifest,
    BackupNotFound,
    DatabaseTarget,
    RetentionPolicy,
    activity,
    apply_retention,
    archive_month,
    create_backup,
    get_backup,
    list_backups,
    plan_retention,
    verify_backup,
)
from maestro_pipelines.backup.manifest import MANIFEST_NAME, VERIFIED_NAME, VerificationRecord, backup_root, utcnow
from maestro_pipelines.storage.local import LocalObjectStore
from tests.backup.conftest import ARTIFACTS, keys
from tests.stores.conftest import FAST_RETRY

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def manifest_at(started: datetime) -> BackupManifest:
    return BackupManifest(
        backup_id=f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}", started_at=started,
        finished_at=started + timedelta(minutes=5), pg_dump_version="18.6",
        compression={"codec": "zstd", "level": 1, "threads": 2}, databases=[],
    )


def entry_at(started: datetime, verified: bool = False, month: str | None = None) -> BackupEntry:
    """A committed backup as listing sees it, without the store."""
    manifest = manifest_at(started)
    sha = hashlib.sha256(manifest.to_json()).hexdigest()
    verification = VerificationRecord(manifest.backup_id, sha, started + HOUR, 1, 1, 0.1) if verified else None
    return BackupEntry(manifest.backup_id, backup_root(manifest.backup_id, month), month, manifest, sha, verification)


def write_backup(store, started: datetime, verified: bool = False, month: str | None = None) -> str:
    """A committed backup (or archive) in the store with a chosen start time; returns its root."""
    manifest = manifest_at(started)
    root = backup_root(manifest.backup_id, month)
    store.put_bytes(f"{root}/platform.dump.zst", b"dump bytes " * 50)
    info = store.put_bytes(f"{root}/{MANIFEST_NAME}", manifest.to_json())
    if verified:
        record = VerificationRecord(manifest.backup_id, info.sha256, started + HOUR, 1, 1, 0.1)
        store.put_bytes(f"{root}/{VERIFIED_NAME}", record.to_json())
    return root


def ids(pairs) -> set[str]:
    return {entry.backup_id for entry, _why in pairs}


MIDNIGHT = datetime(2026, 11, 26, tzinfo=timezone.utc)


def test_keeps_the_newest_backup_of_each_of_the_last_7_days_with_backups_and_the_newest_verified():
    """Days without a backup do not use up the window; a day's older backups go; the newest
    verified backup stays even when it is older than the window, so there is always a
    known-good restore point."""
    days = [0, 1, 3, 4, 6, 7, 8, 9, 10, 12, 13]  # no backup 2, 5 and 11 days ago
    history = {(d, h): entry_at(MIDNIGHT - d * DAY + h * HOUR, verified=(d, h) == (12, 2))
               for d in days for h in (2, 10)}
    plan = plan_retention(list(history.values()), [], RetentionPolicy())

    newest_of_day = {history[(d, 10)].backup_id for d in [0, 1, 3, 4, 6, 7, 8]}
    assert ids(plan.keep) == newest_of_day | {history[(12, 2)].backup_id}
    assert ids(plan.delete) == {e.backup_id for e in history.values()} - ids(plan.keep)
    reasons = {entry.backup_id: why for entry, why in plan.keep}
    assert reasons[history[(12, 2)].backup_id] == "latest verified backup"
    assert plan.delete_incomplete == [] and plan.skipped is None


def test_the_newest_verified_backup_is_kept_beside_a_newer_one_of_its_day():
    """A verified backup is not deleted because an unverified one ran later the same day."""
    history = {(d, h): entry_at(MIDNIGHT - d * DAY + h * HOUR, verified=(d, h) == (3, 2))
               for d in range(10) for h in (2, 10)}
    plan = plan_retention(list(history.values()), [], RetentionPolicy(daily=7))
    assert ids(plan.keep) == {history[(d, 10)].backup_id for d in range(7)} | {history[(3, 2)].backup_id}


def test_keeps_the_12_newest_monthly_archives():
    archives = [entry_at(datetime(2025 + (m - 1) // 12, (m - 1) % 12 + 1, 28, 2, tzinfo=timezone.utc),
                         verified=True, month=f"{2025 + (m - 1) // 12}-{(m - 1) % 12 + 1:02d}") for m in range(1, 16)]
    plan = plan_retention([], archives, RetentionPolicy())
    assert sorted(e.month for e, _ in plan.keep) == [e.month for e in archives[3:]]
    assert sorted(e.month for e, _ in plan.delete) == ["2025-01", "2025-02", "2025-03"]


def test_apply_retention_deletes_from_the_store_but_never_while_a_backup_or_restore_runs(case):
    """What the plan deletes is gone from the store (every object of it), the rest is intact,
    unfinished backups are removed once stale, and a fresh activity marker stops any
    deletion: a restore reading an old backup never has it pulled away."""
    store = case.store
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    daily = {d: write_backup(store, today - d * DAY + 3 * HOUR, verified=d == 9) for d in range(10)}
    monthly = {m: write_backup(store, datetime(2025, m, 28, 2, tzinfo=timezone.utc), verified=True,
                               month=f"2025-{m:02d}")
               for m in range(1, 13)}
    monthly[13] = write_backup(store, datetime(2026, 1, 28, 2, tzinfo=timezone.utc), verified=True, month="2026-01")
    old_unfinished = backup_root(manifest_at(today - 2 * DAY).backup_id)
    store.put_bytes(f"{old_unfinished}/platform.dump.zst", b"killed")
    running = backup_root(manifest_at(utcnow()).backup_id)
    store.put_bytes(f"{running}/platform.dump.zst", b"in progress")
    store.put_bytes(f"{ARTIFACTS}1/model.pkl", b"model")
    everything = keys(store)

    with activity(store, "restore", "drill-7"):
        plan = apply_retention(store)
    assert "restore drill-7" in plan.skipped
    assert plan.delete == [] and keys(store) == everything

    plan = apply_retention(store)
    assert plan.skipped is None
    gone = [daily[7], daily[8], monthly[1], old_unfinished]
    assert sorted(e.root for e, _ in plan.delete) == sorted(gone[:3])
    assert plan.delete_incomplete == [old_unfinished]
    for root in gone:
        assert keys(store, root + "/") == []
    kept = [daily[d] for d in (0, 1, 2, 3, 4, 5, 6, 9)] + [monthly[m] for m in range(2, 14)]
    assert sorted(e.root for e in list_backups(store) + list_backups(store, monthly=True)) == sorted(kept)
    assert keys(store, running + "/") == [f"{running}/platform.dump.zst"], "a backup in progress was deleted"
    assert keys(store, ARTIFACTS) == [f"{ARTIFACTS}1/model.pkl"]
    assert all(e.verified for e in list_backups(store) if e.root == daily[9])


def test_retention_keeps_the_drill_history(tmp_path):
    """Drill records (drills/, from `maestro drill` and dr_drill) are the drill history, not
    backups: retention deletes old backups and leaves every drill record, however old."""
    from maestro_pipelines.backup.drill_history import DrillRecord, list_drills, new_drill_id, record_drill

    store = LocalObjectStore(tmp_path, retry=FAST_RETRY)
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    daily = [write_backup(store, today - d * DAY + 3 * HOUR, verified=True) for d in range(9)]
    for days in (400, 30, 1):
        started = today - days * DAY
        record_drill(store, DrillRecord(new_drill_id(started), "cli", started, True, 900.0, 93600.0, rto_s=8.0))
    drills = keys(store, "drills/")

    plan = apply_retention(store)

    assert sorted(e.root for e, _ in plan.delete) == sorted(daily[7:]), "retention had old backups to delete"
    assert keys(store, "drills/") == drills and len(list_drills(store).records) == 3


class CrashingStore(LocalObjectStore):
    """A local store whose process dies (an exception here) at its first deletion of a dump."""

    def delete(self, key: str) -> None:
        if key.endswith(".dump.zst"):
            raise KeyboardInterrupt("simulated crash")
        super().delete(key)


def test_retention_interrupted_mid_deletion_leaves_no_listed_half_backup(tmp_path):
    """Retention deletes a backup's manifest first: interrupted right after, the backup is
    already gone from listings and restores (never a listed backup with missing dumps), and
    the next run removes what is left."""
    (tmp_path / "store").mkdir()
    store = LocalObjectStore(tmp_path / "store", retry=FAST_RETRY)
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    roots = [write_backup(store, today - d * DAY + 3 * HOUR, verified=True) for d in range(8)]

    with pytest.raises(KeyboardInterrupt):
        apply_retention(CrashingStore(tmp_path / "store", retry=FAST_RETRY))
    assert roots[7] not in [e.root for e in list_backups(store)]
    assert keys(store, roots[7] + "/") == [f"{roots[7]}/platform.dump.zst"]
    with pytest.raises(BackupNotFound, match="never finished"):
        get_backup(store, roots[7].rsplit("/", 1)[1])

    plan = apply_retention(store)
    assert plan.delete_incomplete == [roots[7]]
    assert keys(store, roots[7] + "/") == []
    assert sorted(e.root for e in list_backups(store)) == sorted(roots[:7])


def small_backup(dbs, store):
    database = dbs.create()
    dbs.execute(database, "CREATE TABLE t (id int, v text)",
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    return create_backup(store, [DatabaseTarget("platform", dbs.url(database))])


def test_monthly_archive_is_the_newest_verified_backup_and_outlives_it(pg18_databases, case):
    """The archive of a month is the newest *verified* backup taken before the month ended,
    archiving twice makes one copy, a month without a verified backup is refused with a
    clear message, and the archived copy verifies on its own after the daily backup is gone."""
    store = case.store
    month = f"{utcnow():%Y-%m}"
    with pytest.raises(BackupError, match=f"No verified backup taken before the end of {month}"):
        archive_month(store, month)
    first = small_backup(pg18_databases, store)
    second = small_backup(pg18_databases, store)
    with pytest.raises(BackupError, match=f"No verified backup taken before the end of {month}"):
        archive_month(store, month)  # backups, but none verified
    assert verify_backup(store, first.backup_id).ok
    # The default month (the last one) on a store whose backups are all from this month: the
    # refusal names the month that can be archived.
    last_month = f"{utcnow().replace(day=1) - timedelta(days=1):%Y-%m}"
    with pytest.raises(BackupError, match=f"the first one is from {month}") as refused:
        archive_month(store, last_month)
    assert f"maestro backup archive --month {month}" in refused.value.hint

    archived, copied = archive_month(store, month)
    assert copied and (archived.backup_id, archived.month) == (first.backup_id, month)
    assert archived.verified
    source_root = f"backups/{first.backup_id}"
    for key in keys(store, source_root + "/"):
        copy = store.head(f"monthly/{month}/{first.backup_id}/{key.rsplit('/', 1)[1]}")
        assert (copy.size, copy.sha256) == (store.head(key).size, store.head(key).sha256)
    before = keys(store, "monthly/")
    again, copied = archive_month(store, month)
    assert (again.backup_id, copied) == (first.backup_id, False)
    assert keys(store, "monthly/") == before

    previous = f"{(utcnow().replace(day=1) - DAY):%Y-%m}"
    with pytest.raises(BackupError, match=f"before the end of {previous}"):
        archive_month(store, previous)  # every backup here was taken after that month
    with pytest.raises(BackupError, match="not a month"):
        archive_month(store, "2026-13")

    for key in keys(store, source_root + "/"):
        store.delete(key)
    report = verify_backup(store, first.backup_id, month=month)
    assert report.ok, report.problems
    [listed] = list_backups(store, monthly=True)
    assert (listed.backup_id, listed.verified) == (first.backup_id, True)
    assert [e.backup_id for e in list_backups(store)] == [second.backup_id]


def test_retention_keeps_an_intact_backup_when_the_newest_verified_one_lost_an_object(pg18_databases, case):
    """The newest verified backup's dump was deleted after its verification: retention no
    longer takes it for the good one, and keeps the older intact verified backup that the
    policy (one day) would otherwise have deleted as superseded."""
    store = case.store
    older = small_backup(pg18_databases, store)
    newer = small_backup(pg18_databases, store)
    for manifest in (older, newer):
        assert verify_backup(store, manifest.backup_id).ok
    store.delete(newer.database("platform").key)

    plan = apply_retention(store, RetentionPolicy(daily=1))
    assert (older.backup_id, "latest verified backup") in [(e.backup_id, why) for e, why in plan.keep]
    assert plan.delete == []
    assert [e.backup_id for e in list_backups(store)] == [older.backup_id, newer.backup_id]
