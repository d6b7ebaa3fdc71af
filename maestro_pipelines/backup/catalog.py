"""Finding backups: only those with a manifest exist; `verified.json` says which were checked."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from maestro_pipelines.backup.manifest import (
    BACKUP_ID,
    BACKUPS_PREFIX,
    MANIFEST_NAME,
    MONTH,
    MONTHLY_PREFIX,
    VERIFIED_NAME,
    BackupManifest,
    BackupNotFound,
    ManifestInvalid,
    VerificationRecord,
    backup_root,
    check_backup_id,
)
from maestro_pipelines.storage import ChecksumMismatch, ObjectNotFound, ObjectStore


@dataclass
class BackupEntry:
    """One committed backup as listing sees it."""

    backup_id: str
    root: str
    """Key prefix: backups/<id> or monthly/<YYYY-MM>/<id>."""
    month: str | None
    manifest: BackupManifest | None
    """None when the manifest cannot be read or was tampered with (`problem` says why)."""
    manifest_sha256: str | None
    verification: VerificationRecord | None
    problem: str | None = None

    @property
    def started_at(self) -> datetime | None:
        return self.manifest.started_at if self.manifest else None

    @property
    def verified(self) -> bool:
        return (
            self.manifest is not None
            and self.verification is not None
            and self.verification.manifest_sha256 == self.manifest_sha256
        )

    @property
    def stored_bytes(self) -> int:
        return self.manifest.stored_bytes if self.manifest else 0


def _group(store: ObjectStore, prefix: str) -> dict[str, set[str]]:
    """root -> names of the objects directly in it, for every backup folder under prefix."""
    roots: dict[str, set[str]] = {}
    for info in store.list(prefix + "/", with_metadata=False):
        root, _, name = info.key.rpartition("/")
        roots.setdefault(root, set()).add(name)
    return roots


def _load(store: ObjectStore, root: str, names: set[str]) -> BackupEntry:
    backup_id = root.rsplit("/", 1)[-1]
    parts = root.split("/")
    month = parts[1] if parts[0] == MONTHLY_PREFIX else None
    entry = BackupEntry(backup_id, root, month, None, None, None)
    try:
        head = store.head(f"{root}/{MANIFEST_NAME}")
        data = store.get_bytes(f"{root}/{MANIFEST_NAME}")
        entry.manifest = BackupManifest.from_json(data, f"{store.url}/{root}/{MANIFEST_NAME}")
        entry.manifest_sha256 = head.sha256
    except (ManifestInvalid, ChecksumMismatch) as exc:
        entry.problem = str(exc)
        return entry
    if VERIFIED_NAME in names:
        try:
            entry.verification = VerificationRecord.from_json(store.get_bytes(f"{root}/{VERIFIED_NAME}"))
        except (ObjectNotFound, ChecksumMismatch):
            entry.verification = None
    return entry


def list_backups(store: ObjectStore, monthly: bool = False) -> list[BackupEntry]:
    """Committed backups (those with a manifest), oldest first. `monthly`: the archives."""
    prefix = MONTHLY_PREFIX if monthly else BACKUPS_PREFIX
    entries = []
    for root, names in _group(store, prefix).items():
        parts = root.split("/")
        if monthly:
            if len(parts) != 3 or not MONTH.match(parts[1]) or not BACKUP_ID.match(parts[2]):
                continue
        elif len(parts) != 2 or not BACKUP_ID.match(parts[1]):
            continue
        if MANIFEST_NAME not in names:
            continue  # not committed: in progress, or killed
        try:
            entries.append(_load(store, root, names))
        except ObjectNotFound:
            continue  # deleted (retention) between the listing and the read
    # Ids have one-second resolution and a random suffix: two backups started in the same
    # second sort by their start time, not by chance.
    return sorted(entries, key=lambda e: (e.backup_id[:16], e.started_at or datetime.min.replace(tzinfo=timezone.utc), e.backup_id, e.month or ""))


def incomplete_backups(store: ObjectStore) -> dict[str, set[str]]:
    """Backup folders without a manifest (in progress, or left by a killed backup)."""
    found = {}
    for root, names in _group(store, BACKUPS_PREFIX).items():
        if MANIFEST_NAME not in names:
            found[root] = names
    return found


def get_backup(store: ObjectStore, backup_id: str, month: str | None = None) -> BackupEntry:
    """One committed backup by id (or the newest verified for `latest`)."""
    if backup_id == "latest":
        entry = newest_verified(store)
        if entry is None:
            raise BackupNotFound(
                f"There is no verified backup in the store at {store.url}",
                "Run `maestro backup run` (and `maestro backup verify ID`), or name a backup id",
            )
        return entry
    root = backup_root(check_backup_id(backup_id), month)
    names = {info.key.rsplit("/", 1)[-1] for info in store.list(root + "/", with_metadata=False)}
    if MANIFEST_NAME not in names:
        hint = (
            "It has objects but no manifest: it never finished (killed or failed) and cannot be used"
            if names
            else "Run `maestro backup list` to see the backups in this store"
        )
        raise BackupNotFound(f"There is no backup {backup_id} in the store at {store.url}", hint)
    return _load(store, root, names)


def newest_verified(store: ObjectStore) -> BackupEntry | None:
    verified = [e for e in list_backups(store) if e.verified]
    return verified[-1] if verified else None


def object_key(entry: BackupEntry, manifest_key: str) -> str:
    """Where an object named in the manifest is for this copy of the backup: a monthly
    archive holds the same names in its own folder."""
    return f"{entry.root}/{manifest_key.rsplit('/', 1)[-1]}"
