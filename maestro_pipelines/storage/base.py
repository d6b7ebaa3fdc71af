"""The object-store interface, its errors, and what every implementation shares.

Pure Python, no Dagster and no cloud SDK: the backup/restore CLI imports this while the
orchestrator is down, and importing it must not pay for boto3, google-cloud or azure.

What the implementations share lives here so it is written once:

- key validation (relative, `/`-separated, no `.`/`..`/empty segments, no reserved names),
- chunking of a stream into upload parts (`iter_chunks`) and the part-size schedule,
- the upload driver (`put_stream`): sha256 computed while streaming, small objects in one
  request, bigger ones as parts uploaded a few at a time (bounded memory), a commit that
  records `sha256` and `size` (atomic, or on S3 complete-then-sidecar: see s3.py), abort
  on any error,
- the verifying reader (`open_read`): hashes while the caller reads, raises
  `ChecksumMismatch` when the last byte does not make the recorded sha256 (before the
  caller sees the end), resumes an interrupted download from the byte it reached (pinned
  to the same object version); an object bigger than `PREFETCH_MIN` is read ahead by one
  thread into a bounded queue (8 x 1 MiB), so the network read overlaps the hashing,
- bounded retries with exponential backoff around every request (`RetryPolicy`).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

from maestro_pipelines.errors import MaestroError, TransientError
from maestro_pipelines.storage.readahead import read_ahead

MiB = 1024 * 1024
CHUNK_SIZE = 8 * MiB
"""Upload part / download chunk size: memory per part in flight."""
PREFETCH_MIN = 4 * MiB
"""Objects bigger than this are read ahead by a thread (small ones are not worth one)."""
PREFETCH_PIECE = MiB
PREFETCH_DEPTH = 8
"""Read-ahead: up to this many pieces wait in memory (8 MiB)."""

SHA256_KEY = "sha256"
SIZE_KEY = "size"
SHA256_SIDECAR_KEY = "sha256_sidecar"
"""Set (to the upload's unique id) on an object whose sha256 is recorded in a sidecar object
beside it, not in its own metadata (S3 multipart uploads: storage/s3.py)."""
RESERVED_METADATA = (SHA256_KEY, SIZE_KEY, SHA256_SIDECAR_KEY)

RESERVED_PREFIX = ".maestro-"
"""Names the stores use for their own bookkeeping (temporary objects, sidecars); a key
segment may not start with it, and `list()` never shows such names."""

DEFAULT_SOURCE = "MAESTRO_STORE_URL"
MAX_KEY_BYTES = 1024
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_METADATA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_QUERY = re.compile(r"(https?://[^\s?\"']*)\?[^\s\"']*")


# ---- errors -----------------------------------------------------------------------------------


class StoreError(MaestroError):
    """Any problem with the object store a user can act on."""


class ObjectNotFound(StoreError):
    """No object under that key."""


class ChecksumMismatch(StoreError):
    """The bytes read do not have the sha256 (or size) recorded when they were written."""


class ChecksumMissing(ChecksumMismatch):
    """The object has no recorded sha256, so it cannot be trusted (written outside Maestro,
    or a write that never finished)."""


class ObjectChanged(StoreError, TransientError):
    """The object was replaced while it was being read."""


class StoreUnavailable(StoreError, TransientError):
    """The store could not be reached (network, server errors, throttling) after retries."""


class StoreAccessDenied(StoreError):
    """The credentials were refused or are missing."""


class StoreNotFound(StoreError):
    """The bucket, container or folder the URL names does not exist."""


class InvalidStoreURL(StoreError):
    """The store URL (or an option) cannot be used: malformed, unknown scheme, missing SDK."""


class InvalidKey(StoreError):
    """A key or metadata that the store refuses."""


# ---- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of transient failures: `attempts` tries in all, waiting
    `backoff_s * 2**n` (capped at `max_backoff_s`, with jitter) between them."""

    attempts: int = 5
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def delay(self, retry_number: int) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * (2**retry_number))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


TRANSIENT = "transient"


