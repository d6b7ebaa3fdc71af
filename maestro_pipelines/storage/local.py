"""The local folder store: `file:///abs/path`, the embedded default `$MAESTRO_HOME/store`.

Layout under the root folder:

    <root>/<key>                                   the object's bytes, as a plain file
    <root>/.maestro-meta/<key>/.maestro-ino-<N>.json   its sha256, size and metadata
    <root>/<dir>/.maestro-tmp-<uuid>               a write in progress (never listed)

**Atomic writes.** Bytes go to a temporary file in the key's own folder (same filesystem),
hashed on the way, then fsync. The sidecar for that file is written next (itself to a
temporary name, fsync, rename), and only then is the data renamed over the key with
`os.replace` and the folder fsynced. A reader sees the old object or the new one, never a
partial one.

**Why the sidecar is named after the inode.** A sidecar is only believed for the file whose
inode number it carries. The new object's sidecar exists before its rename, and the old
object's sidecar is still there until after it, so at every instant the file under the key
is described by its own sidecar: an overwrite can never pair new metadata with old bytes
(or the reverse), and a crash at any point leaves either the old good object or the new
good object (plus a stale sidecar or temp file, both ignored and cleaned on the next write
or delete). A file put there by something else has no sidecar, so it reads as unverified.

**What a head can tell.** The sidecar also records the file's modification time (ns) when
it was written: a file written to in place afterwards (an editor, `dd conv=notrunc`, a
truncation) has another one, and `head` reports it as `altered`. Bit rot on the disk and a
writer that restores the old mtime are not seen that way: only reading the bytes against
the sha256 (`open_read`, `maestro backup verify`) catches those.

A folder cannot hold both an object `a` and objects under `a/`: that write raises InvalidKey.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, unquote

from maestro_pipelines.storage.backends import Backend, BadURL, StoreLocation, mlflow_artifacts_beside
from maestro_pipelines.storage.base import (
    CHUNK_SIZE,
    DEFAULT_SOURCE,
    RESERVED_PREFIX,
    ChecksumMismatch,
    InvalidKey,
    ObjectInfo,
    ObjectStore,
    RetryPolicy,
    StoreAccessDenied,
    StoreError,
    StoreNotFound,
    check_metadata,
    check_prefix,
    iter_chunks,
    recorded_sha256,
)

META_DIR = f"{RESERVED_PREFIX}meta"
TMP_PREFIX = f"{RESERVED_PREFIX}tmp-"
SIDECAR_PREFIX = f"{RESERVED_PREFIX}ino-"
WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
STALE_TEMP_S = 3600
"""A temporary file not written to for this long belongs to a writer that died (SIGKILL,
power loss): deleting an object removes such files beside it."""


class _SourceFailed(Exception):
    """Carries an exception raised by the caller's stream past the OS-error translation."""

    def __init__(self, original: BaseException):
        self.original = original


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, timezone.utc)


def _create_temp(parent: Path) -> tuple[Path, int]:
    """A new temporary file in `parent` (made if missing), opened for writing: (path, fd)."""
    for attempt in range(3):
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileNotFoundError:  # a concurrent delete pruned the empty folder
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


WRITEBACK_EVERY = 16 * 1024 * 1024
"""Bytes written between two starts of the disk writeback (`_writeback_starter`)."""


@functools.cache
def _writeback_starter():
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) through libc, or None elsewhere. Looked
    up on the first write, not at import: every Dagster process imports the stores, and
    ctypes is not something loading the code location should pay for."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: function(fd, offset, length, 2)  # 2: SYNC_FILE_RANGE_WRITE


# Why the writeback is started while writing: the page cache would otherwise hold a whole
# object's bytes until the closing fsync, and the writer would then wait for all of them;
# started every WRITEBACK_EVERY bytes, the disk writes while the object streams in and the
# fsync, still the only guarantee, waits for the tail alone (measured, benchmarks/backup.py at
# 1 GB, a 130 MB object on a 350 MB/s disk: the fsync waits 0.01 s, 0.05-0.08 s without; more
# on a slower disk or a bigger object).


