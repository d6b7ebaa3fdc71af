"""Base backups of a whole server (cluster), streamed into the store:

    pg_basebackup -Ft -X none -D -  ->  zstd  ->  put_stream(base.tar.zst)   (sha256 while it streams)
                                    ->  a tar reader beside it keeps backup_label and backup_manifest

No copy lands on local disk. PostgreSQL 15+ puts its backup_manifest at the end of the tar
it writes to stdout: it is picked out as the bytes pass and stored again alone (the next
incremental's `--incremental=` reads it, verify checks against it); base.json, the record,
is written LAST: without it the base backup does not exist.

With a backup key (backup/sealing.py) each base backup has its own data key: base.tar.zst is
sealed after zstd and backup_manifest is sealed, so the store's sha256 of each is of the
ciphertext; base.json holds the data key's envelope and a MAC, checked on every read when the
key is configured (a record edited by someone without the key is not usable); its
verification record names it by that MAC, which a rotation of the key keeps.

`-X none`: the backup holds no WAL; the WAL from its start to its stop comes from the
archive (wal.py), which is why a server without working archiving is refused before
anything starts (pg_basebackup would wait forever for its last segment to be archived).

Incremental (PostgreSQL 17+, summarize_wal on): `kind="auto"` takes one on top of the newest
verified, intact base backup of the same server and timeline while the chain is shorter than
`INCREMENTAL_CHAIN_MAX`; a full one otherwise (and always on older servers). A recovery needs
the chain combined: `extract_base` unpacks each tar (sha256 checked as it streams),
pg_verifybackup -n checks each folder (no WAL to parse with -X none) and pg_combinebackup
joins them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.create import _CountingReader, _widen_pipe
from maestro_pipelines.backup.manifest import BackupError, BackupNotFound, ManifestInvalid, _iso, _parse_time, new_backup_id, utcnow
from maestro_pipelines.backup.pgtools import check_client, libpq_environment, program, program_version, psycopg_connect, where
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.layout import BASE_RECORD, BASE_TAR, FULL, INCREMENTAL, PG_MANIFEST, BaseBackupRecord
from maestro_pipelines.backup.sealing import (
    RecordForged,
    check_signature,
    envelope_of,
    keyring_of,
    new_data_key,
    open_object,
    put_envelope,
    seal,
    sign,
    usable_data_key,
)
from maestro_pipelines.crypto import DataKey, SealBroken
from maestro_pipelines.crypto.keys import BackupKeyError
from maestro_pipelines.backup.types import DatabaseTarget, MiB, Progress
from maestro_pipelines.storage.readahead import read_ahead
from maestro_pipelines.objectives import INCREMENTAL_CHAIN_MAX
from maestro_pipelines.redaction import hide_secret
from maestro_pipelines.storage import ObjectNotFound, ObjectStore, StoreError

BASE_VERIFIED = "verified.json"
"""Beside base.json once `verify_base_backup` read every byte: valid for the record whose sha256
(plaintext) or MAC (encrypted, and signed itself) it names."""
ACTIVITY_KIND = "base"
"""The activity marker's kind (`activity/base-<system_id>-<base_id>.json`): retention waits while it runs."""
KINDS = ("auto", FULL, INCREMENTAL)
COMPRESSION_LEVEL = 1
COMPRESSION_THREADS = 2
"""zstd of the tar in two worker threads: unlike pg_dump, the server only reads files, so the
compression has a core to itself (`python -m benchmarks.pitr_base`)."""
Log = Callable[[str], None]


# ---- the server -------------------------------------------------------------------------


@dataclass
class ServerFacts:
    system_id: str
    version: str
    version_num: int
    replication: bool
    extra_tablespaces: list[str]
    archiving: bool
    archiving_problem: str | None
    summarize_wal: bool
    wal_segment_size: int
    databases: list[str]
    size_bytes: int


_FACTS_SQL = """
SELECT (SELECT system_identifier FROM pg_control_system())::text,
       current_setting('server_version'), current_setting('server_version_num')::int,
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
       ARRAY(SELECT spcname::text FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),
       (SELECT setting FROM pg_settings WHERE name = 'archive_mode'),
       coalesce((SELECT setting FROM pg_settings WHERE name = 'archive_command'), ''),
       coalesce((SELECT setting FROM pg_settings WHERE name = 'archive_library'), ''),
       coalesce((SELECT setting FROM pg_settings WHERE name = 'summarize_wal'), 'off'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       ARRAY(SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname),
       (SELECT sum(pg_database_size(oid))::bigint FROM pg_database WHERE datallowconn),
       (SELECT failed_count > 0 AND last_failed_time > coalesce(last_archived_time, '-infinity') FROM pg_stat_archiver),
       (SELECT last_failed_wal FROM pg_stat_archiver)
"""


def server_facts(url, source: str) -> ServerFacts:
    """What decides whether and how this server can be backed up (one query)."""
    with psycopg_connect(url, autocommit=True, source=source) as connection:
        row = connection.execute(_FACTS_SQL).fetchone()
    (system_id, version, version_num, replication, tablespaces, mode, command, library, summarize,
     segment_size, databases, size, failing, failed_wal) = row
    archiving = mode in ("on", "always") and (command not in ("", "(disabled)") or bool(library))
    problem = None
    if not archiving:
        problem = f"WAL archiving is off (archive_mode = {mode})" if mode not in ("on", "always") \
            else "WAL archiving is on but archive_command is empty"
    elif failing:
        problem = f"WAL archiving is failing (pg_stat_archiver: the last attempt, {failed_wal}, failed)"
    return ServerFacts(str(system_id), str(version), int(version_num), bool(replication), list(tablespaces),
                       archiving and not failing, problem, summarize == "on", int(segment_size), list(databases),
                       int(size or 0))


