"""Monthly archives: a server-side copy of the newest verified backup of a month into
`monthly/<YYYY-MM>/<backup_id>/`, manifest and verification record copied last (the same
commit rule as a backup: an archive without its manifest does not exist).

An encrypted backup's archive is the same bytes: sealed under the same data key, its manifest
with the same envelope and MAC, its verified.json naming that MAC; the archive's folder has
the backup's id, which the manifest must carry. So it lists, verifies and restores with the
key like the original, and a rekey rewraps it like any manifest."""

from __future__ import annotations

from datetime import datetime, timezone

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.catalog import BackupEntry, check_objects, list_backups
from maestro_pipelines.backup.create import remove_unfinished
from maestro_pipelines.backup.manifest import MANIFEST_NAME, MONTH, MONTHLY_PREFIX, VERIFIED_NAME, BackupError, utcnow
from maestro_pipelines.storage import ObjectStore


def month_end(month: str) -> datetime:
    year, number = (int(p) for p in month.split("-"))
    return datetime(year + number // 12, number % 12 + 1, 1, tzinfo=timezone.utc)


def check_archive_month(month: object, now: datetime | None = None) -> str:
    """`month` if it is a YYYY-MM month that has begun; a BackupError otherwise. A month still
    to come has no backups of its own: archiving it would file today's backup under it."""
    if not isinstance(month, str) or not MONTH.match(month):
        shown = month if not isinstance(month, str) or len(month) <= 20 else month[:20] + "..."
        raise BackupError(f"'{shown}' is not a month", "Write it as YYYY-MM, e.g. 2026-11")
    current = (now or utcnow()).strftime("%Y-%m")
    if month > current:
        raise BackupError(
            f"{month} has not begun yet (it is {current})",
            f"Archive this month or an earlier one, e.g. --month {current}",
        )
    return month


def archive_month(store: ObjectStore, month: str) -> tuple[BackupEntry, bool]:
    """Archive the newest verified backup taken before the end of `month` (YYYY-MM).
    Returns (archived entry, whether a copy was made now); idempotent."""
    check_archive_month(month)
    for existing in list_backups(store, monthly=True):
        if existing.month == month and existing.manifest is not None:
            return existing, False
    # Marked as running from the choice of the source on: retention must not delete it mid-copy.
    with activity(store, "archive", month):
        end = month_end(month)
        verified = [e for e in list_backups(store) if e.verified and e.started_at]
        candidates = [e for e in verified if e.started_at < end]
        if not candidates and verified:
            first = verified[0].started_at.strftime("%Y-%m")
            raise BackupError(
                f"No verified backup taken before the end of {month} to archive: the first one is from {first}",
                f"Archive a month from {first} on (`maestro backup archive --month {first}`)",
            )
        if not candidates:
            raise BackupError(
                f"No verified backup taken before the end of {month} to archive",
                "Run and verify a backup first (`maestro backup run`, then `maestro backup verify`)",
            )
        source = candidates[-1]
        # A server-side copy does not read the bytes: an archive of a backup whose objects
        # changed since its verification would be listed as verified. Refused before copying.
        damage = check_objects(store, source)
        if damage is not None:
            raise BackupError(
                f"Backup {source.backup_id}, the latest verified one of {month}, is damaged: {damage}",
                f"Run `maestro backup verify {source.backup_id}` (it is then listed as BAD), then archive again",
            )
        dest = f"{MONTHLY_PREFIX}/{month}/{source.backup_id}"
        names = sorted(i.key.rsplit("/", 1)[-1] for i in store.list(source.root + "/", with_metadata=False))
        try:
            for name in names:
                if name not in (MANIFEST_NAME, VERIFIED_NAME):
                    store.copy(f"{source.root}/{name}", f"{dest}/{name}")
            store.copy(f"{source.root}/{MANIFEST_NAME}", f"{dest}/{MANIFEST_NAME}")
            store.copy(f"{source.root}/{VERIFIED_NAME}", f"{dest}/{VERIFIED_NAME}")
        except BaseException:
            # A failed copy (a corrupt source object, the store erroring) leaves no partial
            # archive: removed now, manifest first; what the store refuses, retention sweeps.
            remove_unfinished(store, dest)
            raise
    archived = [e for e in list_backups(store, monthly=True) if e.root == dest]
    return archived[0], True


# ---- the physical tier (issue 16) --------------------------------------------------------


def archive_base_backups(store: ObjectStore, month: str) -> list[tuple[str, str, bool]]:
    """For each server: its newest verified, usable base backup finished before the end of
    `month`, with its chain and the WAL from its start to its stop (what makes it consistent),
    copied server-side under `monthly/<month>/pitr/<system_id>/`; base.json of each chain
    member copied after its objects, the newest's last. Returns (system_id, base_id, copied
    now) per server archived; idempotent."""
    from maestro_pipelines.backup.pitr.window import recovery_window, servers_in_store

    check_archive_month(month)
    archived = []
    end = month_end(month)
    with activity(store, "archive", f"{month}-pitr"):
        for system_id in servers_in_store(store):
            window = recovery_window(store, system_id)
            by_id = {b.base_id: b for b in window.bases}
            candidates = [by_id[b] for b in window.usable if by_id[b].verified and by_id[b].record.finished_at < end]
            if candidates:
                archived.append(_archive_base(store, month, candidates[-1]))
    return archived


def _archive_base(store: ObjectStore, month: str, entry) -> tuple[str, str, bool]:
    from maestro_pipelines.backup.pitr import layout
    from maestro_pipelines.backup.pitr.base import BASE_VERIFIED, base_chain, remove_base_folder

    record = entry.record
    dest_root = layout.base_root(record.system_id, record.base_id, month)
    if store.exists(f"{dest_root}/{layout.BASE_RECORD}"):
        return record.system_id, record.base_id, False
    chain = base_chain(store, record)
    copied: list[str] = []
    try:
        name, key_ids = record.start_wal, set()
        while True:  # the WAL first: an archive with base.json but without its WAL would be unusable
            source = layout.wal_key(record.system_id, name)
            key_ids.add(store.head(source).metadata.get(layout.WAL_KEY_ID_KEY))
            store.copy(source, layout.wal_key(record.system_id, name, month))
            copied.append(layout.wal_key(record.system_id, name, month))
            if name == record.stop_wal:
                break
            name = layout.next_segment(name, record.wal_segment_size)
        copied += _copy_key_records(store, record.system_id, key_ids - {None}, month)
        for member in chain:
            src, dst = (layout.base_root(member.system_id, member.base_id, m) for m in (None, month))
            for object_name in (layout.BASE_TAR, layout.PG_MANIFEST, BASE_VERIFIED, layout.BASE_RECORD):
                if object_name == BASE_VERIFIED and not store.exists(f"{src}/{object_name}"):
                    continue
                store.copy(f"{src}/{object_name}", f"{dst}/{object_name}")
    except BaseException:
        for member in chain:
            remove_base_folder(store, layout.base_root(member.system_id, member.base_id, month))
        for key in copied:
            try:
                store.delete(key)
            except Exception:
                pass
        raise
    return record.system_id, record.base_id, True


def _copy_key_records(store: ObjectStore, system_id: str, key_ids: set[str], month: str) -> list[str]:
    """The WAL key records whose data keys sealed the WAL copied (sealed WAL without its key
    record cannot be read): the archive's copies, under its own pitr/<system_id>/keys/."""
    from maestro_pipelines.backup.pitr import layout
    from maestro_pipelines.backup.pitr.walkeys import key_records

    found = {r.key_id: r for r in key_records(store, system_id) if r.key_id in key_ids}
    missing = sorted(key_ids - set(found))
    if missing:
        raise BackupError(f"The WAL of server {system_id} to archive is sealed with data key {missing[0]}, whose key "
                          "record is missing from the store", "The archive would be unreadable: take a new base backup")
    copied = []
    for key_id, record in sorted(found.items()):
        dest = layout.key_record_key(system_id, record.day, key_id, month)
        store.copy(record.key, dest)
        copied.append(dest)
    return copied
