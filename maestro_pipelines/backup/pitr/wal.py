"""Continuous WAL archiving into the store: `maestro wal push %p` as archive_command,
`maestro wal fetch %f %p` as restore_command, the listing of what the store holds, and the
server's own view of its archiving (pg_stat_archiver and the settings behind it).

A push is idempotent the way PostgreSQL needs it (archive_command may run again for a file
it already archived, after a crash): the same name with the same bytes is "already
archived" and succeeds; the same name with other bytes is refused, recorded under
`wal-conflicts/` and fails, so the server keeps the segment and retries, and the stored one
is never replaced. The store's puts are atomic (a temporary name, then one commit), so a
push killed mid-upload leaves nothing under the final name.

With a backup key every WAL object is sealed after zstd under the data key of a WAL key
record (walkeys.py: one a day), and `wal_sha256` is an HMAC under that key: "the same bytes"
is then decided with the stored object's own key, whatever day it was pushed.

`wal push` runs once per segment: this module imports only the standard library, zstandard,
the store and the keys (no SQLAlchemy, no psycopg) until `archiver_status` is called.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.layout import WalError
from maestro_pipelines.backup.pitr.walkeys import (
    WalKeyUnavailable,
    key_finder,
    push_key,
    same_digest,
    wal_data_key,
    wal_digest,
)
from maestro_pipelines.backup.sealing import keyring_of, open_object, seal, sign
from maestro_pipelines.crypto import DataKey, SealBroken
from maestro_pipelines.crypto.keys import BackupKeyError

READ_SIZE = 1024 * 1024
COMPRESSION_LEVEL = 3
"""A 16 MB segment compresses in ~60 ms at level 3 on one core; once a minute that is nothing,
and WAL (mostly page images and zeroes) shrinks 3-10x."""


class WalConflict(WalError):
    """Other bytes than the stored ones under the same WAL file name."""


@dataclass(frozen=True)
class WalObject:
    name: str
    size: int
    """Compressed, as stored."""
    wal_sha256: str | None
    last_modified: datetime | None
    key: str = ""


# ---- push -------------------------------------------------------------------------------


def _file_digest(path: Path, data_key: DataKey | None = None) -> tuple[str, int]:
    """(`wal_sha256` of the file: its sha256, or with a data key the HMAC; its size)."""
    digest, size = wal_digest(data_key, path.name), 0
    with open(path, "rb") as source:
        while chunk := source.read(READ_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def wal_system_id(path: Path, given: str | None = None) -> str:
    """The system identifier a WAL file belongs to: a segment says it in its first page; a
    history or backup history file does not, so pg_control of the data directory (the cwd of
    archive_command) or the one given says it."""
    name = path.name
    if layout.SEGMENT.match(name) or layout.PARTIAL.match(name):
        with open(path, "rb") as source:
            header = source.read(64)
        system_id, _timeline, segment_size = layout.segment_header(header)
        system_id = str(system_id)
        _check_position(path.name, header, segment_size)
        if given is not None and str(given) != system_id:
            raise WalError(
                f"{name} belongs to the server with system identifier {system_id}, not {given}",
                "Drop --system-id (a segment names its server) or push the segment of the right server",
            )
        return system_id
    if given is not None:
        layout.server_prefix(str(given))  # refuses what is not a system identifier
        return str(given)
    return layout.control_system_id(Path.cwd())


def _check_position(name: str, header: bytes, segment_size: int) -> None:
    """A segment's first page says where in the WAL it starts: a file copied under another
    segment's name would archive the wrong WAL there, and recovery would stop at it."""
    page_address = struct.unpack_from("<Q", header, 8)[0]
    expected = layout.segment_start(name[:24], segment_size)
    if page_address != expected:
        raise WalError(
            f"{name} starts at WAL position {layout.format_lsn(page_address)}, not at {layout.format_lsn(expected)} "
            "where a segment of that name starts",
            "It is another segment under this name (copied or renamed): push the file PostgreSQL names %p",
        )


def _open_wal(path: Path) -> Path:
    path = Path(path)
    layout.check_wal_name(path.name)
    if not path.is_file():
        raise WalError(f"no WAL file at {path}", "archive_command passes %p, the path relative to the data directory")
    return path