def server_where(url) -> str:
    """host:port, or the socket folder: the server, not one database on it (no password)."""
    host = url.host or url.query.get("host") or "localhost"
    port = url.port or url.query.get("port") or 5432
    return f"socket {host} port {port}" if str(host).startswith("/") else f"{host}:{port}"


def server_system_id(url, source: str) -> str:
    """The server's system identifier (pg_control's): the name of its folder under pitr/."""
    with psycopg_connect(url, autocommit=True, source=source) as connection:
        return str(connection.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])


class BaseBackupRefused(BackupError):
    """The server is not set up for base backups (archiving off, no replication privilege, a
    managed service, extra tablespaces): `backup run` then takes the dumps alone."""


def _archiving_problem(target: DatabaseTarget, facts: ServerFacts) -> str | None:
    """wal.py's judgement (`archiver_status`: pg_stat_archiver, managed services), else ours."""
    try:
        from maestro_pipelines.backup.pitr.wal import archiver_status
    except ImportError:
        return facts.archiving_problem and f"{facts.archiving_problem} on the server at {where(target.url)}"
    return archiver_status(target.url, target.source).problem


def check_can_back_up(target: DatabaseTarget, facts: ServerFacts) -> None:
    """Refuse, in one line, a server a base backup cannot be taken from (before anything starts)."""
    at = where(target.url)
    if facts.version_num < 130000:
        raise BaseBackupRefused(f"The server at {at} runs PostgreSQL {facts.version}: base backups need 13 or newer "
                                "(its backup manifest)", "Keep the logical dumps (`maestro backup run --kind dump`) or upgrade")
    problem = _archiving_problem(target, facts)
    if problem:
        raise BaseBackupRefused(f"No base backup: {problem.rstrip('.')}",
                                "A base backup needs the server's WAL in the store (docs/configuration.md, WAL archiving); "
                                "`maestro backup run --kind dump` takes the dumps alone (the RPO is then the last dump's age)")
    if not facts.replication:
        raise BaseBackupRefused(
            f"The role of {target.source} at {at} has no REPLICATION privilege, which pg_basebackup needs",
            "ALTER ROLE ... REPLICATION (and a `replication` line in pg_hba.conf); on a managed service (RDS, Cloud SQL, "
            "Azure) its own point-in-time recovery applies: keep Maestro's dumps (`maestro backup run --kind dump`)")
    if facts.extra_tablespaces:
        raise BaseBackupRefused(f"The server at {at} has tablespaces besides pg_default "
                                f"({', '.join(facts.extra_tablespaces)}): a base backup to one stream cannot hold them",
                                "Move their tables to pg_default, or keep the logical dumps (`--kind dump`)")


# ---- the catalog --------------------------------------------------------------------------


@dataclass
class BaseEntry:
    """One base backup folder with a base.json: its record, or why it cannot be read."""

    system_id: str
    base_id: str
    root: str
    month: str | None = None
    record: BaseBackupRecord | None = None
    problem: str | None = None
    verification: dict[str, Any] | None = None
    damage: str | None = None
    """Set by `check_base_objects`: what a head of its objects shows wrong."""
    data_key: DataKey | None = None
    """Encrypted, the key configured: its data key (the record's MAC was checked with it)."""
    key_error: BackupKeyError | None = None
    """Encrypted, and its key not at hand (none configured, only others, the key service down
    or refusing): the record is read (names, sizes) but its MAC is not checked. Listing,
    windows and retention work, verify checks storage only; a recovery refuses in one line."""
    refused: str | None = None
    """A plaintext base backup taken after an encrypted one of the server: not used."""

    @property
    def unchecked(self) -> bool:
        return self.key_error is not None

    @property
    def verified(self) -> bool:
        return (self.record is not None and self.damage is None and self.refused is None
                and self.verification is not None and bool(self.verification.get("ok")))

    @property
    def bad(self) -> str | None:
        if self.problem or self.damage or self.refused:
            return self.problem or self.damage or self.refused
        if self.verification is not None and not self.verification.get("ok"):
            return "; ".join(self.verification.get("problems") or ["its verification failed"])
        return None

    @property
    def finished_at(self) -> datetime | None:
        return self.record.finished_at if self.record else None


def _base_folders(store: ObjectStore, month: str | None = None) -> dict[tuple[str, str], set[str]]:
    """(system_id, base_id) -> object names in its folder, for every base folder in the store."""
    prefix = f"monthly/{month}/{layout.PITR_PREFIX}/" if month else f"{layout.PITR_PREFIX}/"
    found: dict[tuple[str, str], set[str]] = {}
    for info in store.list(prefix, with_metadata=False):
        parts = info.key[len(prefix):].split("/")
        if len(parts) == 4 and parts[1] == layout.BASE_FOLDER and layout.BASE_ID.match(parts[2]):
            found.setdefault((parts[0], parts[2]), set()).add(parts[3])
    return found


def _load_entry(store: ObjectStore, system_id: str, base_id: str, names: set[str], month: str | None) -> BaseEntry:
    root = layout.base_root(system_id, base_id, month)
    entry = BaseEntry(system_id, base_id, root, month)
    try:
        data = store.get_bytes(f"{root}/{BASE_RECORD}")
        entry.record = BaseBackupRecord.from_json(data, f"{root}/{BASE_RECORD}")
        _open_record(store, entry, json.loads(data))
    except (ManifestInvalid, StoreError, BackupKeyError) as exc:
        entry.record, entry.problem = None, str(exc).split(". ")[0]
        return entry
    if BASE_VERIFIED in names:
        entry.verification = _verification(store, entry, data)
    return entry


