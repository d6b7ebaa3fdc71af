"""Monthly archives: a server-side copy of the newest verified backup of a month into
`monthly/<YYYY-MM>/<backup_id>/`, manifest and verification record copied last (the same
commit rule as a backup: an archive without its manifest does not exist)."""

from __future__ import annotations

from datetime import datetime, timezone

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.catalog import BackupEntry, list_backups
from maestro_pipelines.backup.manifest import MANIFEST_NAME, MONTH, MONTHLY_PREFIX, VERIFIED_NAME, BackupError
from maestro_pipelines.storage import ObjectStore


def month_end(month: str) -> datetime:
    year, number = (int(p) for p in month.split("-"))
    return datetime(year + number // 12, number % 12 + 1, 1, tzinfo=timezone.utc)


def archive_month(store: ObjectStore, month: str) -> tuple[BackupEntry, bool]:
    """Archive the newest verified backup taken before the end of `month` (YYYY-MM).
    Returns (archived entry, whether a copy was made now); idempotent."""
    if not isinstance(month, str) or not MONTH.match(month):
        raise BackupError(f"'{month}' is not a month", "Write it as YYYY-MM, e.g. 2026-11")
    for existing in list_backups(store, monthly=True):
        if existing.month == month and existing.manifest is not None:
            return existing, False
    # Marked as running from the choice of the source on: retention must not delete it mid-copy.
    with activity(store, "archive", month):
        end = month_end(month)
        candidates = [e for e in list_backups(store) if e.verified and e.started_at and e.started_at < end]
        if not candidates:
            raise BackupError(
                f"No verified backup taken before the end of {month} to archive",
                "Run and verify a backup first (`maestro backup run`, then `maestro backup verify ID`)",
            )
        source = candidates[-1]
        dest = f"{MONTHLY_PREFIX}/{month}/{source.backup_id}"
        names = sorted(i.key.rsplit("/", 1)[-1] for i in store.list(source.root + "/", with_metadata=False))
        for name in names:
            if name not in (MANIFEST_NAME, VERIFIED_NAME):
                store.copy(f"{source.root}/{name}", f"{dest}/{name}")
        store.copy(f"{source.root}/{MANIFEST_NAME}", f"{dest}/{MANIFEST_NAME}")
        store.copy(f"{source.root}/{VERIFIED_NAME}", f"{dest}/{VERIFIED_NAME}")
    archived = [e for e in list_backups(store, monthly=True) if e.root == dest]
    return archived[0], True
