"""What a backup is: its manifest (the commit marker), and where its objects live.

Store layout (keys relative to the store's URL):

    backups/<backup_id>/<role>.dump.zst     one pg_dump -Fc stream per database, zstd-compressed
    backups/<backup_id>/artifacts.json      the model-artifact manifest (keys, sizes, sha256)
    backups/<backup_id>/manifest.json       written LAST: without it the backup does not exist
    backups/<backup_id>/verified.json       written by verify, names the manifest's sha256
                                            (encrypted: its MAC, and carries a MAC itself)
    monthly/<YYYY-MM>/<backup_id>/...       monthly archives: server-side copies, same layout
    activity/<kind>-<id>.json               a backup or restore in progress (retention waits)
    swaps/<stamp>.json                      a live restore's swap in progress (journal.py)

Backup ids sort by time (`20261126T020000Z-1a2b3c`), so listing order is age order.

With a backup key configured (backup/sealing.py) the dumps and artifacts.json are sealed under
the backup's own data key, whose envelope is the manifest's `encryption` field; the manifest
carries a `mac` keyed from that data key, and verified.json one too. The manifest itself stays
readable without the key (sizes and sha256 of the stored, sealed bytes): storage-level checks
and listing need no key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from maestro_pipelines.errors import MaestroError

FORMAT_VERSION = 1
BACKUPS_PREFIX = "backups"
MONTHLY_PREFIX = "monthly"
ACTIVITY_PREFIX = "activity"
MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = "verified.json"
ARTIFACTS_NAME = "artifacts.json"
DUMP_SUFFIX = ".dump.zst"

BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class BackupError(MaestroError):
    """A backup could not be taken, read or verified."""


class BackupNotFound(BackupError):
    """No committed backup (one with a manifest) under that id."""


class ManifestInvalid(BackupError):
    """A manifest that cannot be parsed or whose digest does not match its content."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_backup_id(now: datetime | None = None) -> str:
    now = (now or utcnow()).astimezone(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_backup_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not BACKUP_ID.match(backup_id):
        raise BackupNotFound(
            f"'{backup_id}' is not a backup id",
            "Backup ids look like 20261126T020000Z-1a2b3c: run `maestro backup list` to see them",
        )
    return backup_id


def backup_root(backup_id: str, month: str | None = None) -> str:
    """Key prefix of one backup: `backups/<id>` or, archived, `monthly/<YYYY-MM>/<id>`."""
    check_backup_id(backup_id)
    return f"{MONTHLY_PREFIX}/{month}/{backup_id}" if month else f"{BACKUPS_PREFIX}/{backup_id}"


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class TableCheck:
    """Rows of one table and a content checksum (sum of row-text hashes), taken inside the
    dump's snapshot. `checksum` is None when content checksums were off."""

    schema: str
    name: str
    rows: int
    checksum: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class DatabaseDump:
    role: str
    """platform, mlflow or dagster."""
    database: str
    where: str
    """host:port/database (no password)."""
    key: str
    server_version: str
    server_version_num: int
    snapshot_at: datetime
    """The snapshot's time (the server's now() in the dump's transaction): the RPO reference."""
    wal_lsn: str | None
    dump_bytes: int
    compressed_bytes: int
    """The object's size in the store: the zstd stream, sealed when the backup is encrypted
    (`sha256` is of these bytes, so a keyless check of the store compares them)."""
    sha256: str
    duration_s: float
    database_bytes: int
    tables: list[TableCheck] = field(default_factory=list)
    zstd_bytes: int | None = None
    """Encrypted backups: the zstd stream's size before sealing (sealing adds a header and
    16 bytes per chunk). None for a plaintext backup, whose object is the zstd stream."""

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def server_major(self) -> int:
        return self.server_version_num // 10000


@dataclass
class ArtifactsRecord:
    """Where the artifact manifest object is and what it summarises."""

    key: str
    sha256: str
    size: int
    prefix: str
    count: int
    total_bytes: int


@dataclass
class BackupManifest:
    backup_id: str
    started_at: datetime
    finished_at: datetime
    pg_dump_version: str
    compression: dict[str, Any]
    databases: list[DatabaseDump]
    artifacts: ArtifactsRecord | None = None
    dump_format: str = "custom"
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)
    encryption: dict[str, str] | None = None
    """The data key's envelope (sealing.put_envelope); None: a plaintext backup."""
    mac: str | None = None
    """The manifest's MAC under that data key (sealing.sign), what verified.json names."""

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def snapshot_at(self) -> datetime:
        """The oldest snapshot among the databases: what the restore point guarantees."""
        return min((d.snapshot_at for d in self.databases), default=self.started_at)

    @property
    def dump_bytes(self) -> int:
        return sum(d.dump_bytes for d in self.databases)

    @property
    def compressed_bytes(self) -> int:
        return sum(d.compressed_bytes for d in self.databases)

    @property
    def stored_bytes(self) -> int:
        return self.compressed_bytes + (self.artifacts.size if self.artifacts else 0)

    def database(self, role: str) -> DatabaseDump:
        for dump in self.databases:
            if dump.role == role:
                return dump
        raise BackupError(
            f"Backup {self.backup_id} has no '{role}' database",
            f"It holds: {', '.join(d.role for d in self.databases)}",
        )

    # ---- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["started_at"] = _iso(self.started_at)
        body["finished_at"] = _iso(self.finished_at)
        body["duration_s"] = round(self.duration_s, 3)
        for db in body["databases"]:
            db["snapshot_at"] = _iso(db["snapshot_at"])
            if db["zstd_bytes"] is None:
                del db["zstd_bytes"]
        # A plaintext manifest is written as before encryption existed (older Maestro reads it).
        for name in ("encryption", "mac"):
            if body[name] is None:
                del body[name]
        return body

    def to_json(self) -> bytes:
        return record_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "BackupManifest":
        def invalid(why: str) -> ManifestInvalid:
            return ManifestInvalid(
                f"The backup manifest {where} {why}",
                "Do not restore from this backup: take a new backup or use another restore point",
            )

        body = signed_body(data, invalid, FORMAT_VERSION)
        try:
            body.pop("duration_s", None)
            databases = [
                DatabaseDump(
                    **{
                        **db,
                        "snapshot_at": _parse_time(db["snapshot_at"]),
                        "tables": [TableCheck(**t) for t in db["tables"]],
                    }
                )
                for db in body.pop("databases")
            ]
            artifacts = body.pop("artifacts")
            return cls(
                **{
                    **body,
                    "started_at": _parse_time(body["started_at"]),
                    "finished_at": _parse_time(body["finished_at"]),
                    "databases": databases,
                    "artifacts": ArtifactsRecord(**artifacts) if artifacts else None,
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid(f"is missing or has a malformed field ({exc})") from None


def signed_body(data: bytes, invalid, format_version: int) -> dict[str, Any]:
    """The JSON object of a record written with its `digest` (a manifest, a base backup's
    record), checked: valid JSON, an object, the digest matching, the format this Maestro
    reads; `invalid(why)` makes the error naming the record."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise invalid("is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("is not a JSON object")
    if body.pop("digest", None) != record_digest(body):
        raise invalid("does not match its digest (it was edited after the backup)")
    if body.get("format_version") != format_version:
        raise invalid(f"has format version {body.get('format_version')!r}, this Maestro reads {format_version}")
    return body


def record_digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything but the digest: an edit of the manifest
    is caught even when the store's recorded sha256 was rewritten with it (by accident; on
    purpose only the `mac` of an encrypted manifest catches it: the digest has no key)."""
    return hashlib.sha256(json.dumps({k: v for k, v in body.items() if k != "digest"}, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()




def record_json(body: dict[str, Any]) -> bytes:
    """The stored bytes of a record: `body` (its `mac` already in place) with its digest."""
    body = {**body, "digest": record_digest(body)}
    return json.dumps(body, indent=2, sort_keys=True).encode()


@dataclass
class VerificationRecord:
    """What verify wrote after checking a backup: it is valid only for the manifest it names,
    by the sha256 of its bytes, or for an encrypted backup by the manifest's `mac` (which a
    rekey keeps, while it rewrites the manifest's bytes), and then only with a `mac` of its
    own under the backup's data key: whoever can write the store but has no key cannot mark
    a backup verified. `ok` False: the last verification failed (`problems` says why),
    and the backup is listed as BAD until a verification passes. (Maestro before `ok` was
    recorded cannot read a failed record, and so takes the backup as not verified.)"""

    backup_id: str
    manifest_sha256: str
    verified_at: datetime
    objects: int
    bytes_read: int
    duration_s: float
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    manifest_mac: str | None = None
    mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["verified_at"] = _iso(self.verified_at)
        for name in ("manifest_mac", "mac"):
            if body[name] is None:
                del body[name]
        return body

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "VerificationRecord | None":
        try:
            body = json.loads(data)
            body["verified_at"] = _parse_time(body["verified_at"])
            record = cls(**body)
            if not isinstance(record.ok, bool) or not isinstance(record.problems, list):
                return None
            return record
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