def push_wal(store, path: str | os.PathLike, system_id: str | None = None) -> str:
    """Archive one WAL file: "archived", or "already archived" when the store has the same
    bytes under that name. Raises WalConflict (after recording it) for other bytes. With a
    backup key the object is sealed under today's WAL key record's data key."""
    path = _open_wal(Path(path))
    try:
        system_id = wal_system_id(path, system_id)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    key = layout.wal_key(system_id, path.name)
    stored = _stored(store, key)
    if stored is not None:
        # Compared as the stored object was digested: its own data key (another day's, maybe), or none.
        key_id = stored.metadata.get(layout.WAL_KEY_ID_KEY)
        data_key = wal_data_key(store, system_id, key_id) if key_id else None
        digest, size = _digest_of(path, data_key)
        if same_digest(stored.metadata.get(layout.WAL_SHA256_KEY), digest):
            return "already archived"
        if data_key is None and keyring_of(store).encrypts:  # a plaintext one stored: the refusal names an HMAC
            data_key = push_key(store, system_id)
            digest, size = _digest_of(path, data_key)
        raise _record_conflict(store, system_id, path, digest, size, stored, data_key)
    data_key = push_key(store, system_id)
    digest, _size = _digest_of(path, data_key)
    metadata = {layout.WAL_SHA256_KEY: digest}
    if data_key is not None:
        metadata[layout.WAL_KEY_ID_KEY] = data_key.key_id
    store.put_stream(key, seal(data_key, _compressed(path)), metadata=metadata)
    return "archived"


def _digest_of(path: Path, data_key: DataKey | None) -> tuple[str, int]:
    try:
        return _file_digest(path, data_key)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: OSError) -> WalError:
    return WalError(f"cannot read {path} ({exc.strerror})",
                    "archive_command runs as the server's OS user: it needs read access to the file")


def _stored(store, key: str):
    from maestro_pipelines.storage import ObjectNotFound

    try:
        return store.head(key)
    except ObjectNotFound:
        return None


def _compressed(path: Path) -> Iterator[bytes]:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL, write_checksum=True)
    with open(path, "rb") as source:
        yield from compressor.read_to_iter(source, read_size=READ_SIZE, write_size=READ_SIZE)


def _record_conflict(store, system_id: str, path: Path, raw_sha256: str, raw_size: int, stored,
                     data_key: DataKey | None = None) -> WalConflict:
    """Write what was refused where `backup info` and `wal status` find it; the error to raise.
    Sealed: the digests are the HMACs under the stored object's key (no plaintext sha256 of
    WAL in the store), named as such, and the record is signed with that key."""
    stored_sha256 = stored.metadata.get(layout.WAL_SHA256_KEY)
    record = {
        "name": path.name, "system_id": system_id, "offered_wal_sha256": raw_sha256, "offered_bytes": raw_size,
        "stored_key": stored.key, "stored_wal_sha256": stored_sha256,
        "stored_at": stored.last_modified.isoformat() if stored.last_modified else None,
        "refused_at": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(),
    }
    if data_key is not None:
        record.update(offered_digest="hmac-sha256 keyed from the data key of WAL key record wal_key_id",
                      wal_key_id=data_key.key_id)
        sign(record, data_key)
    conflict = layout.conflict_key(system_id, path.name, raw_sha256)
    store.put_bytes(conflict, json.dumps(record, indent=2, sort_keys=True).encode())
    kind = "hmac" if data_key is not None else "sha256"
    told = f"{kind} {stored_sha256[:12]}" if stored_sha256 else "no recorded sha256"
    return WalConflict(
        f"{path.name} is already archived in {store.url} with other bytes ({told}, offered {raw_sha256[:12]}); "
        f"the stored one is kept and the refusal recorded at {conflict}",
        "Two servers with one system identifier archive into one store, or the stored file was replaced: "
        "point this server at its own store (MAESTRO_STORE_URL) or take a new base backup after checking which is right",
    )


# ---- fetch ------------------------------------------------------------------------------


def fetch_wal(store, system_id: str, name: str, dest: str | os.PathLike, plain_ok: bool = True) -> bool:
    """Write WAL file `name` of server `system_id` to `dest` (atomically: a temporary name in
    dest's folder, then a rename, once every byte checked: the store's sha256, each sealed
    chunk's authentication, zstd's checksum, `wal_sha256`). False when the store has no such
    file. `plain_ok` False: a plaintext object is refused (see BaseBackupRecord.wal_sealed);
    its key not at hand: one line (WalKeyUnavailable), nothing written."""
    key = layout.wal_key(str(system_id), name)
    stored = _stored(store, key)
    if stored is None:
        return False
    expected = stored.metadata.get(layout.WAL_SHA256_KEY)
    if not expected:
        raise WalError(f"{key} in {store.url} has no recorded {layout.WAL_SHA256_KEY}",
                       "It was not written by `maestro wal push`: do not recover from it; take a new base backup")
    dest = Path(dest)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".fetching", dir=dest.parent)
    except OSError as exc:
        raise WalError(f"cannot write into {dest.parent} ({exc.strerror})",
                       "restore_command runs as the server's OS user in its data directory: %p is where it may write") from None
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _decompress_into(store, key, out, str(system_id), name, plain_ok)
            out.flush()
            os.fsync(out.fileno())
        if not same_digest(digest, expected):
            raise WalError(f"{key} in {store.url} is damaged: its WAL does not match the {layout.WAL_SHA256_KEY} recorded "
                           f"when it was archived ({digest[:12]}..., {expected[:12]}... archived)",
                           "Do not recover past this segment from this store; look for another copy, or take a new base backup")
        os.replace(temp, dest)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise WalError(f"cannot write {dest} ({exc.strerror})", "Free space where the server restores WAL (%p)") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True


