"""The physical tier's names: where base backups and WAL live in the store, what a base
backup's record holds, and the arithmetic of WAL positions. No I/O but two small readers of
PostgreSQL's own headers; every other module of `pitr/` builds on these names.

Store layout (keys relative to the store's URL), one folder per server (cluster), named by
its system identifier (pg_control's, also in every WAL segment's first page): two servers'
WAL have the same file names, never the same system identifier.

    pitr/<system_id>/wal/<segment>.zst                 one WAL segment (24 hex digits), zstd
    pitr/<system_id>/wal/<timeline>.history.zst        a timeline history file
    pitr/<system_id>/wal/<segment>.<offset>.backup.zst  a backup history file
    pitr/<system_id>/wal-conflicts/<name>-<sha12>.json  a push refused: other bytes, same name
    pitr/<system_id>/keys/<YYYYMMDD>-<key_id>.json      a WAL key record: the data key (wrapped,
                                                        an envelope) sealed segments name by id
    pitr/<system_id>/base/<base_id>/base.tar.zst       pg_basebackup -Ft -X none -D - (holds
                                                        PostgreSQL's backup_manifest)
    pitr/<system_id>/base/<base_id>/backup_manifest    that manifest again, alone: the next
                                                        --incremental reads it, verify checks it
    pitr/<system_id>/base/<base_id>/base.json          written LAST: without it the base
                                                        backup does not exist (BaseBackupRecord)
    monthly/<YYYY-MM>/pitr/<system_id>/...             a monthly archive: one base backup (and
                                                        its chain) plus the WAL to make it consistent

Every object carries the sha256 and size the store records at write time (as the dumps do);
a WAL object also carries `wal_sha256`, the sha256 of the segment as PostgreSQL wrote it,
which is what `wal push` compares when the same name is pushed twice.

Encrypted (a backup key configured, backup/sealing.py): base.tar.zst, backup_manifest and
every WAL object are sealed after zstd, so the store's sha256 is of the ciphertext; base.json
holds its base backup's own data key (an envelope) and a MAC. WAL has no manifest: its data
keys live in the key records under keys/ (one a day, made by the first push of the day),
each sealed WAL object names its key id (`wal_key_id`), and its `wal_sha256` is then an
HMAC keyed from that data key over the file's name and bytes (walkeys.py): a plain sha256
would let anyone who reads the bucket test guesses of the WAL's content.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from maestro_pipelines.backup.manifest import BackupError, ManifestInvalid, _iso, _parse_time, record_digest, signed_body

PITR_PREFIX = "pitr"
WAL_FOLDER = "wal"
CONFLICTS_FOLDER = "wal-conflicts"
KEYS_FOLDER = "keys"
BASE_FOLDER = "base"
BASE_TAR = "base.tar.zst"
PG_MANIFEST = "backup_manifest"
BASE_RECORD = "base.json"
WAL_SUFFIX = ".zst"
WAL_SHA256_KEY = "wal_sha256"
"""Store metadata of a WAL object: sha256 of the uncompressed file (metadata names are
lowercase identifiers in every store: no hyphen). Encrypted: an HMAC, not a sha256 (walkeys.py)."""
WAL_KEY_ID_KEY = "wal_key_id"
"""Store metadata of a sealed WAL object: the id of the data key its key record holds."""
KEY_RECORD = re.compile(r"^(\d{8})-([0-9a-f]{32})\.json$")
FORMAT_VERSION = 1
FULL, INCREMENTAL = "full", "incremental"

SEGMENT = re.compile(r"^[0-9A-F]{24}$")
HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")
BACKUP_HISTORY = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
BASE_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
"""Like dump backup ids (`new_backup_id`): they sort by time."""
SYSTEM_ID = re.compile(r"^\d{1,20}$")

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


class WalError(BackupError):
    """A WAL file could not be archived, fetched or found."""


def is_wal_name(name: str) -> bool:
    """A file name PostgreSQL archives (segment, timeline history, backup history, partial)."""
    return bool(SEGMENT.match(name) or HISTORY.match(name) or BACKUP_HISTORY.match(name) or PARTIAL.match(name))


def check_wal_name(name: str) -> str:
    if not isinstance(name, str) or not is_wal_name(name):
        raise WalError(
            f"'{name}' is not the name of a WAL file",
            "PostgreSQL passes it as %f: a 24-hex-digit segment (000000010000000000000003), "
            "a timeline history (00000002.history) or a backup history file",
        )
    return name


def server_prefix(system_id: str, month: str | None = None) -> str:
    if not SYSTEM_ID.match(str(system_id)):
        raise WalError(f"'{system_id}' is not a PostgreSQL system identifier", "It is a number of up to 20 digits")
    base = f"{PITR_PREFIX}/{system_id}"
    return f"monthly/{month}/{base}" if month else base


def wal_prefix(system_id: str, month: str | None = None) -> str:
    return f"{server_prefix(system_id, month)}/{WAL_FOLDER}/"


def wal_key(system_id: str, name: str, month: str | None = None) -> str:
    return f"{wal_prefix(system_id, month)}{check_wal_name(name)}{WAL_SUFFIX}"


def wal_name_of_key(key: str) -> str | None:
    """The WAL file name of a key under wal/, or None for anything else."""
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(WAL_SUFFIX):
        return None
    name = name[: -len(WAL_SUFFIX)]
    return name if is_wal_name(name) else None


def conflict_key(system_id: str, name: str, sha256: str) -> str:
    return f"{server_prefix(system_id)}/{CONFLICTS_FOLDER}/{check_wal_name(name)}-{sha256[:12]}.json"


def keys_prefix(system_id: str, month: str | None = None) -> str:
    return f"{server_prefix(system_id, month)}/{KEYS_FOLDER}/"


def key_record_key(system_id: str, day: str, key_id: str, month: str | None = None) -> str:
    """`keys/<YYYYMMDD>-<key_id>.json`: the day first, so a push lists only today's."""
    return f"{keys_prefix(system_id, month)}{day}-{key_id}.json"


