"""Phase 2, fetch: every dump downloaded and checked before any database is touched.

The store's reader checks each object's sha256 at its last byte, the seal of an encrypted
backup's each 1 MiB chunk before a byte of it is written out (and its order and end), zstd its
frame checksum, and the sizes must match the manifest; the artifact list is read and checked
here too, so a damaged or forged object stops the restore before any database is created. pg_restore needs a file for `-j` (it seeks), so dumps
are decompressed to a local work folder: the one place a restore needs free space (about
the uncompressed dump size, `dump_bytes`). The folder's name carries the pid, so a later
restore removes the folders of restores whose process died.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from maestro_pipelines.backup.catalog import BackupEntry, object_key
from maestro_pipelines.backup.manifest import DatabaseDump
from maestro_pipelines.storage.readahead import read_ahead
from maestro_pipelines.backup.restore.check import read_artifact_list
from maestro_pipelines.backup.restore.state import RestoreError, RestoreState
from maestro_pipelines.backup.sealing import open_object
from maestro_pipelines.crypto import SealBroken
from maestro_pipelines.backup.types import MiB, Progress
from maestro_pipelines.formatting import human_bytes
from maestro_pipelines.processes import process_alive
from maestro_pipelines.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

WORKDIR_PREFIX = "maestro-restore-"
READ_AHEAD = 4
"""Decompressed 4 MiB blocks the reading thread (store read, sha256, seal, zstd) may run ahead
of the file writes; 0: one thread does both in turn. Nothing else runs during the download
(pg_restore has not started), so the second core is free for it; the download step's time is
in benchmarks/results/restore.json."""
_PICK_ANOTHER = "Nothing was restored. Pick another restore point (`maestro backup list`)"


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """Remove the download folders of restores whose process died (killed, OOM, power): each
    holds a whole decompressed dump, the disk space the next restore needs."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def open_workdir(state: RestoreState) -> Path:
    """The restore's work folder: the caller's, or a new one of its own (after removing what
    dead restores left), which `clean_up` removes."""
    if state.workdir is None:
        for stale in remove_stale_workdirs():
            state.log(f"removed {stale}, left by a restore whose process is gone")
        # The pid in the name lets a later restore know the folder's owner is gone.
        state.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        state.own_workdir = True
    return state.workdir


def _check_stored_object(store: ObjectStore, entry: BackupEntry, dump: DatabaseDump, key: str) -> None:
    """The object is there with the manifest's size and the sha256 the store recorded."""
    try:
        info = store.head(key)
    except ObjectNotFound:
        raise RestoreError(f"{key} of backup {entry.backup_id} is missing from the store at {store.url}",
                           _PICK_ANOTHER) from None
    if info.size != dump.compressed_bytes or info.sha256 != dump.sha256:
        # Only what differs; the sha256 is the one the store recorded at write time (a truncated
        # object keeps it), so it is never shown as if it were the hash of the bytes there now.
        if info.size != dump.compressed_bytes:
            differs = f"it has {info.size} bytes, the manifest says {dump.compressed_bytes} (truncated or replaced)"
        else:
            recorded = f"sha256 {info.sha256[:12]}..." if info.sha256 else "no sha256"
            differs = f"the store records {recorded} for it, the manifest says {dump.sha256[:12]}... (replaced)"
        raise RestoreError(
            f"{key} in the store at {store.url} does not match backup {entry.backup_id}'s manifest: {differs}",
            _PICK_ANOTHER,
        )