def _open_record(store: ObjectStore, entry: BaseEntry, body: dict[str, Any]) -> None:
    """An encrypted record's data key and MAC, when its key is at hand; else only noted
    (`key_error`): whoever lists without the key still sees names and sizes, and a key that is
    not at hand never makes a base backup look bad (retention would delete it). An envelope
    the configured key refuses (altered) or a MAC that does not match: raised, not usable."""
    what = f"base backup {entry.base_id}"
    entry.data_key, entry.key_error = usable_data_key(store, body, what)
    if entry.data_key is not None:
        check_signature(body, entry.data_key, f"{what}'s record ({entry.root}/{BASE_RECORD})")


def _verification(store: ObjectStore, entry: BaseEntry, data: bytes) -> dict[str, Any] | None:
    """The verification record if it is the one of this base.json (its sha256, or its MAC and
    a valid signature of its own when the key is here); None: not verified, verify again."""
    try:
        body = json.loads(store.get_bytes(f"{entry.root}/{BASE_VERIFIED}"))
    except (StoreError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if not entry.record.encrypted:
        return body if body.get("record_sha256") == _sha(data) else None
    if body.get("record_mac") != entry.record.mac:
        return None
    if entry.data_key is not None:
        try:
            check_signature(body, entry.data_key, f"base backup {entry.base_id}'s verification record")
        except RecordForged:
            return None
    return body


def list_base_backups(store: ObjectStore, system_id: str | None = None, month: str | None = None) -> list[BaseEntry]:
    """Committed base backups (those with a base.json), oldest first (ids sort by time)."""
    entries = []
    for (sid, base_id), names in sorted(_base_folders(store, month).items(), key=lambda item: item[0][1]):
        if BASE_RECORD in names and (system_id is None or sid == str(system_id)):
            entries.append(_load_entry(store, sid, base_id, names, month))
    _refuse_plaintext_after_encrypted(entries)
    return entries


def _refuse_plaintext_after_encrypted(entries: list[BaseEntry]) -> None:
    """Plaintext base backups are read (older backups, from before a key), except one newer
    than an encrypted base backup of the same server whose MAC was checked here: whoever can
    write the bucket but has no key could otherwise put a plaintext backup of their own there."""
    first_sealed: dict[str, str] = {}
    for entry in entries:
        if entry.data_key is not None:
            first_sealed.setdefault(entry.system_id, entry.base_id)
    for entry in entries:
        sealed = first_sealed.get(entry.system_id)
        if entry.record is not None and not entry.record.encrypted and sealed is not None and entry.base_id > sealed:
            entry.refused = (f"base backup {entry.base_id} is not encrypted though base backup {sealed} before it is: "
                             "written by someone without the key, or taken with the key removed; not used")


def incomplete_base_backups(store: ObjectStore, month: str | None = None) -> dict[str, set[str]]:
    """Base folders without base.json (a backup running, or one that failed or was killed)."""
    return {layout.base_root(sid, bid, month): names for (sid, bid), names in _base_folders(store, month).items()
            if BASE_RECORD not in names}


def check_base_objects(store: ObjectStore, entry: BaseEntry) -> str | None:
    """One head per object (the tar and the manifest) against the record; the first problem."""
    from maestro_pipelines.backup.catalog import object_problem

    if entry.record is None:
        return entry.problem
    read_at = _parse_time(entry.verification["verified_at"]) if entry.verified else None
    for name, size, sha in ((BASE_TAR, entry.record.compressed_bytes, entry.record.sha256),
                            (PG_MANIFEST, None, entry.record.manifest_sha256)):
        key = f"{entry.root}/{name}"
        if size is None:
            try:
                size = store.head(key).size
            except ObjectNotFound:
                entry.damage = f"{key} is missing"
                return entry.damage
        problem = object_problem(store, key, size, sha, read_at)
        if problem:
            entry.damage = problem
            return problem
    return None


def base_chain(store: ObjectStore, record: BaseBackupRecord, month: str | None = None) -> list[BaseBackupRecord]:
    """`record` and the base backups it builds on, full first."""
    by_id = {e.base_id: e for e in list_base_backups(store, record.system_id, month)}
    chain = [record]
    while chain[0].parent is not None:
        parent = by_id.get(chain[0].parent)
        if parent is None or parent.record is None:
            why = "is missing" if parent is None else f"cannot be read ({parent.problem})"
            raise BackupError(f"Base backup {chain[0].base_id} is incremental on {chain[0].parent}, which {why}",
                              "Recover from another base backup, or take a full one (`maestro backup run --kind base`)")
        if len(chain) > 1000:
            raise BackupError(f"Base backup {record.base_id}'s chain loops", "Take a full base backup")
        chain.insert(0, parent.record)
    return chain


# ---- taking one ---------------------------------------------------------------------------


class _TarWatcher:
    """Follows the tar as it streams past (512-byte headers, data padded to 512) and keeps the
    bytes of the few small members asked for: PostgreSQL's backup_label and backup_manifest."""

    def __init__(self, wanted: tuple[str, ...] = ("backup_label", PG_MANIFEST)):
        self.wanted = wanted
        self.members: dict[str, bytes] = {}
        self._header = bytearray()
        self._skip = 0  # bytes of the current member's data and padding still to pass
        self._keep: bytearray | None = None
        self._keep_left = 0
        self._name = ""
        self.ended = False

    def feed(self, data: bytes) -> None:
        view, pos = memoryview(data), 0
        while pos < len(view) and not self.ended:
            if self._skip:
                take = min(self._skip, len(view) - pos)
                if self._keep is not None and self._keep_left:
                    part = min(take, self._keep_left)
                    self._keep += view[pos:pos + part]
                    self._keep_left -= part
                    if not self._keep_left:
                        self.members[self._name] = bytes(self._keep)
                        self._keep = None
                self._skip -= take
                pos += take
                continue
            take = min(512 - len(self._header), len(view) - pos)
            self._header += view[pos:pos + take]
            pos += take
            if len(self._header) == 512:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == bytes(512):
            self.ended = True
            return
        raw = header[124:136]
        size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.strip(b"\0 ") or b"0", 8)
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        self._skip = (size + 511) // 512 * 512
        self._keep = bytearray() if name in self.wanted and header[156:157] in (b"0", b"\0") else None
        self._keep_left, self._name = size, name
        if self._keep is not None and size == 0:
            self.members[name] = b""
            self._keep = None