_DAMAGED_HINT = "Do not recover past this segment from this store; look for another copy, or take a new base backup"


def _decompress_into(store, key: str, out, system_id: str, name: str, plain_ok: bool = True,
                     month: str | None = None) -> str:
    """The object's WAL written to `out` as it is checked; its `wal_sha256` as computed (the
    HMAC under the data key its sealed header names, or the sha256 of a plaintext one)."""
    import zstandard

    from maestro_pipelines.storage import ChecksumMismatch

    opened: dict = {}
    digest = None
    try:
        with open_object(store, key, key_finder(store, system_id, month, opened), f"{key} in {store.url}",
                         sealed_only=not plain_ok) as reader:
            for chunk in zstandard.ZstdDecompressor().read_to_iter(reader, read_size=READ_SIZE, write_size=READ_SIZE):
                # Made at the first plaintext: a sealed reader has named its data key by then.
                digest = digest or wal_digest(opened.get("key"), name)
                digest.update(chunk)
                out.write(chunk)
    except zstandard.ZstdError as exc:
        raise WalError(f"{key} in {store.url} is damaged: it does not decompress ({exc})", _DAMAGED_HINT) from None
    except ChecksumMismatch as exc:
        raise WalError(f"{key} in {store.url} is damaged: {exc.problem}",
                       "Do not recover past this segment from this store; look for another copy") from None
    except SealBroken as exc:
        raise WalError(exc.problem, _DAMAGED_HINT) from None
    return (digest or wal_digest(opened.get("key"), name)).hexdigest()


def check_segment_bytes(store, system_id: str, name: str, sink, plain_ok: bool = True) -> tuple[str | None, str | None]:
    """(One line on what is wrong with stored segment `name`, or None; why only the storage
    checks ran, or None). Read whole into `sink` (keeping its first page in `sink.head`),
    nothing written anywhere. A sealed segment whose key is not at hand gets the checks that
    need none: its key record is there, its bytes are those the store recorded (size, sha256)."""
    key = layout.wal_key(str(system_id), name)
    stored = _stored(store, key)
    if stored is None:
        return f"{key} is missing from the store", None
    try:
        digest = _decompress_into(store, key, sink, str(system_id), name, plain_ok)
        if not same_digest(digest, stored.metadata.get(layout.WAL_SHA256_KEY)):
            return f"{key} is damaged: its WAL is not the bytes archived ({layout.WAL_SHA256_KEY} {digest[:12]}...)", None
        _check_position(name, sink.head, layout.segment_header(sink.head)[2])
    except WalKeyUnavailable as unavailable:
        return _stored_problem(store, stored), unavailable.problem
    except (WalError, BackupKeyError) as exc:
        return exc.problem, None
    return None, None


def _stored_problem(store, stored) -> str | None:
    from maestro_pipelines.storage import StoreError

    try:
        with store.open_read(stored.key) as reader:
            while reader.read(READ_SIZE):
                pass
    except StoreError as exc:
        return exc.problem
    return None


# ---- listing ----------------------------------------------------------------------------


def list_wal(store, system_id: str, month: str | None = None, with_metadata: bool = True) -> list[WalObject]:
    """Every WAL file the store holds for the server, sorted by name (so by position, with a
    timeline's history before its segments of a later timeline). Without metadata there is
    no `wal_sha256` (None), and S3 needs no request per object."""
    found = []
    for info in store.list(layout.wal_prefix(str(system_id), month), with_metadata=with_metadata):
        name = layout.wal_name_of_key(info.key)
        if name is not None:
            found.append(WalObject(name, info.size, info.metadata.get(layout.WAL_SHA256_KEY), info.last_modified, info.key))
    return sorted(found, key=lambda wal: wal.name)


def newest_segment(store, system_id: str) -> WalObject | None:
    """The archived segment furthest along (highest timeline, then position)."""
    segments = [wal for wal in list_wal(store, system_id, with_metadata=False) if layout.SEGMENT.match(wal.name)]
    return max(segments, key=lambda wal: wal.name) if segments else None


def list_conflicts(store, system_id: str) -> list[str]:
    return [info.key for info in store.list(f"{layout.server_prefix(str(system_id))}/{layout.CONFLICTS_FOLDER}/",
                                            with_metadata=False)]


# ---- the server's archiving -------------------------------------------------------------