# ---- the interface ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `sha256` is None when none was recorded: such an object is not good."""

    key: str
    size: int
    sha256: str | None
    last_modified: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)
    altered: bool = False
    """True when the store itself can tell the bytes were changed in place after they were
    written and recorded (the local folder store: the file's modification time is not the one
    recorded), so the recorded sha256 no longer vouches for them. False means "not seen",
    not "intact": only reading every byte proves that."""


def check_key(key: Any, url: str, source: str) -> str:
    """A key relative to the store's prefix: `/`-separated, no empty, `.` or `..` segments."""

    def bad(why: str) -> InvalidKey:
        return InvalidKey(
            f"Key {key!r} for the store at {source} ({url}) {why}",
            "Use a relative '/'-separated key such as 'backups/2026-01-01/db.dump'",
        )

    if not isinstance(key, str):
        raise bad("is not a string")
    if not key:
        raise bad("is empty")
    if key.startswith("/"):
        raise bad("starts with '/' (keys are relative to the store's prefix)")
    if _CONTROL.search(key):
        raise bad("contains a control character")
    for segment in key.split("/"):
        if segment == "":
            raise bad("has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise bad(f"has a '{segment}' segment, which would escape the store's prefix")
        if segment.startswith(RESERVED_PREFIX):
            raise bad(f"uses the reserved name prefix '{RESERVED_PREFIX}'")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise bad(f"is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_prefix(prefix: Any, url: str, source: str) -> str:
    """A listing prefix: a plain string prefix of keys ('' lists everything)."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str) or prefix.startswith("/") or _CONTROL.search(prefix) or any(
        segment in (".", "..") for segment in prefix.split("/")[:-1]
    ) or prefix.split("/")[-1] == "..":
        raise InvalidKey(
            f"Listing prefix {prefix!r} for the store at {source} ({url}) is not a relative key prefix",
            "Use a prefix such as 'backups/' without a leading '/' or '.'/'..' segments",
        )
    return prefix


def check_metadata(metadata: dict[str, str] | None, url: str, source: str) -> dict[str, str]:
    """User metadata that every store keeps as is: lowercase identifier names (S3 lowercases
    names, Azure requires identifiers) and printable ASCII values (HTTP headers)."""
    if not metadata:
        return {}
    checked: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not _METADATA_NAME.match(name) or name in RESERVED_METADATA:
            raise InvalidKey(
                f"Metadata name {name!r} for the store at {source} ({url}) is not allowed",
                "Use lowercase names of letters, digits and '_' starting with a letter; "
                f"{', '.join(RESERVED_METADATA)} are recorded by the store itself",
            )
        if not isinstance(value, str) or any(not (" " <= c <= "~") for c in value):
            raise InvalidKey(
                f"Metadata value of {name!r} for the store at {source} ({url}) is not printable ASCII text",
                "Store other values in the object itself, or encode them (e.g. base64)",
            )
        total += len(name) + len(value)
        checked[name] = value
    if total > 1536:
        raise InvalidKey(
            f"Metadata for the store at {source} ({url}) is larger than 1.5 KB",
            "Keep metadata small (S3 allows 2 KB in all); store the rest in the object",
        )
    return checked


def recorded_sha256(value: str | None) -> str | None:
    """A recorded sha256 is 64 lowercase hex digits; anything else counts as not recorded."""
    value = (value or "").strip().lower()
    return value if _SHA256_HEX.match(value) else None


def split_metadata(raw: dict[str, str] | None) -> tuple[str | None, int | None, dict[str, str]]:
    """(sha256, recorded size, user metadata) from what a store returned."""
    raw = {str(k).lower(): str(v) for k, v in (raw or {}).items()}
    sha = recorded_sha256(raw.get(SHA256_KEY))
    try:
        size = int(raw[SIZE_KEY]) if SIZE_KEY in raw else None
    except ValueError:
        size = None
    user = {k: v for k, v in raw.items() if k not in RESERVED_METADATA}
    return sha, size, user


def short_cause(exc: BaseException) -> str:
    """An exception as one short line for a message: no query strings (SAS tokens, signed
    URLs) and nothing long."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _URL_QUERY.sub(r"\1?…", text)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def iter_chunks(source: BinaryIO | Iterable[bytes], part_size: Callable[[int], int]) -> Iterator[bytes]:
    """Regroup a binary stream or an iterable of bytes into parts of `part_size(n)` bytes
    (the last one shorter). Holds at most one part plus one incoming piece in memory."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = [bytes(source)]
    elif isinstance(source, str):
        raise TypeError("put_stream needs bytes, a binary file object or an iterable of bytes, not str")
    index = 0
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            want = part_size(index)
            buffer = bytearray()
            while len(buffer) < want:
                piece = read(want - len(buffer))
                if not piece:
                    break
                if isinstance(piece, str):
                    raise TypeError("put_stream needs a binary stream; this one returned str (open it with 'rb')")
                buffer += piece
            if buffer:
                yield bytes(buffer)
            if len(buffer) < want:
                return
            index += 1
    buffer = bytearray()
    for piece in source:
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise TypeError(f"put_stream's iterable yielded {type(piece).__name__}, not bytes")
        buffer += piece
        while len(buffer) >= part_size(index):
            want = part_size(index)
            with memoryview(buffer) as view:
                part = bytes(view[:want])  # one copy
            del buffer[:want]  # bytearray drops its head in O(1) amortised
            yield part
            del part
            index += 1
    if buffer:
        yield bytes(buffer)


class PartUpload(ABC):
    """One upload in progress, driven by `ObjectStore.put_stream`."""

    @abstractmethod
    def upload_part(self, index: int, offset: int, data: bytes, last: bool) -> Any:
        """Send part `index` (0-based) that starts at byte `offset`; return a token for commit.
        Called again with the same arguments after a transient failure."""

    @abstractmethod
    def commit(self, tokens: list[Any], metadata: dict[str, str]) -> datetime | None:
        """Make the object count under its key, with `metadata` (sha256 and size included):
        one atomic step, or (S3) steps of which only the last makes it count, an object
        left by an earlier one reading as absent. If no part was flagged `last` (the stream
        ended on a part boundary), the size is `metadata["size"]`."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever the upload left behind; best effort, never raises."""


class ObjectStore(ABC):
    """A flat namespace of immutable-once-written objects under one URL prefix.

    Every object written through it records the sha256 of its bytes (and their count),
    computed while streaming, in its metadata (S3 multipart objects: in a sidecar); reads verify it unless told not to. Objects
    become visible under their key only once complete and marked, never half-written.
    """

    url: str
    """Where the store points, without secrets: for messages."""

    scheme: str = ""
    max_parts: int | None = None
    """How many parts one upload may have (None: no limit), for the part-size schedule."""
    part_concurrency: int = 4
    """Parts uploaded at the same time; memory is about (this + 2) x part size."""
    keyring: Any = None
    """The backup keys (`maestro_pipelines.crypto.Keyring`) backups written here are sealed
    with, as configured (`open_configured_store(keyring=...)`); None: none configured. The
    store itself never encrypts: the backup library seals what it writes (backup/sealing.py)."""

    def __init__(self, url: str, source: str = DEFAULT_SOURCE, retry: RetryPolicy | None = None):
        self.url = url
        self.source = source
        self.retry = retry or RetryPolicy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---- hooks the network implementations provide ----------------------------------------

    def classify(self, exc: BaseException) -> str | None:
        """`TRANSIENT` for errors worth retrying, else None."""
        return None

    def translate(self, exc: BaseException, key: str | None, action: str) -> BaseException:
        """The MaestroError a user should see for `exc` (or `exc` itself if it is a bug)."""
        return exc

    def _put_single(self, key: str, data: bytes, metadata: dict[str, str]) -> datetime | None:
        raise NotImplementedError

    def _begin_upload(self, key: str, metadata: dict[str, str]) -> PartUpload:
        raise NotImplementedError

    def _open(self, key: str) -> tuple[ObjectInfo, Any, Callable[[int], Any] | None]:
        """(info, stream with read(n) and close(), reopen(offset) -> stream or None)."""
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return check_key(key, self.url, self.source)

    def _call(self, action: str, fn: Callable[[], Any], key: str | None = None) -> Any:
        """Run one request with bounded retries of transient failures, translating errors."""
        retry = 0
        while True:
            try:
                return fn()
            except MaestroError:
                raise
            except Exception as exc:
                if self.classify(exc) == TRANSIENT:
                    if retry + 1 < self.retry.attempts:
                        time.sleep(self.retry.delay(retry))
                        retry += 1
                        continue
                    raise self.unavailable(exc, action, retry + 1) from exc
                translated = self.translate(exc, key, action)
                if translated is exc:
                    raise
                raise translated from exc

    def unavailable(self, exc: BaseException, action: str, attempts: int) -> StoreUnavailable:
        return StoreUnavailable(
            f"Could not {action} at {self.source} ({self.url}) after {attempts} attempt(s): {short_cause(exc)}",
            f"Check that the store's endpoint is reachable from here and healthy, then retry; "
            f"{self.source} says where the store is",
        )

    def not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(
            f"No object {key!r} in the store at {self.source} ({self.url})",
            "Check the key (list() shows what the store holds); it may not be written yet or was deleted",
        )

    def part_size(self, index: int) -> int:
        """8 MiB parts; when an upload may only have `max_parts` parts, the size doubles every
        `max_parts // 5` parts so that very large streams still fit (S3: 484 GiB)."""
        if not self.max_parts:
            return CHUNK_SIZE
        return CHUNK_SIZE * (2 ** min(index // (self.max_parts // 5), 4))

    # ---- the public interface --------------------------------------------------------------

    def put_stream(
        self, key: str, stream: BinaryIO | Iterable[bytes], metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        """Write a stream under `key`, recording its sha256 and size; constant memory."""
        key = self._key(key)
        user = check_metadata(metadata, self.url, self.source)
        hasher = hashlib.sha256()
        chunks = iter_chunks(stream, self.part_size)
        first = next(chunks, b"")
        hasher.update(first)
        second = next(chunks, None)
        if second is None:
            meta = {**user, SHA256_KEY: hasher.hexdigest(), SIZE_KEY: str(len(first))}
            modified = self._call("write", lambda: self._put_single(key, first, meta), key)
            return ObjectInfo(key, len(first), meta[SHA256_KEY], modified, user)

        def parts(pending: list[bytes]) -> Iterator[bytes]:
            """Every part in order; the two already read are handed over, not kept."""
            while pending:
                yield pending.pop(0)
            yield from chunks

        all_parts = parts([first, second])
        del first, second
        upload: PartUpload = self._call("start an upload", lambda: self._begin_upload(key, user), key)
        try:
            tokens: list[Any] = []
            inflight: deque[Future] = deque()
            offset = 0

            def send(index: int, offset: int, data: bytes, last: bool) -> Any:
                return self._call("upload a part", lambda: upload.upload_part(index, offset, data, last), key)

            with ThreadPoolExecutor(max_workers=self.part_concurrency, thread_name_prefix="maestro-upload") as pool:
                try:
                    for index, part in enumerate(all_parts):
                        if index > 0:
                            hasher.update(part)
                        # A short part is the last; a stream ending on a part boundary is
                        # finished by commit() (which knows the size).
                        last = len(part) < self.part_size(index)
                        inflight.append(pool.submit(send, index, offset, part, last))
                        offset += len(part)
                        del part  # the future holds it until sent; memory stays bounded
                        while len(inflight) >= self.part_concurrency:
                            tokens.append(inflight.popleft().result())
                    while inflight:
                        tokens.append(inflight.popleft().result())
                finally:
                    for pending in inflight:
                        pending.cancel()
            meta = {**user, SHA256_KEY: hasher.hexdigest(), SIZE_KEY: str(offset)}
            modified = self._call("finish the upload", lambda: upload.commit(tokens, meta), key)
        except BaseException:
            upload.abort()
            raise
        return ObjectInfo(key, offset, meta[SHA256_KEY], modified, user)

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> ObjectInfo:
        return self.put_stream(key, [bytes(data)], metadata)

    def open_read(self, key: str, verify: bool = True) -> BinaryIO:
        """A streaming reader. With `verify`, reading the last byte checks the recorded sha256
        and size (ChecksumMismatch), and an object without a recorded sha256 is refused
        (ChecksumMissing) before any byte is returned."""
        key = self._key(key)
        info, stream, reopen = self._call("read", lambda: self._open(key), key)
        if verify and info.sha256 is None:
            _close_quietly(stream)
            raise ChecksumMissing(
                f"Object {key!r} in the store at {self.source} ({self.url}) has no recorded sha256, "
                "so its bytes cannot be verified",
                "It was written outside Maestro or its write never finished: write it again, or read "
                "it with verify=False if you trust it",
            )
        source: Any = _ResumingStream(self, key, stream, reopen)
        if info.size > PREFETCH_MIN:
            source = _PrefetchingStream(source)
        raw = _VerifyingReader(self, info, source, verify)
        return io.BufferedReader(raw, buffer_size=MiB)  # type: ignore[return-value]

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        """The whole object in memory: for small objects only."""
        with self.open_read(key, verify=verify) as reader:
            return reader.read()

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """The object's size, sha256 and metadata; ObjectNotFound if there is none."""

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, all pages, sorted by key. With
        `with_metadata=False` the entries carry no sha256/metadata (S3 then needs no HEAD per
        object)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; nothing happens if it does not exist."""

    @abstractmethod
    def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        """Server-side copy that keeps the recorded sha256 and the metadata."""

    def discard_unfinished(self, prefix: str = "", started_before: datetime | None = None) -> list[str]:
        """Remove what writes of keys starting with `prefix` left behind when they never
        finished (killed, or their own clean-up failed with the store): S3's open multipart
        uploads and objects completed without their sha256 sidecar, GCS's temporary objects,
        the local store's temporary files. Only those started before `started_before` when given: call it without only
        for keys no running process can be writing. Returns one line per thing removed.

        Not reachable through the APIs, so left to the store's own expiry: GCS resumable
        sessions that never got a byte (a week), Azure's uncommitted blocks (a week)."""
        return []


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass


class _ResumingStream:
    """The object's bytes in order from one stream: after a transient failure the stream is
    reopened at the byte reached (`reopen`, pinned by the store to the same object version),
    within the store's `RetryPolicy`."""

    def __init__(self, store: ObjectStore, key: str, stream: Any, reopen):
        self._store = store
        self._key = key
        self._stream = stream
        self._reopen = reopen
        self.position = 0
        self._closed = False

    def read(self, n: int) -> bytes:
        retry = 0
        while True:
            try:
                data = self._stream.read(n)
                self.position += len(data)
                return data
            except MaestroError:
                raise
            except Exception as exc:
                store = self._store
                if self._closed:
                    return b""  # closed by the reader (from its thread): no reopening
                if self._reopen is None or store.classify(exc) != TRANSIENT:
                    translated = store.translate(exc, self._key, "read")
                    if translated is exc:
                        raise
                    raise translated from exc
                if retry + 1 >= store.retry.attempts:
                    raise store.unavailable(exc, "read", retry + 1) from exc
                _close_quietly(self._stream)
                time.sleep(store.retry.delay(retry))
                retry += 1
                position = self.position
                self._stream = store._call("read", lambda: self._reopen(position), self._key)

    def close(self) -> None:
        self._closed = True
        _close_quietly(self._stream)


class _PrefetchingStream:
    """A `_ResumingStream` read ahead by a thread (`readahead.read_ahead`), so that the network
    (or disk) read of the next pieces overlaps the caller's hashing and work. At most `depth`
    pieces of `piece` bytes wait in memory; errors arrive in order, after the bytes read
    before them."""

    def __init__(self, source: _ResumingStream, piece: int = PREFETCH_PIECE, depth: int = PREFETCH_DEPTH):
        self._source = source
        self._pieces = read_ahead(iter(lambda: source.read(piece), b""), depth, "maestro-read-ahead")
        self._current = memoryview(b"")

    def read(self, n: int) -> bytes:
        if not self._current:
            piece = next(self._pieces, None)  # after an error raised here: None, the end
            if piece is None:
                return b""
            self._current = memoryview(piece)
        data, self._current = self._current[:n], self._current[n:]
        return data  # a memoryview: the caller copies it once, into its own buffer

    def close(self) -> None:
        self._source.close()  # first: a thread blocked in a read returns (no reopening after close)
        self._pieces.close()  # stops the thread at its next hand-over and waits for it


class _VerifyingReader(io.RawIOBase):
    """Hashes what the caller reads; checks sha256 and size when the last byte arrives,
    before the caller sees the end of the stream."""

    def __init__(self, store: ObjectStore, info: ObjectInfo, stream: Any, verify: bool):
        self._store = store
        self._info = info
        self._stream = stream
        self._verify = verify
        self._hash = hashlib.sha256() if verify else None
        self._expected = info.size
        self._position = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def _mismatch(self, what: str) -> ChecksumMismatch:
        store = self._store
        return ChecksumMismatch(
            f"Object {self._info.key!r} in the store at {store.source} ({store.url}) is corrupt: {what}",
            "Do not use it: restore it from another copy or write it again",
        )

    def _check(self) -> None:
        self._checked = True
        if not self._verify:
            return
        if self._position != self._expected:
            raise self._mismatch(f"{self._position} bytes read, {self._expected} recorded")
        digest = self._hash.hexdigest()
        if digest != self._info.sha256:
            raise self._mismatch(f"sha256 {digest[:16]}... read, {self._info.sha256[:16]}... recorded")

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("read from a closed object reader")
        want = len(buffer)
        if want == 0:
            return 0
        data = self._stream.read(want)
        if not data:
            if not self._checked:
                self._check()
            return 0
        if self._checked and self._verify:
            self._position += len(data)
            raise self._mismatch(f"more than the {self._expected} recorded bytes")
        n = len(data)
        buffer[:n] = data
        self._position += n
        if self._hash is not None:
            self._hash.update(data)
        if self._verify and self._position >= self._expected:
            self._check()
        return n

    def readall(self) -> bytes:
        parts = []
        while True:
            chunk = self.read(MiB)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class PrefixedStore(ObjectStore):
    """A store of objects named `<prefix>/<key>` in one bucket or container."""

    container_word = "bucket"

    def __init__(self, scheme: str, bucket: str, prefix: str, source: str, retry: RetryPolicy | None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        super().__init__(f"{scheme}://{bucket}/{self.prefix}".rstrip("/"), source, retry)

    def _name(self, key: str) -> str:
        return self._base + key

    def _key_of(self, name: str) -> str | None:
        """The key of a listed object name, or None for the store's own temporary objects."""
        key = name[len(self._base):]
        if any(segment.startswith(RESERVED_PREFIX) for segment in key.split("/")):
            return None
        return key

    def _temp_name(self, key: str | None = None) -> str:
        """`<prefix>/.maestro-tmp/<key>/<uuid>`: what a failed or killed write of `key` left
        can be found by the key (`discard_unfinished`); without the key when it would be too long."""
        unique = uuid.uuid4().hex
        temp_root = f"{self._base}{RESERVED_PREFIX}tmp/"
        if key is not None and len((temp_root + key).encode("utf-8")) + 40 <= MAX_KEY_BYTES:
            return f"{temp_root}{key}/{unique}"
        return f"{temp_root}{unique}"

    def _temp_search(self, prefix: str) -> str:
        """The name prefix of the temporary objects of writes of keys starting with `prefix`."""
        return f"{self._base}{RESERVED_PREFIX}tmp/{check_prefix(prefix, self.url, self.source)}"

    def missing_container(self) -> StoreNotFound:
        word = self.container_word
        return StoreNotFound(
            f"The {word} '{self.bucket}' named by {self.source} ({self.url}) does not exist",
            f"Create the {word}, or point {self.source} at an existing one",
        )

    def access_denied(self, action: str, detail: str, hint: str) -> StoreAccessDenied:
        return StoreAccessDenied(
            f"The store at {self.source} ({self.url}) refused to {action}: {detail}", hint
        )