class _WatchedReader:
    def __init__(self, reader: _CountingReader, watcher: _TarWatcher):
        self.reader, self.watcher = reader, watcher

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        self.watcher.feed(data)
        return data


@dataclass
class _Plan:
    kind: str
    parent: BaseEntry | None = None
    note: str = ""


def _chain_length(entries: list[BaseEntry], entry: BaseEntry) -> int:
    by_id, length, current = {e.base_id: e for e in entries}, 1, entry
    while current.record is not None and current.record.parent and current.record.parent in by_id and length < 1000:
        current, length = by_id[current.record.parent], length + 1
    return length


def _chain_intact(store: ObjectStore, entries: list[BaseEntry], entry: BaseEntry) -> bool:
    """`entry` and every base backup it builds on are there, readable and intact (one head each)."""
    by_id, current = {e.base_id: e for e in entries}, entry
    for _ in range(INCREMENTAL_CHAIN_MAX + 1):
        # Unchecked: its key is not configured here (lost, or another store's), so a recovery
        # through this chain could not open it: a new chain starts with a full backup.
        if current.record is None or current.bad or current.unchecked or check_base_objects(store, current) is not None:
            return False
        if current.record.parent is None:
            return True
        if current.record.parent not in by_id:
            return False
        current = by_id[current.record.parent]
    return False


def choose_kind(store: ObjectStore, facts: ServerFacts, kind: str, client_major: int) -> _Plan:
    """Full or incremental, and on which parent: the newest verified, intact base backup of the
    server on the same timeline (its chain shorter than INCREMENTAL_CHAIN_MAX)."""
    if kind not in KINDS:
        raise BackupError(f"'{kind}' is not a kind of base backup", "Use auto, full or incremental")
    if kind == FULL:
        return _Plan(FULL, note="full (asked for)")
    why_not = None
    if facts.version_num < 170000 or client_major < 17:
        why_not = f"PostgreSQL {facts.version} has no incremental backups (17+)" if facts.version_num < 170000 \
            else f"pg_basebackup {client_major} has no --incremental (17+)"
    elif not facts.summarize_wal:
        why_not = "summarize_wal is off on the server"
    entries = list_base_backups(store, facts.system_id)
    parent = next((e for e in reversed(entries) if e.verified and _chain_intact(store, entries, e)), None)
    if why_not is None and parent is None:
        locked = next((e for e in reversed(entries) if e.verified and e.unchecked), None)
        why_not = (f"the newest base backup {locked.base_id} is encrypted with a key not configured here"
                   if locked is not None else "no verified base backup of this server to build on")
    elif why_not is None and _chain_length(entries, parent) >= INCREMENTAL_CHAIN_MAX:
        why_not = f"the chain of {parent.base_id} already has {INCREMENTAL_CHAIN_MAX} backups"
    if why_not is not None:
        if kind == INCREMENTAL:
            raise BackupError(f"No incremental base backup possible: {why_not}", "Take a full one (`--kind auto` does)")
        return _Plan(FULL, note=f"full: {why_not}")
    return _Plan(INCREMENTAL, parent, f"incremental on {parent.base_id}")


def _stderr_line(handle, target: DatabaseTarget, returncode: int) -> str:
    handle.seek(0)
    text = hide_secret(handle.read().decode("utf-8", "replace"), target.url.password)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("NOTICE:")]
    if returncode < 0:
        lines.append(f"pg_basebackup was killed by signal {-returncode}")
    return " / ".join(lines[-3:]) or f"pg_basebackup exited with code {returncode}"


def _basebackup_error(said: str, target: DatabaseTarget) -> BackupError:
    at = where(target.url)
    if "pg_hba.conf" in said and "replication" in said:
        fix = "Add a `host replication <user> <address> scram-sha-256` line to the server's pg_hba.conf and reload it"
    elif "WAL summar" in said:
        fix = "Take a full base backup (`--kind full`); summarize_wal must stay on for incrementals"
    else:
        fix = "Fix what pg_basebackup says, then run `maestro backup run --kind base` again"
    return BackupError(f"pg_basebackup of the server at {at} failed: {said}", fix)


def _compressed(process: subprocess.Popen, stderr, reader, target: DatabaseTarget, level: int, threads: int):
    """The tar through zstd; pg_basebackup's exit is checked after the last chunk, before the
    store commits the object: a failed backup never becomes an object."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    yield from compressor.read_to_iter(reader, read_size=MiB, write_size=MiB)
    returncode = process.wait()
    if returncode != 0:
        raise _basebackup_error(_stderr_line(stderr, target, returncode), target)


BASE_READ_AHEAD = 16
"""MiB chunks of the base backup read ahead: reading pg_basebackup's pipe and compressing
overlap with the store's writes and hashing (measured: the local store's writes were 0.3 s
of 1.7 s in line, the server's reads are cheap)."""