def reserve_space(out, size: int, folder: Path) -> None:
    """The file's `size` bytes allocated before the first write: a full disk stops the restore
    before it reads a byte, and the writes that follow only copy (ext4 allocating blocks as
    700 MB were written cost up to 1 s of kernel time, measured in benchmarks/restore.py)."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(out.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(folder).free
            raise RestoreError(
                f"The restore's work folder {folder} has {human_bytes(free)} free; the dump needs {human_bytes(size)}",
                "Free space there, or point TMPDIR at a folder with room, and restore again",
            ) from None
        # EOPNOTSUPP and the like: a file system that cannot reserve; the writes allocate instead


def download_dump(store: ObjectStore, entry: BackupEntry, dump: DatabaseDump, path: Path,
                  progress: Progress | None = None) -> None:
    """Stream one dump from the store into `path`, decrypted (an encrypted backup's, with
    `entry.data_key`) and decompressed; the store's reader checks the sha256 at the last byte,
    the seal each chunk, zstd its frame checksum; the size must match the manifest."""
    import zstandard

    key = object_key(entry, dump.key)
    _check_stored_object(store, entry, dump, key)
    written = 0
    label = f"{dump.role} ({dump.database})"
    what = f"{key} of backup {entry.backup_id}"
    try:
        with open_object(store, key, entry.data_key, what, sealed_only=entry.encrypted) as raw, open(path, "wb") as out:
            reserve_space(out, dump.dump_bytes, path.parent)
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=MiB)
            blocks = iter(lambda: reader.read(4 * MiB), b"")
            if READ_AHEAD:  # read, checked and decompressed on a thread while this one writes (storage/readahead.py)
                blocks = read_ahead(blocks, READ_AHEAD, name=f"download-{dump.role}")
            for block in blocks:
                out.write(block)
                written += len(block)
                if progress is not None and written % (64 * MiB) < 4 * MiB:
                    progress(label, written, dump.dump_bytes)
    except SealBroken as exc:  # names the object already
        raise RestoreError(exc.problem, _PICK_ANOTHER) from None
    except (ChecksumMismatch, zstandard.ZstdError) as exc:  # damage; a store outage propagates as itself
        raise RestoreError(f"{key} of backup {entry.backup_id} is damaged: {getattr(exc, 'problem', exc)}",
                           _PICK_ANOTHER) from None
    if written != dump.dump_bytes:
        raise RestoreError(
            f"{key} of backup {entry.backup_id} decompresses to {written} bytes, the manifest says {dump.dump_bytes}",
            _PICK_ANOTHER,
        )
    if progress is not None:
        progress(label, written, dump.dump_bytes)


def fetch(state: RestoreState) -> None:
    """The step `download and check`: every dump of the restore into the work folder
    (`plan.file`), each checked; nothing on any server is touched."""
    folder = open_workdir(state)

    def download() -> str:
        try:
            state.artifact_list = read_artifact_list(state.store, state.entry)
        except (SealBroken, ChecksumMismatch, ObjectNotFound) as exc:
            raise RestoreError(exc.problem, _PICK_ANOTHER) from None
        except ValueError as exc:
            raise RestoreError(f"the artifact list of backup {state.entry.backup_id} is not valid JSON ({exc})",
                               _PICK_ANOTHER) from None
        stored = dumped = 0
        for plan in state.databases:
            path = folder / f"{plan.role}.dump"
            download_dump(state.store, state.entry, plan.dump, path, state.progress)
            plan.file = path
            stored, dumped = stored + plan.dump.compressed_bytes, dumped + plan.dump.dump_bytes
        # Compressed, as in the store (`backup list`'s size adds the backup's artifact list);
        # unpacked: what pg_restore reads.
        count = len(state.databases)
        return (f"{count} dump{'' if count == 1 else 's'}, {human_bytes(stored)} compressed read "
                f"({human_bytes(dumped)} unpacked), sha256 and sizes match the manifest")

    state.log(f"downloading backup {state.entry.backup_id} (every object checked before any database is touched)")
    state.timed("download and check", download)


def use_fetched(state: RestoreState, files: dict[str, Path]) -> None:
    """Instead of the download: dumps the caller already has on local disk (role -> a file
    or a pg_dump directory, which pg_restore reads alike)."""
    for plan in state.databases:
        if plan.role not in files or not Path(files[plan.role]).exists():
            raise RestoreError(f"The {plan.role} dump was not made", "Run the restore again")
        plan.file = Path(files[plan.role])
