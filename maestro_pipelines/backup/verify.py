"""Verifying a backup: every object re-read against the manifest's size and sha256, each
dump decrypted (an encrypted backup), decompressed and its table of contents read by
`pg_restore --list`.

This proves the archive is intact and readable by pg_restore, not that it restores: the DR
drill proves that. Every verification writes `verified.json`, naming the manifest (its
sha256; an encrypted backup's by its MAC, and signed with the backup's data key) and whether
it passed: a backup that fails replaces an earlier success with its failure, so it stops
counting as good and `maestro backup list` shows it as BAD.

An encrypted backup without its key (none configured, or another one) gets the checks the
store allows: every object there with the manifest's size, its bytes read against the
manifest's sha256 (of the sealed bytes), each sealed under the manifest's data key id. That
finds damage and swapped objects, not a forged manifest (the MAC needs the key), so it is
reported as storage checks only and no verified.json is written.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from maestro_pipelines.backup.catalog import BackupEntry, get_backup, object_key, object_problem
from maestro_pipelines.backup.manifest import VERIFIED_NAME, VerificationRecord, utcnow
from maestro_pipelines.backup.pgtools import program
from maestro_pipelines.backup.sealing import SealBroken, open_object, sign
from maestro_pipelines.backup.types import MiB, Progress
from maestro_pipelines.crypto import BackupKeyError, is_sealed, sealed_key_id, sealed_size
from maestro_pipelines.crypto.stream import HEADER
from maestro_pipelines.storage import ObjectStore, StoreError


@dataclass
class VerifyReport:
    backup_id: str
    problems: list[str] = field(default_factory=list)
    objects: int = 0
    bytes_read: int = 0
    duration_s: float = 0.0
    toc_entries: dict[str, int] = field(default_factory=dict)
    """role -> TABLE DATA entries pg_restore found."""
    storage_only: str | None = None
    """Set when only the storage could be checked (an encrypted backup without its key): why."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_dump(store: ObjectStore, entry: BackupEntry, key: str, expected_dump_bytes: int, label: str,
               progress: Progress | None) -> tuple[str | None, int]:
    """Stream one dump: verified read -> (decrypt) -> zstd -> pg_restore --list. (problem, TABLE DATA count)."""
    import zstandard

    with tempfile.TemporaryFile() as listing, tempfile.TemporaryFile() as stderr:
        lister = subprocess.Popen(
            [program("pg_restore"), "--list"], stdin=subprocess.PIPE, stdout=listing, stderr=stderr
        )
        decompressed = 0
        feeding = True
        try:
            with open_object(store, key, entry.data_key, key, sealed_only=entry.encrypted) as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=MiB)
                while True:
                    block = reader.read(MiB)
                    if not block:
                        break
                    decompressed += len(block)
                    if feeding:
                        try:
                            lister.stdin.write(block)
                        except (BrokenPipeError, OSError):
                            # pg_restore --list stops after the table of contents; the rest
                            # is still read to the end for the seal, sha256 and zstd checksums.
                            feeding = False
                    if progress is not None and decompressed % (64 * MiB) < MiB:
                        progress(label, decompressed, expected_dump_bytes)
        except zstandard.ZstdError as exc:
            return f"{key} is not a valid zstd stream ({exc})", 0
        except (StoreError, SealBroken, BackupKeyError) as exc:
            return exc.problem, 0  # names the object already
        finally:
            try:
                lister.stdin.close()
            except OSError:
                pass
            code = lister.wait()
        if progress is not None:
            progress(label, decompressed, expected_dump_bytes)
        if decompressed != expected_dump_bytes:
            return f"{key} decompresses to {decompressed} bytes, the manifest says {expected_dump_bytes}", 0
        if code != 0:
            stderr.seek(0)
            message = stderr.read().decode("utf-8", "replace").strip().splitlines()
            return f"pg_restore cannot read {key}: {message[-1] if message else 'exit ' + str(code)}", 0
        listing.seek(0)
        entries = sum(1 for line in listing.read().decode("utf-8", "replace").splitlines() if " TABLE DATA " in line)
        return None, entries


def _check_artifact_list(store: ObjectStore, entry: BackupEntry, key: str, count: int) -> str | None:
    try:
        with open_object(store, key, entry.data_key, key, sealed_only=entry.encrypted) as reader:
            body = json.loads(reader.read())
        if len(body["objects"]) != count:
            return f"{key} lists {len(body['objects'])} artifacts, the manifest says {count}"
    except (StoreError, SealBroken, BackupKeyError) as exc:
        return exc.problem
    except (ValueError, KeyError, TypeError) as exc:
        return f"{key} cannot be read ({exc})"
    return None