@dataclass
class ArchiverStatus:
    where: str
    system_id: str | None
    server_version_num: int
    wal_level: str
    archive_mode: str
    archive_command: str
    archive_library: str
    archive_timeout_s: int
    summarize_wal: str | None
    """None before PostgreSQL 17 (no incremental backups there)."""
    in_recovery: bool
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    current_wal: str | None
    lag_segments: int | None
    """Complete segments written since the last one archived (0: all caught up)."""
    managed_service: str | None = None
    problem: str | None = None

    @property
    def archiving(self) -> bool:
        return self.problem is None

    @property
    def failing(self) -> bool:
        return self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for name in ("last_archived_time", "last_failed_time"):
            body[name] = body[name].isoformat() if body[name] else None
        body["archiving"] = self.archiving
        return body


_STATUS_SQL = """
SELECT current_setting('wal_level'), current_setting('archive_mode'), current_setting('archive_command'),
       coalesce(current_setting('archive_library', true), ''), (SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout'),
       current_setting('summarize_wal', true), pg_is_in_recovery(), current_setting('server_version_num')::int,
       (SELECT system_identifier::text FROM pg_control_system()),
       a.archived_count, a.last_archived_wal, a.last_archived_time, a.failed_count, a.last_failed_wal, a.last_failed_time,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       EXISTS (SELECT FROM pg_roles WHERE rolname IN ('rds_superuser', 'cloudsqlsuperuser', 'azure_pg_admin', 'alloydbsuperuser'))
FROM pg_stat_archiver a
"""
_MANAGED_ROLES = {"rds_superuser": "Amazon RDS", "cloudsqlsuperuser": "Cloud SQL",
                  "azure_pg_admin": "Azure Database for PostgreSQL", "alloydbsuperuser": "AlloyDB"}


def archiver_status(url, source: str) -> ArchiverStatus:
    """How the server at `url` archives its WAL, from pg_stat_archiver and its settings; the
    `problem` says in one line why it does not (or not any more), and what to do."""
    from maestro_pipelines.platform_db.driver import psycopg_connect
    from maestro_pipelines.platform_db.urls import describe

    with psycopg_connect(url, autocommit=True, source=source, application_name="maestro-wal") as conn:
        row = conn.execute(_STATUS_SQL).fetchone()
        managed = None
        if row[16]:
            names = {name for (name,) in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [list(_MANAGED_ROLES)])}
            managed = next(_MANAGED_ROLES[name] for name in _MANAGED_ROLES if name in names)
    status = ArchiverStatus(
        where=describe(url), system_id=row[8], server_version_num=row[7], wal_level=row[0], archive_mode=row[1],
        archive_command=row[2], archive_library=row[3], archive_timeout_s=row[4], summarize_wal=row[5],
        in_recovery=row[6], archived_count=row[9], last_archived_wal=row[10], last_archived_time=row[11],
        failed_count=row[12], last_failed_wal=row[13], last_failed_time=row[14], current_wal=row[15],
        lag_segments=_lag(row[15], row[10]), managed_service=managed,
    )
    status.problem = archiving_problem(status)
    return status


def _lag(current: str | None, archived: str | None) -> int | None:
    if not current or not archived or not layout.SEGMENT.match(archived):
        return None
    if layout.segment_timeline(current) != layout.segment_timeline(archived):
        return None
    return max(0, layout.segment_number(current) - layout.segment_number(archived) - 1)


def archiving_problem(status: ArchiverStatus) -> str | None:
    """One line: why this server's WAL is not reaching an archive, and what to do; None when it is."""
    if status.managed_service:
        return (f"{status.where} is a {status.managed_service} server, where archive_command cannot be set: "
                f"its own point-in-time recovery applies (the service's automated backups); Maestro keeps the logical dumps")
    if status.wal_level == "minimal":
        return f"wal_level is minimal on {status.where}: set wal_level = replica (and archive_mode = on) and restart the server"
    if status.archive_mode == "off":
        return (f"archive_mode is off on {status.where}: the recovery point is the last logical dump. "
                "Set archive_mode = on and archive_command = 'maestro wal push %p' (docs/configuration.md) and restart the server")
    if not status.archive_command and not status.archive_library:
        return (f"archive_mode is on but archive_command is empty on {status.where}: WAL accumulates in pg_wal. "
                "Set archive_command = 'maestro wal push %p' and reload")
    if status.failing:
        since = status.last_failed_time.isoformat(timespec="seconds")
        last = status.last_archived_time.isoformat(timespec="seconds") if status.last_archived_time else "never"
        return (f"archiving is failing on {status.where}: {status.last_failed_wal} failed at {since} "
                f"({status.failed_count} failures; last success {last}). Read the server's log for archive_command's error")
    return None
