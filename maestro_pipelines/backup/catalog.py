"""Finding backups: only those with a manifest exist; `verified.json` says which were checked.

An encrypted backup's manifest is believed only once its MAC checks under its data key (the
envelope opened by the store's keyring): a forged one, or one moved from another backup's
folder, is listed as BAD and never restored. Without the key (none configured, or not the
one it was wrapped by) it is still listed from its manifest, marked unchecked (`key_error`):
its storage can be checked, nothing more, and a restore says which key it needs.
"""

from __future__ import annotations

import json
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
from maestro_pipelines.backup.sealing import RecordForged, check_signature, usable_data_key
from maestro_pipelines.crypto import BackupKeyError, DataKey
from maestro_pipelines.storage import ChecksumMismatch, ObjectNotFound, ObjectStore


LATEST = "latest"
"""The one word for the latest backup wherever a backup id is taken (restores and drills:
the latest verified one whose objects are intact)."""
LATEST_ALIASES = frozenset({LATEST, "newest"})
"""`newest` is accepted too, as an alias (an older spelling, and the word people guess)."""


def is_latest(backup: object) -> bool:
    """Whether `backup` names the latest backup (`latest`, or its alias `newest`)."""
    return isinstance(backup, str) and backup.strip().lower() in LATEST_ALIASES


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
    damage: str | None = None
    """Set by `check_objects` when an object no longer matches the manifest (missing,
    another size or sha256, altered in place): the backup then no longer counts as verified."""
    data_key: DataKey | None = None
    """An encrypted backup's data key, opened (its manifest's MAC checked under it)."""
    key_error: BackupKeyError | None = None
    """An encrypted backup whose data key could not be opened (no key configured, another
    one, the key service down): listed unchecked, verified by storage only, not restorable."""

    @property
    def started_at(self) -> datetime | None:
        return self.manifest.started_at if self.manifest else None

    @property
    def encrypted(self) -> bool:
        return self.manifest is not None and self.manifest.encrypted

    @property
    def unchecked(self) -> bool:
        """Encrypted, and the key to check its manifest and verified.json is not at hand."""
        return self.encrypted and self.key_error is not None

    @property
    def verified(self) -> bool:
        """The last verification passed for this very manifest (by its MAC when encrypted:
        a rekey rewrites the manifest's bytes, not its MAC) and no object changed since."""
        if self.manifest is None or self.verification is None or not self.verification.ok or self.damage:
            return False
        if self.encrypted:
            return self.manifest.mac is not None and self.verification.manifest_mac == self.manifest.mac
        return self.verification.manifest_sha256 == self.manifest_sha256

    @property
    def verification_failed(self) -> bool:
        """The last verification of this backup failed (listed as BAD, never restored as latest)."""
        return self.verification is not None and not self.verification.ok

    @property
    def bad(self) -> str | None:
        """Why this backup is known to be bad (unreadable manifest, failed verification,
        damaged object), or None."""
        if self.problem:
            return self.problem
        if self.verification_failed:
            problems = self.verification.problems
            return "its last verification failed: " + (problems[0] if problems else "no detail recorded")
        return self.damage

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


def _open_manifest(store: ObjectStore, entry: BackupEntry, manifest: BackupManifest, data: bytes, where: str) -> None:
    """The checks a keyless digest cannot make: the manifest is its folder's backup's, and an
    encrypted one's MAC is right under its data key (set as `entry.data_key`). No usable key:
    `entry.key_error`, the manifest taken unchecked. Raises ManifestInvalid or RecordForged."""
    if manifest.backup_id != entry.backup_id:
        raise ManifestInvalid(
            f"The backup manifest {where} is backup {manifest.backup_id}'s, not {entry.backup_id}'s "
            "(moved in from another backup's folder)",
            "Do not restore from this backup: use another restore point, and find out who can write the store",
        )
    body = json.loads(data)
    entry.data_key, entry.key_error = usable_data_key(store, body, f"backup {entry.backup_id}")
    if entry.data_key is None:
        return  # plaintext, or unchecked: its key is not at hand
    check_signature(body, entry.data_key, f"The backup manifest {where}")


def _verification(store: ObjectStore, entry: BackupEntry) -> VerificationRecord | None:
    """verified.json as written by verify; for an encrypted backup with its key, only if its
    MAC is right (anyone can write a record that says "ok")."""
    try:
        data = store.get_bytes(f"{entry.root}/{VERIFIED_NAME}")
    except (ObjectNotFound, ChecksumMismatch):
        return None
    record = VerificationRecord.from_json(data)
    if record is not None and entry.data_key is not None:
        try:
            check_signature(json.loads(data), entry.data_key, f"verified.json of backup {entry.backup_id}")
        except RecordForged:
            return None
    return record