def _stream_tar(store: ObjectStore, key: str, command: list[str], target: DatabaseTarget, expected: int,
                progress: Progress | None, metadata: dict[str, str], level: int, threads: int,
                data_key: DataKey | None = None):
    """(object info, tar bytes, members kept) of pg_basebackup's tar streamed into `key`
    (sealed under `data_key` after zstd, in the reading thread: it overlaps the store's writes)."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                   env=libpq_environment(target.url, "maestro-base-backup"), bufsize=0)
        _widen_pipe(process.stdout)
        counting = _CountingReader(process.stdout, server_where(target.url), expected, progress)
        watcher = _TarWatcher()
        try:
            compressed = _compressed(process, stderr, _WatchedReader(counting, watcher), target, level, threads)
            info = store.put_stream(key, read_ahead(seal(data_key, compressed), BASE_READ_AHEAD, "maestro-base-read", join_s=30), metadata)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
    if progress is not None:
        progress(counting.label, counting.count, counting.count)
    return info, counting.count, watcher.members


def _wal_range(manifest: bytes, where_: str) -> tuple[int, int, int]:
    """(timeline, start, stop) from the backup manifest's WAL-Ranges."""
    try:
        ranges = json.loads(manifest)["WAL-Ranges"]
        start = min(layout.parse_lsn(r["Start-LSN"]) for r in ranges)
        newest = max(ranges, key=lambda r: r["Timeline"])
        return int(newest["Timeline"]), start, layout.parse_lsn(newest["End-LSN"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"The backup manifest pg_basebackup wrote for {where_} has no readable WAL-Ranges ({exc})",
                          "Run the base backup again") from None


def _record(base_id: str, plan: _Plan, facts: ServerFacts, target: DatabaseTarget, members: dict[str, bytes],
            sizes: tuple[int, int, str, str], times: tuple[datetime, float]) -> BaseBackupRecord:
    timeline, start, stop = _wal_range(members[PG_MANIFEST], where(target.url))
    seg = facts.wal_segment_size
    # The stop segment is the one holding the last byte before stop (PostgreSQL's XLByteToPrevSeg).
    stop_wal = layout.segment_name(timeline, max(stop - 1, start) if stop % seg == 0 else stop, seg)
    start_timeline = int(re.search(rb"START TIMELINE: (\d+)", members.get("backup_label", b"")).group(1)) \
        if b"START TIMELINE" in members.get("backup_label", b"") else timeline
    tar_bytes, compressed, sha, manifest_sha = sizes
    return BaseBackupRecord(
        base_id=base_id, system_id=facts.system_id, kind=plan.kind,
        parent=plan.parent.base_id if plan.parent else None, where=server_where(target.url),
        server_version=facts.version, server_version_num=facts.version_num, timeline=timeline,
        start_lsn=layout.format_lsn(start), stop_lsn=layout.format_lsn(stop),
        start_wal=layout.segment_name(start_timeline, start, seg), stop_wal=stop_wal,
        started_at=times[0], finished_at=utcnow(), wal_segment_size=seg, tar_bytes=tar_bytes,
        compressed_bytes=compressed, sha256=sha, manifest_sha256=manifest_sha, databases=facts.databases,
        duration_s=round(time.monotonic() - times[1], 3))


def take_base_backup(store: ObjectStore, target: DatabaseTarget, kind: str = "auto", progress: Progress | None = None,
                     log: Log | None = None, compression_level: int = COMPRESSION_LEVEL,
                     compression_threads: int = COMPRESSION_THREADS) -> BaseBackupRecord:
    """A base backup of `target`'s server into the store; its record once base.json is written."""
    log = log or (lambda line: None)
    pg_basebackup = program("pg_basebackup", target.client_programs)
    check_client(pg_basebackup, target.url, libpq_environment(target.url), target.source)
    facts = server_facts(target.url, target.source)
    check_can_back_up(target, facts)
    plan = choose_kind(store, facts, kind, int(program_version("pg_basebackup", target.client_programs).split(".")[0]))
    started_at, clock = utcnow(), time.monotonic()
    base_id = new_backup_id(started_at)
    root = layout.base_root(facts.system_id, base_id)
    data_key = new_data_key(store, f"base backup {base_id}")  # MAESTRO_BACKUP_ENCRYPTION=required: refused here
    log(f"base backup {base_id} of {where(target.url)}: {plan.note}" + (", encrypted" if data_key else ""))
    # The marker names the folder (system id and base id): retention sweeps it once the process is gone.
    with activity(store, ACTIVITY_KIND, f"{facts.system_id}-{base_id}"), \
            tempfile.TemporaryDirectory(prefix="maestro-base-") as scratch:
        try:
            command = [pg_basebackup, "--format=tar", "--wal-method=none", "--pgdata=-", "--no-password",
                       "--checkpoint=fast", f"--label=maestro {base_id}"]
            if plan.parent is not None:
                previous = Path(scratch) / PG_MANIFEST
                previous.write_bytes(read_manifest(store, plan.parent.record, plan.parent.month))
                command.append(f"--incremental={previous}")
            meta = {"base_id": base_id, "system_id": facts.system_id}
            info, tar_bytes, members = _stream_tar(store, f"{root}/{BASE_TAR}", command, target, facts.size_bytes,
                                                   progress, meta, compression_level, compression_threads, data_key)
            if PG_MANIFEST not in members:
                raise BackupError(f"pg_basebackup of {where(target.url)} wrote no backup_manifest into its tar",
                                  "Use pg_basebackup 15 or newer (MAESTRO_PG_BIN), then run the base backup again")
            manifest_info = store.put_bytes(f"{root}/{PG_MANIFEST}", b"".join(seal(data_key, [members[PG_MANIFEST]])), meta)
            record = _record(base_id, plan, facts, target, members,
                             (tar_bytes, info.size, info.sha256 or "", manifest_info.sha256 or ""), (started_at, clock))
            store.put_bytes(f"{root}/{BASE_RECORD}", _sealed_record(store, record, data_key), meta)  # the commit marker
        except BaseException:
            remove_base_folder(store, root)
            raise
    log(f"base backup {base_id}: {record.kind}, WAL {record.start_wal} to {record.stop_wal}")
    return record


def _sealed_record(store: ObjectStore, record: BaseBackupRecord, data_key: DataKey | None) -> bytes:
    """base.json: with a data key, its envelope and its MAC (signed last, after every field)."""
    if data_key is None:
        return record.to_json()
    record.wal_sealed = _wal_sealed(store, record.system_id)

    def sealed(body: dict[str, Any]) -> dict[str, Any]:
        sign(put_envelope(body, data_key), data_key)
        record.encryption, record.mac = body["encryption"], body["mac"]  # the caller's record is the one written
        return body

    return record.to_json(sealed)


def _wal_sealed(store: ObjectStore, system_id: str) -> bool:
    """Whether the newest WAL segment of the server in the store is sealed (one listing, one head)."""
    from maestro_pipelines.backup.pitr.wal import newest_segment

    newest = newest_segment(store, system_id)
    try:
        return newest is not None and layout.WAL_KEY_ID_KEY in store.head(newest.key).metadata
    except ObjectNotFound:
        return False


def base_key(store: ObjectStore, record: BaseBackupRecord) -> DataKey | None:
    """The data key of a base backup (None: plaintext); one line when its backup key is not configured."""
    envelope = envelope_of(record.to_body(), f"base backup {record.base_id}")
    return None if envelope is None else keyring_of(store).open(envelope, f"base backup {record.base_id}")


def _read_stored(store: ObjectStore, key: str, sha256: str, data_key: DataKey | None, what: str):
    """A reader of the plaintext of `key`, once a head shows it is the object the record names
    (a swapped object keeps its own recorded sha256: only the record's tells)."""
    info = store.head(key)
    if sha256 and info.sha256 != sha256:
        raise BackupError(f"{key} is not the object the base backup wrote (sha256 {str(info.sha256)[:12]}..., "
                          f"its record says {sha256[:12]}...: replaced)",
                          "Recover from another base backup (`maestro backup info` lists them), or take a new one")
    return open_object(store, key, data_key, what, sealed_only=data_key is not None)


def read_manifest(store: ObjectStore, record: BaseBackupRecord, month: str | None = None) -> bytes:
    """PostgreSQL's backup_manifest of `record` (opened with its data key when sealed)."""
    key = f"{layout.base_root(record.system_id, record.base_id, month)}/{PG_MANIFEST}"
    try:
        with _read_stored(store, key, record.manifest_sha256, base_key(store, record), key) as reader:
            return reader.read()
    except SealBroken as exc:
        raise BackupError(f"Base backup {record.base_id} is damaged: {exc.problem}", exc.hint) from None


def remove_base_folder(store: ObjectStore, root: str) -> None:
    """Best effort: base.json first (from then on the backup does not exist), then the rest."""
    for remove in (lambda: store.delete(f"{root}/{BASE_RECORD}"),
                   lambda: [store.delete(i.key) for i in store.list(root + "/", with_metadata=False)],
                   lambda: store.discard_unfinished(root + "/")):
        try:
            remove()
        except Exception:  # never hides the backup's own error; retention sweeps the rest
            pass


# ---- reading one back ---------------------------------------------------------------------


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class _CountingStream:
    def __init__(self, raw, label: str, expected: int, progress: Progress | None):
        self.raw, self.label, self.expected, self.progress = raw, label, expected, progress
        self.count, self._told = 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.progress is not None and self.count - self._told >= 16 * MiB:
            self._told = self.count
            self.progress(self.label, self.count, self.expected)
        return data


def unpack_base(store: ObjectStore, record: BaseBackupRecord, dest: Path, month: str | None = None,
                progress: Progress | None = None) -> Path:
    """base.tar.zst of `record` unpacked into `dest` (sha256 checked as it streams, and each
    sealed chunk authenticated before a byte of it is used: a damaged object raises before
    `dest` is used), then pg_verifybackup -n on the folder. Its backup key not configured: one
    line, before anything is read."""
    data_key = base_key(store, record)
    manifest = _manifest_object(store, record, month)  # first: small, and a damaged one ends it at once
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)

    def extract(tar_stream) -> None:
        with tarfile.open(fileobj=tar_stream, mode="r|", bufsize=MiB) as tar:
            tar.extractall(dest, filter="tar")

    _read_base_tar(store, record, data_key, month, progress, extract)
    _check_against_manifest(record, manifest, (dest / PG_MANIFEST).read_bytes(), dest)
    return dest