def _full_checks(store: ObjectStore, entry: BackupEntry, report: VerifyReport, progress: Progress | None) -> None:
    """Every object read, opened with the backup's data key when it is encrypted."""
    manifest = entry.manifest
    for dump in manifest.databases:
        key = object_key(entry, dump.key)
        report.objects += 1
        problem = object_problem(store, key, dump.compressed_bytes, dump.sha256, check_altered=False)
        if problem is None:
            label = f"{dump.role} ({dump.database})"
            problem, entries = _read_dump(store, entry, key, dump.dump_bytes, label, progress)
            report.bytes_read += dump.compressed_bytes
            if problem is None:
                report.toc_entries[dump.role] = entries
                with_rows = sum(1 for t in dump.tables if t.rows)
                if entries < with_rows:
                    problem = f"{key} holds data for {entries} tables, the manifest counted rows in {with_rows}"
        if problem:
            report.problems.append(problem)
    if manifest.artifacts:
        record = manifest.artifacts
        key = object_key(entry, record.key)
        report.objects += 1
        problem = object_problem(store, key, record.size, record.sha256, check_altered=False)
        if problem is None:
            problem = _check_artifact_list(store, entry, key, record.count)
            report.bytes_read += record.size
        if problem:
            report.problems.append(problem)


def _storage_problem(store: ObjectStore, key: str, size: int, sha256: str, key_id: str,
                     zstd_bytes: int | None) -> str | None:
    """What the store shows wrong with one sealed object, without the key: its head against
    the manifest, every byte against the sha256, its header naming the backup's data key."""
    if zstd_bytes is not None and sealed_size(zstd_bytes) != size:
        return f"the manifest's sizes for {key} do not fit together (sealed {size}, compressed {zstd_bytes})"
    problem = object_problem(store, key, size, sha256, check_altered=False)
    if problem is not None:
        return problem
    try:
        with store.open_read(key) as reader:  # the sha256 is checked at the last byte
            header = reader.read(HEADER.size)
            while reader.read(4 * MiB):
                pass
    except StoreError as exc:
        return exc.problem
    if not is_sealed(header):
        return f"{key} is not encrypted though its backup is: it was replaced by someone without the key"
    if sealed_key_id(header) != key_id:
        return f"{key} is sealed under data key {sealed_key_id(header)}, not its backup's {key_id} (moved from another backup)"
    return None


def _storage_checks(store: ObjectStore, entry: BackupEntry, report: VerifyReport) -> None:
    """The keyless checks of an encrypted backup (see the module's docstring)."""
    manifest = entry.manifest
    key_id = manifest.encryption.get("key_id", "")
    objects = [(d.key, d.compressed_bytes, d.sha256, d.zstd_bytes) for d in manifest.databases]
    if manifest.artifacts:
        objects.append((manifest.artifacts.key, manifest.artifacts.size, manifest.artifacts.sha256, None))
    for manifest_key, size, sha256, zstd_bytes in objects:
        key = object_key(entry, manifest_key)
        report.objects += 1
        problem = _storage_problem(store, key, size, sha256, key_id, zstd_bytes)
        report.bytes_read += size
        if problem:
            report.problems.append(problem)


def verify_backup(store: ObjectStore, backup_id: str, month: str | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check one backup end to end; record the result in the store (verified.json, passed or
    failed). Never raises for a bad backup: the report lists what is wrong. An encrypted
    backup without its key: storage checks only (`report.storage_only`), nothing recorded."""
    started = time.monotonic()
    entry: BackupEntry = get_backup(store, backup_id, month)
    report = VerifyReport(entry.backup_id)
    if entry.manifest is None:
        report.problems.append(entry.problem or "the manifest cannot be read")
    elif entry.unchecked:
        report.storage_only = entry.key_error.problem
        _storage_checks(store, entry, report)
        report.duration_s = round(time.monotonic() - started, 3)
        return report  # a keyless check cannot vouch for the manifest: nothing recorded
    else:
        _full_checks(store, entry, report, progress)
    report.duration_s = round(time.monotonic() - started, 3)
    _record(store, entry, report)
    return report


def _record(store: ObjectStore, entry: BackupEntry, report: VerifyReport) -> None:
    """verified.json, either way: a failure replaces an earlier success, so the backup stops
    counting as good and is listed as BAD (not as merely unverified). Encrypted: naming the
    manifest by its MAC and signed under the backup's data key."""
    manifest = entry.manifest
    record = VerificationRecord(
        backup_id=entry.backup_id,
        manifest_sha256=entry.manifest_sha256 or "",
        verified_at=utcnow(),
        objects=report.objects,
        bytes_read=report.bytes_read,
        duration_s=report.duration_s,
        ok=report.ok,
        problems=[p if len(p) <= 300 else p[:297] + "..." for p in report.problems[:10]],
        manifest_mac=manifest.mac if manifest is not None and manifest.encrypted else None,
    )
    body = sign(record.to_dict(), entry.data_key)
    store.put_bytes(f"{entry.root}/{VERIFIED_NAME}", json.dumps(body, indent=2, sort_keys=True).encode(),
                    {"backup_id": entry.backup_id})