def _load(store: ObjectStore, root: str, names: set[str]) -> BackupEntry:
    backup_id = root.rsplit("/", 1)[-1]
    parts = root.split("/")
    month = parts[1] if parts[0] == MONTHLY_PREFIX else None
    entry = BackupEntry(backup_id, root, month, None, None, None)
    where = f"{store.url}/{root}/{MANIFEST_NAME}"
    try:
        head = store.head(f"{root}/{MANIFEST_NAME}")
        data = store.get_bytes(f"{root}/{MANIFEST_NAME}")
        manifest = BackupManifest.from_json(data, where)
        _open_manifest(store, entry, manifest, data, where)
        entry.manifest, entry.manifest_sha256 = manifest, head.sha256
    except (ManifestInvalid, ChecksumMismatch, BackupKeyError) as exc:
        # RecordForged, a malformed envelope or one the configured key refuses: never believed.
        entry.problem, entry.data_key, entry.key_error = str(exc), None, None
        return entry
    if VERIFIED_NAME in names:
        entry.verification = _verification(store, entry)
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


def incomplete_archives(store: ObjectStore) -> dict[str, datetime | None]:
    """Monthly archive folders without a manifest (a copy in progress, or left by a killed or
    failed archive) -> when their newest object was written (None if the store cannot say)."""
    found: dict[str, datetime | None] = {}
    complete = set()
    for info in store.list(MONTHLY_PREFIX + "/", with_metadata=False):
        root, _, name = info.key.rpartition("/")
        if len(root.split("/")) != 3:
            continue
        if name == MANIFEST_NAME:
            complete.add(root)
        newest = found.get(root)
        written = info.last_modified
        found[root] = written if newest is None or (written is not None and written > newest) else newest
    return {root: written for root, written in found.items() if root not in complete}


def get_backup(store: ObjectStore, backup_id: str, month: str | None = None) -> BackupEntry:
    """One committed backup by id (or the latest verified for `latest`, alias `newest`)."""
    if is_latest(backup_id):
        entry = newest_verified(store, check=True)
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


def newest_verified(store: ObjectStore, check: bool = False) -> BackupEntry | None:
    """The newest verified backup; with `check`, the newest whose objects still match its
    manifest (`check_objects`), damaged newer ones marked on the way."""
    verified = [e for e in list_backups(store) if e.verified]
    for entry in reversed(verified):
        if not check or check_objects(store, entry) is None:
            return entry
    return None


def object_problem(store: ObjectStore, key: str, size: int, sha256: str,
                   read_at: datetime | None = None, check_altered: bool = True) -> str | None:
    """What a head of `key` shows wrong against the manifest's size and sha256, or None.

    Cheap (one HEAD), and it sees: a deleted object; a truncated or extended one (size); one
    swapped for another object (another recorded sha256, e.g. a dump of another backup copied
    over it), or rewritten by a tool that records no sha256 (`aws s3 cp`, a plain file copy);
    on the local store, a file written to in place (its modification time changed). It
    cannot see bytes changed with the size, the recorded sha256 and (locally) the mtime left
    as they were (bit rot, a deliberate edit): `verify_backup` reads every byte for that.

    `read_at`: when a verification last read every byte; a file altered before then (a
    `touch`) was proven intact by it. `check_altered` False: the caller reads every byte."""
    try:
        info = store.head(key)
    except ObjectNotFound:
        return f"{key} is missing"
    if info.size != size:
        return f"{key} has {info.size} bytes, the manifest says {size} (truncated or replaced)"
    if info.sha256 is None:
        return f"{key} has no recorded sha256 (rewritten outside Maestro), the manifest says {sha256[:12]}..."
    if info.sha256 != sha256:
        return f"{key} is recorded with sha256 {info.sha256[:12]}..., the manifest says {sha256[:12]}... (replaced)"
    if check_altered and info.altered and (
        read_at is None or info.last_modified is None or info.last_modified >= read_at
    ):
        return f"{key} was written to in place after the backup (its modification time changed)"
    return None


def check_objects(store: ObjectStore, entry: BackupEntry) -> str | None:
    """Head every object the manifest names (dumps and the artifact manifest): the first
    problem found (see `object_problem`), also kept as `entry.damage`; None when all match."""
    manifest = entry.manifest
    if manifest is None:
        return entry.problem or "the manifest cannot be read"
    expected = [(d.key, d.compressed_bytes, d.sha256) for d in manifest.databases]
    if manifest.artifacts:
        expected.append((manifest.artifacts.key, manifest.artifacts.size, manifest.artifacts.sha256))
    read_at = entry.verification.verified_at if entry.verified else None
    for manifest_key, size, sha256 in expected:
        problem = object_problem(store, object_key(entry, manifest_key), size, sha256, read_at)
        if problem:
            entry.damage = problem
            return problem
    return None


def object_key(entry: BackupEntry, manifest_key: str) -> str:
    """Where an object named in the manifest is for this copy of the backup: a monthly
    archive holds the same names in its own folder."""
    return f"{entry.root}/{manifest_key.rsplit('/', 1)[-1]}"