def verify_base_tar(store: ObjectStore, record: BaseBackupRecord, folder: Path, month: str | None = None,
                    progress: Progress | None = None) -> None:
    """What unpack_base checks, without unpacking: pg_verifybackup 18 reads a tar-format backup
    itself, so base.tar.zst is decompressed into one base.tar beside the stored backup_manifest
    and checked there, rather than written out as its thousand-odd files first (most of a small
    server's verification time). The manifest inside the tar is picked out as it passes."""
    data_key = base_key(store, record)
    manifest = _manifest_object(store, record, month)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    inside = _TarWatcher((PG_MANIFEST,))

    def write(tar_stream) -> None:
        with open(folder / "base.tar", "wb") as out:
            while chunk := tar_stream.read(MiB):
                inside.feed(chunk)
                out.write(chunk)

    _read_base_tar(store, record, data_key, month, progress, write)
    (folder / PG_MANIFEST).write_bytes(manifest)
    _check_against_manifest(record, manifest, inside.members.get(PG_MANIFEST), folder, "--format=tar")


def _read_base_tar(store: ObjectStore, record: BaseBackupRecord, data_key: DataKey | None, month: str | None,
                   progress: Progress | None, consume: Callable[[Any], None]) -> None:
    """base.tar.zst of `record` opened (the object the record names, sealed chunks
    authenticated) and decompressed; `consume` reads the tar from the stream it is given, then
    the rest is read to the end (the store checks the sha256 after the last byte). Damage:
    one line."""
    import zstandard

    key = f"{layout.base_root(record.system_id, record.base_id, month)}/{BASE_TAR}"
    try:
        with _read_stored(store, key, record.sha256, data_key, key) as raw:
            counted = _CountingStream(raw, record.base_id, record.compressed_bytes, progress)
            with zstandard.ZstdDecompressor().stream_reader(counted, read_size=MiB) as tar_stream:
                consume(tar_stream)
                tar_stream.read()
            raw.read()
    except ObjectNotFound:
        raise BackupError(f"Base backup {record.base_id}'s {BASE_TAR} is missing from the store ({key})",
                          "Recover from another base backup (`maestro backup info` lists them), or take a new one") from None
    except SealBroken as exc:
        raise BackupError(f"Base backup {record.base_id} is damaged: {exc.problem}",
                          "Recover from another base backup (`maestro backup info` lists them), or take a new one") from None
    except (StoreError, zstandard.ZstdError, tarfile.TarError, EOFError, OSError) as exc:
        reason = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
        raise BackupError(f"Base backup {record.base_id} is damaged: {key}: {reason}",
                          "Recover from another base backup (`maestro backup info` lists them), or take a new one") from None
    if progress is not None:
        progress(record.base_id, record.compressed_bytes, record.compressed_bytes)


