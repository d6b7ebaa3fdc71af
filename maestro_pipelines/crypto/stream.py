"""Sealed objects: a stream encrypted and authenticated in chunks, in constant memory.

    header   MAGIC (8) | data key id (16) | salt (32) | chunk size (4, big-endian)
    chunk i  AES-256-GCM(subkey, nonce = i (11 bytes, big-endian) | last (1), plaintext, aad = header)

The subkey is HKDF-SHA256(data key, salt, "maestro sealed object v1"): one per object, so a
chunk moved from another object (even of the same backup) fails; the counter in the nonce
catches a chunk removed, repeated or moved; the last-chunk flag catches a stream cut at a
chunk boundary. This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015)
that age and libsodium's secretstream use, over `cryptography`'s AES-GCM; nothing here is a
cipher of its own. Encryption happens after compression, so the size grows by 16 bytes per
chunk (1 MiB) and 60 for the header.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from maestro_pipelines.crypto.keys import DataKey
from maestro_pipelines.errors import MaestroError

SEAL_MAGIC = b"MSEAL\x00\x01\n"
CHUNK = 1024 * 1024
TAG = 16
HEADER = struct.Struct(">8s16s32sI")
MAX_CHUNK = 64 * 1024 * 1024


class SealBroken(MaestroError):
    """A sealed object that does not authenticate: damaged, cut short, or altered."""


def _broken(what: str, detail: str) -> SealBroken:
    return SealBroken(f"{what} is damaged or was tampered with ({detail})",
                      "Do not restore from it: use another restore point (`maestro backup verify` names the sound ones)")


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _chunk_key(data_key: DataKey, salt: bytes) -> bytes:
    return data_key.subkey(b"sealed object v1", salt)


def sealed_size(plain_size: int, chunk: int = CHUNK) -> int:
    """The stored size of a sealed object of `plain_size` bytes."""
    chunks = max(1, -(-plain_size // chunk))
    return HEADER.size + plain_size + chunks * TAG


def is_sealed(prefix: bytes) -> bool:
    return prefix.startswith(SEAL_MAGIC)


def sealed_key_id(header: bytes) -> str:
    """The data key id a sealed object's first bytes name."""
    return HEADER.unpack_from(header)[1].hex()


def seal_chunks(data_key: DataKey, chunks: Iterable[bytes], chunk: int = CHUNK) -> Iterator[bytes]:
    """`chunks` (any sizes) sealed: the header, then one sealed chunk per `chunk` bytes."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = HEADER.pack(SEAL_MAGIC, bytes.fromhex(data_key.key_id), os.urandom(32), chunk)
    aead = AESGCM(_chunk_key(data_key, header[24:56]))
    yield header
    pending = bytearray()
    index = 0
    for data in chunks:
        pending += data
        while len(pending) > chunk:
            yield aead.encrypt(_nonce(index, False), bytes(pending[:chunk]), header)
            del pending[:chunk]
            index += 1
    yield aead.encrypt(_nonce(index, True), bytes(pending), header)


class SealedReader(io.RawIOBase):
    """The plaintext of a sealed object read from `raw`. `key_for(key_id)` gives the data key
    the header names (a DataKey may be given instead). Every chunk is authenticated before a
    byte of it is returned; a broken one raises SealBroken naming `what`."""

    def __init__(self, raw: BinaryIO, key_for: Callable[[str], DataKey] | DataKey, what: str):
        self.raw = raw
        self.what = what
        self._key_for = key_for if callable(key_for) else (lambda key_id, key=key_for: key)
        self._plain = memoryview(b"")
        self._aead = None
        self._pending: bytes | None = None
        self._index = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _read_exactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = self.raw.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _start(self) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        header = self._read_exactly(HEADER.size)
        if len(header) < HEADER.size or not is_sealed(header):
            raise _broken(self.what, "it does not start with a sealed-object header")
        _, key_id, salt, chunk = HEADER.unpack(header)
        if not 0 < chunk <= MAX_CHUNK:
            raise _broken(self.what, "its header names an impossible chunk size")
        data_key = self._key_for(key_id.hex())
        if data_key.key_id != key_id.hex():
            raise _broken(self.what, f"it is sealed under data key {key_id.hex()}, not under its backup's")
        self._header, self._chunk = header, chunk
        self._aead = AESGCM(_chunk_key(data_key, salt))
        self._pending = self._read_exactly(chunk + TAG)

    def _next_plain(self) -> bytes:
        from cryptography.exceptions import InvalidTag

        if self._aead is None:
            self._start()
        pending = self._pending
        if not pending:
            raise _broken(self.what, f"it ends after chunk {self._index} without its last chunk: cut short")
        following = self._read_exactly(self._chunk + TAG)
        last = not following
        if not last and len(pending) != self._chunk + TAG:
            raise _broken(self.what, f"chunk {self._index} is short")
        try:
            plain = self._aead.decrypt(_nonce(self._index, last), pending, self._header)
        except InvalidTag:
            state = "last" if last else "next"
            raise _broken(self.what, f"chunk {self._index} fails authentication as the {state} chunk") from None
        self._index += 1
        self._pending = following
        self._done = last
        return plain

    def readinto(self, buffer) -> int:
        while not self._plain:
            if self._done:
                return 0
            self._plain = memoryview(self._next_plain())
        n = min(len(buffer), len(self._plain))
        buffer[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def readall(self) -> bytes:
        parts = [bytes(self._plain)]
        self._plain = memoryview(b"")
        while not self._done:
            parts.append(self._next_plain())
        return b"".join(parts)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


class _Prefixed(io.RawIOBase):
    """`prefix` then the rest of `raw`: the bytes peeked to tell sealed from plain, given back."""

    def __init__(self, prefix: bytes, raw: BinaryIO):
        self._prefix = memoryview(prefix)
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def open_sealed_or_plain(raw: BinaryIO, key_for: Callable[[str], DataKey] | DataKey | None, what: str,
                         on_plain: Callable[[], None] | None = None) -> BinaryIO:
    """A reader of the plaintext whether `raw` is sealed or (an older backup) plain. `key_for`
    None on a sealed object: the caller's `key_for` raises the missing-key error itself, so
    pass a function that does. `on_plain` is called when the object is plain (a reader that
    must refuse plaintext, MAESTRO_BACKUP_ENCRYPTION=required, raises there)."""
    prefix = b""
    while len(prefix) < len(SEAL_MAGIC):
        data = raw.read(len(SEAL_MAGIC) - len(prefix))
        if not data:
            break
        prefix += data
    if is_sealed(prefix):
        return io.BufferedReader(SealedReader(_Prefixed(prefix, raw), key_for, what), CHUNK)  # type: ignore[arg-type]
    if on_plain is not None:
        on_plain()
    return io.BufferedReader(_Prefixed(prefix, raw), CHUNK)
