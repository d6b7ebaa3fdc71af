"""Verifying a backup: every object re-read against the manifest's size and sha256, each
dump decompressed and its table of contents read by `pg_restore --list`.

This proves the archive is intact and readable by pg_restore, not that it restores: the DR
drill proves that. Every verification writes `verified.json`, naming the manifest's sha256
and whether it passed: a backup that fails replaces an earlier success with its failure, so
it stops counting as good and `maestro backup list` shows it as BAD.
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
from maestro_pipelines.backup.types import MiB, Progress
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

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_dump(store: ObjectStore, key: str, expected_dump_bytes: int, report: VerifyReport,
               label: str, progress: Progress | None) -> tuple[str | None, int]:
    """Stream one dump: verified read -> zstd -> pg_restore --list. (problem, TABLE DATA count)."""
    import zstandard

    with tempfile.TemporaryFile() as listing, tempfile.TemporaryFile() as stderr:
        lister = subprocess.Popen(
            [program("pg_restore"), "--list"], stdin=subprocess.PIPE, stdout=listing, stderr=stderr
        )
        decompressed = 0
        feeding = True
        try:
            with store.open_read(key) as raw:
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
                            # is still read to the end for the sha256 and zstd checksums.
                            feeding = False
                    if progress is not None and decompressed % (64 * MiB) < MiB:
                        progress(label, decompressed, expected_dump_bytes)
        except zstandard.ZstdError as exc:
            return f"{key} is not a valid zstd stream ({exc})", 0
        except StoreError as exc:
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


def verify_backup(store: ObjectStore, backup_id: str, month: str | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check one backup end to end; record the result in the store (verified.json written on
    success, removed on failure). Never raises for a bad backup: the report lists what is wrong."""
    started = time.monotonic()
    entry: BackupEntry = get_backup(store, backup_id, month)
    report = VerifyReport(entry.backup_id)
    verified_key = f"{entry.root}/{VERIFIED_NAME}"
    manifest = entry.manifest
    if manifest is None:
        report.problems.append(entry.problem or "the manifest cannot be read")
    else:
        for dump in manifest.databases:
            key = object_key(entry, dump.key)
            report.objects += 1
            problem = object_problem(store, key, dump.compressed_bytes, dump.sha256, check_altered=False)
            if problem is None:
                label = f"{dump.role} ({dump.database})"
                problem, entries = _read_dump(store, key, dump.dump_bytes, report, label, progress)
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
                try:
                    body = json.loads(store.get_bytes(key))
                    if len(body["objects"]) != record.count:
                        problem = f"{key} lists {len(body['objects'])} artifacts, the manifest says {record.count}"
                except (StoreError, ValueError, KeyError) as exc:
                    problem = f"{key} cannot be read ({exc})"
                report.bytes_read += record.size
            if problem:
                report.problems.append(problem)
    report.duration_s = round(time.monotonic() - started, 3)
    # Recorded either way: a failure replaces an earlier success, so the backup stops
    # counting as good and is listed as BAD (not as merely unverified).
    record = VerificationRecord(
        backup_id=entry.backup_id,
        manifest_sha256=entry.manifest_sha256 or "",
        verified_at=utcnow(),
        objects=report.objects,
        bytes_read=report.bytes_read,
        duration_s=report.duration_s,
        ok=report.ok,
        problems=[p if len(p) <= 300 else p[:297] + "..." for p in report.problems[:10]],
    )
    store.put_bytes(verified_key, record.to_json(), {"backup_id": entry.backup_id})
    return report