def base_root(system_id: str, base_id: str, month: str | None = None) -> str:
    if not BASE_ID.match(base_id):
        raise BackupError(f"'{base_id}' is not a base backup id", "Base backup ids look like 20261126T020000Z-1a2b3c")
    return f"{server_prefix(system_id, month)}/{BASE_FOLDER}/{base_id}"


# ---- WAL positions ----------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """`16/B374D848` -> its 64-bit position."""
    match = re.fullmatch(r"\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*", str(text))
    if not match:
        raise WalError(f"'{text}' is not a WAL position (LSN)", "An LSN looks like 0/3000060 (two hex numbers)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def segment_name(timeline: int, position: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The segment holding `position` on `timeline` (PostgreSQL's XLogFileName)."""
    number = position // segment_size
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_xlogid:08X}{number % per_xlogid:08X}"


def segment_timeline(name: str) -> int:
    return int(name[:8], 16)


def segment_number(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    per_xlogid = 0x100000000 // segment_size
    return int(name[8:16], 16) * per_xlogid + int(name[16:24], 16)


def segment_start(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The LSN at which segment `name` begins."""
    return segment_number(name, segment_size) * segment_size


def next_segment(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    return segment_name(segment_timeline(name), segment_start(name, segment_size) + segment_size, segment_size)


# ---- PostgreSQL's own headers -----------------------------------------------------------

XLOG_PAGE_MAGIC_MIN = 0xD000
"""Every WAL format since PostgreSQL 9.x has a page magic of 0xD0xx (0xD118 is 18's)."""


def segment_header(data: bytes) -> tuple[int, int, int]:
    """(system identifier, timeline, segment size) from a segment's first page (its long page
    header: magic, info, timeline, page address, remaining length, then sysid, seg size)."""
    if len(data) < 40:
        raise WalError("the WAL segment is shorter than its header", "It is not a WAL segment, or it was truncated")
    magic, _info, timeline, _addr, _rem = struct.unpack_from("<HHIQI", data, 0)
    system_id, seg_size, _blcksz = struct.unpack_from("<QII", data, 24)
    if magic < XLOG_PAGE_MAGIC_MIN or seg_size <= 0 or seg_size & (seg_size - 1):
        raise WalError("the file does not start with a WAL page header", "It is not a WAL segment, or it was damaged")
    return system_id, timeline, seg_size


def control_system_id(pgdata: Path | str) -> str:
    """The system identifier in `<pgdata>/global/pg_control` (its first 8 bytes)."""
    path = Path(pgdata) / "global" / "pg_control"
    try:
        with open(path, "rb") as control:
            head = control.read(8)
    except OSError as exc:
        raise WalError(f"cannot read {path} ({exc.strerror})",
                       "Run it in the server's data directory (archive_command does), or pass --system-id") from None
    if len(head) < 8:
        raise WalError(f"{path} is too short to be a pg_control file", "Pass --system-id")
    return str(struct.unpack("<Q", head)[0])


# ---- a base backup's record -------------------------------------------------------------


@dataclass
class BaseBackupRecord:
    """What `base.json` says of one base backup: written last, so it is the commit marker.
    Recovering from it needs every WAL segment from `start_wal` to `stop_wal` (inclusive);
    an incremental one also needs its `parent` chain down to a full backup."""

    base_id: str
    system_id: str
    kind: str
    """full or incremental."""
    parent: str | None
    """The base backup an incremental one builds on (its manifest was --incremental's)."""
    where: str
    """host:port of the server (no password)."""
    server_version: str
    server_version_num: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal: str
    stop_wal: str
    started_at: datetime
    finished_at: datetime
    """The backup is consistent at stop_lsn: recovery can reach any point after about this time."""
    wal_segment_size: int
    tar_bytes: int
    compressed_bytes: int
    sha256: str
    """Of base.tar.zst as stored."""
    manifest_sha256: str
    """Of backup_manifest as stored."""
    databases: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    format_version: int = FORMAT_VERSION
    encryption: dict | None = None
    """The base backup's own data key, wrapped (an Envelope's dict); None: a plaintext backup."""
    mac: str | None = None
    """The record's MAC under that data key (sealing.sign): what its verification record names."""
    wal_sealed: bool | None = None
    """Encrypted backups only: True when the server's WAL reached the store sealed as this backup
    was taken. Recovering from it then refuses a plaintext segment from start_wal on: one put
    there by someone without the key (a plaintext object passes every check a key could make)."""

    @property
    def stop_position(self) -> int:
        return parse_lsn(self.stop_lsn)

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def to_body(self) -> dict:
        body = asdict(self)
        body["started_at"], body["finished_at"] = _iso(self.started_at), _iso(self.finished_at)
        for name in ("encryption", "mac", "wal_sealed"):  # a plaintext record is written as before encryption existed
            if body[name] is None:
                del body[name]
        return body

    def to_json(self, seal_body=None) -> bytes:
        """base.json: `seal_body(body)` puts the envelope and the MAC in (base.py), the digest
        comes last, over all of it (rekey rewraps the envelope and recomputes only the digest)."""
        body = self.to_body()
        if seal_body is not None:
            body = seal_body(body)
        body["digest"] = record_digest(body)
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "BaseBackupRecord":
        def invalid(why: str) -> ManifestInvalid:
            return ManifestInvalid(f"The base backup record {where} {why}",
                                   "Do not recover from this base backup: take a new one (maestro backup run --kind base)")

        body = signed_body(data, invalid, FORMAT_VERSION)
        try:
            return cls(**{**body, "started_at": _parse_time(body["started_at"]),
                          "finished_at": _parse_time(body["finished_at"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid(f"is missing or has a malformed field ({exc})") from None


def utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)