def _check_against_manifest(record: BaseBackupRecord, manifest: bytes, inside: bytes | None, folder: Path,
                            *options: str) -> None:
    """The stored manifest is the tar's own, and the files (the folder, or its base.tar with
    --format=tar) are what it lists (pg_verifybackup)."""
    if inside != manifest:
        raise BackupError(f"Base backup {record.base_id} is damaged: its stored {PG_MANIFEST} differs from the one "
                          "inside the tar", "Recover from another base backup (`maestro backup info` lists them), "
                                            "or take a new one")
    _verify_folder(folder, record.base_id, *options)


def _manifest_object(store: ObjectStore, record: BaseBackupRecord, month: str | None) -> bytes:
    """The stored backup_manifest, read whole (sha256, sealed chunks): a damaged or replaced
    one (the next incremental's `--incremental` reads it) makes the base backup damaged, as
    verify says, though a recovery uses the copy inside the tar."""
    try:
        return read_manifest(store, record, month)
    except StoreError as exc:
        where_ = f"{layout.base_root(record.system_id, record.base_id, month)}/{PG_MANIFEST}"
        raise BackupError(f"Base backup {record.base_id} is damaged: {where_}: {exc.problem}",
                          "Recover from another base backup (`maestro backup info` lists them), or take a new one") from None