def _write_hashed(fd: int, chunks: Iterable[bytes]) -> tuple[str, int, os.stat_result]:
    """Write every chunk to `fd`, hashing on the way, then fsync and close it: (sha256, size, stat).
    A failure of the source (not of the disk) is raised as _SourceFailed."""
    hasher = hashlib.sha256()
    size = flushed = 0
    start_writeback = _writeback_starter()
    with open(fd, "wb") as f:
        iterator = iter(chunks)
        while True:
            try:
                chunk = next(iterator, None)
            except Exception as exc:
                raise _SourceFailed(exc) from exc
            if chunk is None:
                break
            hasher.update(chunk)
            size += len(chunk)
            f.write(chunk)
            if start_writeback is not None and size - flushed >= WRITEBACK_EVERY:
                f.flush()
                start_writeback(f.fileno(), flushed, size - flushed)
                flushed = size
        f.flush()
        os.fsync(f.fileno())
        st = os.fstat(f.fileno())
    return hasher.hexdigest(), size, st


class LocalObjectStore(ObjectStore):
    scheme = "file"

    def __init__(
        self,
        root: str | os.PathLike,
        source: str = DEFAULT_SOURCE,
        *,
        create: bool = False,
        retry: RetryPolicy | None = None,
    ):
        """`create`: make the root folder on first write (the embedded default). Off for a
        configured URL, so that an unmounted disk is reported instead of silently replaced
        by an empty folder."""
        self.root = Path(root).expanduser().resolve()
        super().__init__(self.root.as_uri(), source, retry)
        self.create = create
        self._meta_root = self.root / META_DIR

    # ---- paths and errors ----------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _meta_dir(self, key: str) -> Path:
        return self._meta_root.joinpath(*key.split("/"))

    def _sidecar(self, key: str, inode: int) -> Path:
        return self._meta_dir(key) / f"{SIDECAR_PREFIX}{inode}.json"

    def _missing_root(self) -> StoreNotFound:
        return StoreNotFound(
            f"The folder {self.root} of {self.source} ({self.url}) does not exist or is not a folder",
            f"Create it (mkdir -p {self.root}), mount the disk it lives on, or point {self.source} "
            "at an existing folder",
        )

    def _root_ready(self, writing: bool) -> bool:
        """True if the root folder exists (created first when writing with `create`)."""
        if self.root.is_dir():
            return True
        if writing and self.create and not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            return True
        if self.create and not self.root.exists():
            return False  # an embedded store nobody has written to yet: empty
        raise self._missing_root()

    def translate(self, exc: BaseException, key: str | None, action: str) -> BaseException:
        where = f"the store at {self.source} ({self.url})"
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EROFS:
            return StoreAccessDenied(
                f"Could not {action} in {where}: permission denied on {getattr(exc, 'filename', None) or self.root}",
                "Give the user running Maestro read and write access to the folder, or point "
                f"{self.source} at another one",
            )
        if isinstance(exc, FileNotFoundError):
            if not self.root.is_dir():
                return self._missing_root()
            return self.not_found(key) if key else exc
        if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
            return InvalidKey(
                f"Key {key!r} conflicts with an existing object or folder in {where}",
                "In a folder store a key cannot be both an object and the prefix of other keys "
                "('a' and 'a/b'): choose another key",
            )
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            return InvalidKey(
                f"Key {key!r} is too long for the filesystem of {where}",
                "Keep each '/'-separated segment under 255 bytes",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return StoreError(f"No space left to {action} in {where}", "Free space on that disk or move the store")
        return exc

    # ---- sidecars ------------------------------------------------------------------------

    def _read_sidecar(self, key: str, inode: int) -> dict[str, Any] | None:
        try:
            record = json.loads(self._sidecar(key, inode).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("inode") == inode else None

    def _write_json(self, path: Path, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode("utf-8")
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            except FileNotFoundError:  # a concurrent delete pruned the empty folder
                if attempt == 2:
                    raise
                continue
            try:
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return

    def _drop_sidecars(self, key: str, keep: str | None = None) -> None:
        folder = self._meta_dir(key)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(RESERVED_PREFIX) and entry.name != keep and entry.is_file():
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _drop_stale_temps(self, folder: Path) -> None:
        cutoff = time.time() - STALE_TEMP_S
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            try:
                if entry.name.startswith(TMP_PREFIX) and entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass

    def _prune(self, folder: Path, stop: Path) -> None:
        """Remove empty folders from `folder` up to (not including) `stop`."""
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def _info(self, key: str, st: os.stat_result, record: dict[str, Any] | None) -> ObjectInfo:
        record = record or {}
        metadata = record.get("metadata") or {}
        recorded_mtime = record.get("mtime_ns")
        return ObjectInfo(
            key=key,
            size=st.st_size,
            sha256=recorded_sha256(record.get("sha256")),
            last_modified=_mtime(st),
            metadata={str(k): str(v) for k, v in metadata.items()},
            # Same inode, other modification time: written to in place (bit rot does not
            # change it; an editor, `dd conv=notrunc` or a truncation does). Sidecars written
            # before mtime_ns was recorded cannot tell.
            altered=isinstance(recorded_mtime, int) and recorded_mtime != st.st_mtime_ns,
        )

    # ---- writing -------------------------------------------------------------------------

    def _write(
        self, key: str, chunks: Iterable[bytes], metadata: dict[str, str], expected_sha256: str | None = None,
        record_sha256: bool = True, copied_from: str | None = None,
    ) -> ObjectInfo:
        self._root_ready(writing=True)
        path = self._path(key)
        parent = path.parent
        tmp, fd = _create_temp(parent)
        sidecar: Path | None = None
        published = False
        try:
            digest, size, st = _write_hashed(fd, chunks)
            if expected_sha256 is not None and digest != expected_sha256:
                # The corrupt object is the source: naming the destination sends the user to a
                # key that was never written.
                raise ChecksumMismatch(
                    f"Object {copied_from or key!r} in the store at {self.source} ({self.url}) is corrupt: "
                    f"its bytes do not match its recorded sha256 (found while copying it to {key!r}, not written)",
                    "Restore the source object from another copy or write it again",
                )
            sidecar = self._sidecar(key, st.st_ino)
            self._write_json(
                sidecar,
                {"inode": st.st_ino, "sha256": digest if record_sha256 else None, "size": size, "metadata": metadata,
                 "mtime_ns": st.st_mtime_ns},
            )
            os.replace(tmp, path)
            published = True
            _fsync_dir(parent)
        except BaseException:
            if not published:
                tmp.unlink(missing_ok=True)
                if sidecar is not None:
                    sidecar.unlink(missing_ok=True)
            raise
        self._drop_sidecars(key, keep=sidecar.name)
        return ObjectInfo(key, size, digest if record_sha256 else None, _mtime(st), dict(metadata))

    def put_stream(
        self, key: str, stream: BinaryIO | Iterable[bytes], metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        key = self._key(key)
        user = check_metadata(metadata, self.url, self.source)
        chunks = iter_chunks(stream, lambda _index: CHUNK_SIZE)
        try:
            return self._call("write", lambda: self._write(key, chunks, user), key)
        except _SourceFailed as failed:
            raise failed.original from None

    # ---- reading -------------------------------------------------------------------------

    def _open(self, key: str):
        if not self._root_ready(writing=False):
            raise self.not_found(key)
        path = self._path(key)
        for attempt in range(3):
            try:
                f = open(path, "rb")
            except (IsADirectoryError, NotADirectoryError):
                raise self.not_found(key) from None
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                f.close()
                raise self.not_found(key)
            record = self._read_sidecar(key, st.st_ino)
            if record is None and attempt < 2:
                try:
                    replaced = os.stat(path).st_ino != st.st_ino
                except FileNotFoundError:
                    replaced = False
                if replaced:  # overwritten between open and sidecar read: open the new one
                    f.close()
                    continue
            return self._info(key, st, record), f, None
        raise AssertionError("unreachable")

    def head(self, key: str) -> ObjectInfo:
        key = self._key(key)

        def head() -> ObjectInfo:
            if not self._root_ready(writing=False):
                raise self.not_found(key)
            path = self._path(key)
            for attempt in range(3):
                try:
                    st = os.stat(path)
                except NotADirectoryError:
                    raise self.not_found(key) from None
                if not stat.S_ISREG(st.st_mode):
                    raise self.not_found(key)
                record = self._read_sidecar(key, st.st_ino)
                if record is None and attempt < 2 and os.stat(path).st_ino != st.st_ino:
                    continue
                return self._info(key, st, record)
            raise AssertionError("unreachable")

        return self._call("look up an object", head, key)

    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix, self.url, self.source)
        if not self._call("list", lambda: self._root_ready(writing=False)):
            return
        folder_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder_key.split("/")) if folder_key else self.root
        if not start.is_dir():
            return
        yield from self._walk(start, folder_key, prefix, with_metadata)

    def _walk(self, folder: Path, rel: str, prefix: str, with_metadata: bool) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(folder) as scan:
                entries = []
                for entry in scan:
                    if entry.name.startswith(RESERVED_PREFIX):
                        continue
                    is_dir = entry.is_dir(follow_symlinks=False)
                    # A folder sorts as "name/": then a depth-first walk yields keys in order.
                    entries.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
        except FileNotFoundError:
            return
        entries.sort(key=lambda item: item[0])
        for _, entry, is_dir in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            if is_dir:
                if prefix.startswith(key + "/") or (key + "/").startswith(prefix):
                    yield from self._walk(Path(entry.path), key, prefix, with_metadata)
                continue
            if not key.startswith(prefix):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            if not stat.S_ISREG(st.st_mode):
                continue
            record = self._read_sidecar(key, st.st_ino) if with_metadata else None
            info = self._info(key, st, record)
            yield info if with_metadata else ObjectInfo(key, info.size, None, info.last_modified, {})

    # ---- delete and copy -----------------------------------------------------------------

    def delete(self, key: str) -> None:
        key = self._key(key)

        def delete() -> None:
            if not self._root_ready(writing=False):
                return
            path = self._path(key)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except (IsADirectoryError, PermissionError):
                if not path.is_dir():
                    raise
                return  # a folder of other keys is not an object
            self._drop_sidecars(key)
            self._drop_stale_temps(path.parent)
            self._prune(self._meta_dir(key), self._meta_root.parent)
            self._prune(path.parent, self.root)

        self._call("delete", delete, key)

    def discard_unfinished(self, prefix: str = "", started_before: datetime | None = None) -> list[str]:
        """Temporary files (`.maestro-tmp-*`) of writes of keys under `prefix` that never
        finished; with `started_before`, only those not written to since then."""
        prefix = check_prefix(prefix, self.url, self.source)
        if not self._root_ready(writing=False):
            return []
        folder_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(folder_key) if folder_key else self.root
        cutoff = started_before.timestamp() if started_before is not None else None
        removed = []
        for dirpath, dirnames, filenames in os.walk(start):
            folder = Path(dirpath)
            rel = folder.relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            # Not into the store's records, nor folders no key under prefix can be in.
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)
                           and ((rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/"))]
            if not (rel.startswith(prefix) or (prefix.startswith(rel) and "/" not in prefix[len(rel):])):
                continue  # a temporary file here is for a key outside prefix
            for name in filenames:
                path = folder / name
                try:
                    if not name.startswith(TMP_PREFIX) or (cutoff is not None and path.stat().st_mtime >= cutoff):
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue  # finished (renamed) or removed meanwhile
                removed.append(f"temporary file {rel}{name}")
            if folder != self.root:
                self._prune(folder, self.root)
        return removed

    def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        source_key = self._key(source_key)
        dest_key = self._key(dest_key)
        info, reader, _ = self._call("read", lambda: self._open(source_key), source_key)
        with reader:
            chunks = iter(lambda: reader.read(CHUNK_SIZE), b"")
            return self._call(
                "copy",
                lambda: self._write(
                    dest_key, chunks, info.metadata, expected_sha256=info.sha256, record_sha256=info.sha256 is not None,
                    copied_from=source_key,
                ),
                dest_key,
            )


# ---- the backend ----------------------------------------------------------------------------


def _parse_file_url(backend: Backend, scheme: str, parts: SplitResult, bad: BadURL) -> StoreLocation:
    if parts.netloc not in ("", "localhost"):
        raise bad(
            f"names the host '{parts.netloc}'",
            "A file URL needs three slashes and an absolute path: file:///absolute/folder",
        )
    path = unquote(parts.path)
    if not path or not os.path.isabs(path) and not WINDOWS_PATH.match(path.lstrip("/")):
        raise bad("has no absolute path", "Write it as file:///absolute/folder")
    return StoreLocation("file", str(Path(path).resolve()))


def _open(location: StoreLocation, source: str, **options: Any) -> LocalObjectStore:
    return LocalObjectStore(location.bucket, source=source, **options)


BACKEND = Backend(
    name="file",
    schemes=("file",),
    example="file:///absolute/folder",
    open=_open,
    parse=_parse_file_url,
    url_of=lambda location: Path(location.bucket).as_uri(),
    artifact_uri=mlflow_artifacts_beside,
)