def _verify_folder(folder: Path, what: str, *options: str) -> None:
    verifier = program("pg_verifybackup")
    done = subprocess.run([verifier, *options, "--no-parse-wal", "--quiet", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        said = " / ".join(line for line in (done.stderr or done.stdout).splitlines()[-3:] if line.strip())
        raise BackupError(f"Base backup {what} does not match its backup manifest (pg_verifybackup): {said}",
                          "Recover from another base backup, or take a new one (`maestro backup run --kind base`)")


def extract_base(store: ObjectStore, chain: list[BaseBackupRecord], dest: Path, progress: Progress | None = None,
                 month: str | None = None) -> Path:
    """A data directory in `dest` (absent or empty) ready for recovery: the full backup's folder,
    or the chain's folders combined by pg_combinebackup (each verified first)."""
    dest = Path(dest)
    if not chain:
        raise BackupError("No base backup to extract", "Pass a chain from base_chain()")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty", "Extract a base backup into a new folder")
    if len(chain) == 1:
        return unpack_base(store, chain[0], dest, month, progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=f".{dest.name}-parts-", dir=dest.parent))
    try:
        folders = [unpack_base(store, record, parts / record.base_id, month, progress) for record in chain]
        if dest.exists():
            dest.rmdir()
        combine = program("pg_combinebackup")
        command = [combine, "--output", str(dest)]
        if int(program_version("pg_combinebackup").split(".")[0]) >= 18:
            command.append("--link")  # the parts are removed below: linking saves a copy of every unchanged file
        done = subprocess.run(command + [str(f) for f in folders], capture_output=True, text=True)
        if done.returncode != 0:
            said = " / ".join(line for line in done.stderr.splitlines()[-3:] if line.strip())
            raise BackupError(f"pg_combinebackup of base backups {', '.join(r.base_id for r in chain)} failed: {said}",
                              "Recover from another base backup, or take a full one (`--kind full`)")
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    _verify_folder(dest, f"{chain[-1].base_id} (combined)")
    return dest


# ---- verification -------------------------------------------------------------------------


@dataclass
class BaseVerifyReport:
    base_id: str
    system_id: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    duration_s: float = 0.0
    storage_only: str | None = None
    """Encrypted, its key not at hand (why): sizes and the ciphertext's sha256 checked, no more."""


def get_base_backup(store: ObjectStore, base_id: str, system_id: str | None = None,
                    month: str | None = None) -> BaseEntry:
    for entry in list_base_backups(store, system_id, month):
        if entry.base_id == base_id:
            return entry
    raise BackupNotFound(f"There is no base backup {base_id} in the store at {store.url}",
                         "`maestro backup info` lists the base backups")


def verify_base_backup(store: ObjectStore, base_id: str, system_id: str | None = None, month: str | None = None,
                       progress: Progress | None = None, workdir: Path | None = None) -> BaseVerifyReport:
    """Read every byte of a base backup (sha256, zstd, tar; sealed: every chunk authenticated),
    check its files against its backup manifest (pg_verifybackup: on the tar itself, or
    unpacked for one older than 18), and record the outcome beside base.json (signed with its
    data key when encrypted). Encrypted and its key not at hand: the storage checks only
    (`_verify_stored`), nothing recorded."""
    started = time.monotonic()
    entry = get_base_backup(store, base_id, system_id, month)
    report = BaseVerifyReport(base_id, entry.system_id, False)
    if entry.record is None:
        report.problems.append(entry.problem or "its record cannot be read")
        return report
    if entry.record.encrypted and entry.key_error is not None:
        return _verify_stored(store, entry, report, started)
    data_key = None
    try:
        if entry.refused:
            raise BackupError(entry.refused, "Take a new base backup with the key configured")
        data_key = base_key(store, entry.record)
        with tempfile.TemporaryDirectory(prefix="maestro-verify-base-", dir=workdir) as scratch:
            if int(program_version("pg_verifybackup").split(".")[0]) >= 18:  # it reads tar-format backups
                verify_base_tar(store, entry.record, Path(scratch) / "tar", month, progress)
            else:
                unpack_base(store, entry.record, Path(scratch) / "data", month, progress)  # the manifest object too
        report.ok, report.bytes_read = True, entry.record.compressed_bytes
    except (StoreError, BackupError, BackupKeyError) as exc:
        report.problems.append(exc.problem)
    report.duration_s = round(time.monotonic() - started, 3)
    _record_verification(store, entry, report, data_key)
    return report


def _record_verification(store: ObjectStore, entry: BaseEntry, report: BaseVerifyReport,
                         data_key: DataKey | None) -> None:
    """verified.json: names base.json by its sha256 (plaintext) or by its MAC, which a rekey
    keeps, and is signed itself (encrypted; without the data key it cannot be, so it is not written)."""
    body = {"base_id": entry.base_id, "verified_at": _iso(utcnow()), "ok": report.ok, "problems": report.problems}
    if entry.record.encrypted:
        if data_key is None:
            return
        body["record_mac"] = entry.record.mac
        sign(body, data_key)
    else:
        body["record_sha256"] = _sha(store.get_bytes(f"{entry.root}/{BASE_RECORD}"))
    store.put_bytes(f"{entry.root}/{BASE_VERIFIED}", json.dumps(body, indent=1).encode(), {"base_id": entry.base_id})


def _verify_stored(store: ObjectStore, entry: BaseEntry, report: BaseVerifyReport, started: float) -> BaseVerifyReport:
    """What can be checked without the key: each object is the one the record names (size,
    recorded sha256 of the ciphertext) and every byte read matches that sha256. Bytes changed
    with the sha256 rewritten to match, or a forged record, need the key to be seen."""
    report.storage_only = entry.key_error.problem
    record = entry.record
    for name, size, sha256 in ((BASE_TAR, record.compressed_bytes, record.sha256),
                               (PG_MANIFEST, None, record.manifest_sha256)):
        key = f"{entry.root}/{name}"
        try:
            info = store.head(key)
            if info.sha256 != sha256 or (size is not None and info.size != size):
                report.problems.append(f"{key} is not the object the base backup wrote ({info.size} bytes, sha256 "
                                       f"{str(info.sha256)[:12]}...; its record says {sha256[:12]}...: replaced)")
                continue
            with store.open_read(key) as reader:
                while reader.read(MiB):
                    pass
            report.bytes_read += info.size
        except StoreError as exc:
            report.problems.append(exc.problem)
    report.ok = not report.problems
    report.duration_s = round(time.monotonic() - started, 3)
    return report


# ---- `maestro backup run` and the base backup asset ---------------------------------------


def backup_servers(targets: list[DatabaseTarget]) -> list[DatabaseTarget]:
    """One target per server among `targets` (platform and MLflow usually share one): a base
    backup is of a whole cluster."""
    seen: dict[str, DatabaseTarget] = {}
    for target in targets:
        seen.setdefault(server_where(target.url), target)
    return list(seen.values())


@dataclass
class BaseBackupRun:
    records: list[BaseBackupRecord] = field(default_factory=list)
    reports: list[BaseVerifyReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One line per server without a base backup and why (archiving off: the RPO is the dumps')."""

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.reports)


def take_base_backups(store: ObjectStore, targets: list[DatabaseTarget], kind: str = "auto", verify: bool = True,
                      required: bool = False, progress: Progress | None = None, log: Log | None = None) -> BaseBackupRun:
    """A base backup of each server of `targets`, verified. `required` False (beside the dumps):
    a server that cannot be backed up this way (archiving off, no replication privilege, a
    managed service) is skipped with a line saying the RPO it really has; True: refused."""
    run = BaseBackupRun()
    for target in backup_servers(targets):
        try:
            record = take_base_backup(store, target, kind, progress=progress, log=log)
        except BaseBackupRefused as exc:
            if required:
                raise
            run.skipped.append(f"no base backup of {server_where(target.url)}: {exc.problem}; its RPO is the latest "
                               "dump's age (the nightly backup: up to a day). " + (exc.hint or ""))
            continue
        run.records.append(record)
        if verify:
            run.reports.append(verify_base_backup(store, record.base_id, record.system_id, progress=progress))
    return run
