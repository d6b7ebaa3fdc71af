"""The sealed stream (crypto/stream.py) against what a writer of the bucket can do to an
object: cut it, drop, repeat or move a chunk, flip a bit, splice in chunks of another object.
Small chunks (64 bytes) so that many-chunk objects are a few hundred bytes."""

from __future__ import annotations

import io
import os

import pytest

from maestro_pipelines.crypto import Keyring, LocalKey, SealBroken, SealedReader, is_sealed, open_sealed_or_plain
from maestro_pipelines.crypto import seal_chunks, sealed_key_id, sealed_size
from maestro_pipelines.crypto.stream import HEADER, TAG

CHUNK = 64
SEALED_CHUNK = CHUNK + TAG
KEK = LocalKey(os.urandom(32))


@pytest.fixture(scope="module")
def data_key():
    return Keyring(KEK).new_data_key("the test object")


def seal(data_key, plain: bytes, pieces: int = 3) -> bytes:
    """`plain` sealed, handed to the sealer in uneven pieces (as a zstd stream hands them)."""
    cuts = sorted({0, len(plain), *(len(plain) * k // pieces + k for k in range(1, pieces))})
    parts = [plain[a:b] for a, b in zip(cuts, cuts[1:])]
    return b"".join(seal_chunks(data_key, parts, chunk=CHUNK))


def unseal(sealed: bytes, key, read_size: int | None = None) -> bytes:
    reader = SealedReader(io.BytesIO(sealed), key, "the test object")
    if read_size is None:
        return reader.readall()
    out = bytearray()
    while chunk := reader.read(read_size):
        out += chunk
    return bytes(out)


def chunks_of(sealed: bytes) -> tuple[bytes, list[bytes]]:
    body = sealed[HEADER.size:]
    return sealed[:HEADER.size], [body[i:i + SEALED_CHUNK] for i in range(0, len(body), SEALED_CHUNK)]


def broken(sealed: bytes, key, detail: str) -> None:
    with pytest.raises(SealBroken) as caught:
        unseal(sealed, key)
    assert "the test object is damaged or was tampered with" in str(caught.value)
    assert detail in str(caught.value), str(caught.value)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_and_stored_size(data_key, size):
    plain = os.urandom(size)
    sealed = seal(data_key, plain)
    assert len(sealed) == sealed_size(size, CHUNK)
    assert unseal(sealed, data_key) == plain
    assert unseal(sealed, lambda key_id: data_key, read_size=7) == plain
    assert is_sealed(sealed) and sealed_key_id(sealed) == data_key.key_id


def test_an_exact_multiple_of_the_chunk_ends_with_a_full_last_chunk(data_key):
    _, chunks = chunks_of(seal(data_key, os.urandom(2 * CHUNK)))
    assert [len(c) for c in chunks] == [SEALED_CHUNK, SEALED_CHUNK]


def test_empty_stream_is_one_authenticated_empty_chunk(data_key):
    sealed = seal(data_key, b"")
    assert len(sealed) == HEADER.size + TAG == sealed_size(0)
    assert unseal(sealed, data_key) == b""
    broken(sealed[:HEADER.size], data_key, "without its last chunk: cut short")


def test_stored_size_of_the_default_chunk():
    assert sealed_size(0) == HEADER.size + TAG
    assert sealed_size(1024 * 1024) == HEADER.size + 1024 * 1024 + TAG
    assert sealed_size(1024 * 1024 + 1) == HEADER.size + 1024 * 1024 + 1 + 2 * TAG


def test_truncation_anywhere_is_detected(data_key):
    sealed = seal(data_key, os.urandom(3 * CHUNK + 10))
    header, chunks = chunks_of(sealed)
    broken(sealed[:HEADER.size - 1], data_key, "does not start with a sealed-object header")
    broken(sealed[:HEADER.size], data_key, "cut short")
    broken(sealed[:-1], data_key, "chunk 3 fails authentication as the last chunk")
    # Cut at a chunk boundary: every chunk left authenticates, but not as the last one.
    broken(header + b"".join(chunks[:3]), data_key, "chunk 2 fails authentication as the last chunk")
    broken(header + chunks[0], data_key, "chunk 0 fails authentication as the last chunk")


def test_chunk_removed_duplicated_or_moved(data_key):
    header, chunks = chunks_of(seal(data_key, os.urandom(4 * CHUNK + 5)))
    a, b, c, d, last = chunks
    broken(header + a + c + d + last, data_key, "chunk 1 fails authentication")          # removed
    broken(header + a + b + b + c + d + last, data_key, "chunk 2 fails authentication")  # duplicated
    broken(header + a + c + b + d + last, data_key, "chunk 1 fails authentication")      # moved
    broken(header + a + b + c + last + d, data_key, "chunk 3 fails authentication")      # last not last
    broken(header + a + b + c + d + last + last, data_key, "chunk 4 fails authentication as the last")  # appended


def test_every_flipped_bit_is_detected(data_key):
    sealed = seal(data_key, os.urandom(2 * CHUNK + 3))
    for position in range(len(sealed)):
        for bit in (0x01, 0x80):
            damaged = bytearray(sealed)
            damaged[position] ^= bit
            with pytest.raises(SealBroken):
                unseal(bytes(damaged), data_key)


def test_splice_from_another_object_of_the_same_key_is_detected(data_key):
    """Each object has its own subkey (the header's salt): a chunk, or the whole header, of
    another object sealed under the same data key does not authenticate here."""
    plain = os.urandom(3 * CHUNK)
    header, chunks = chunks_of(seal(data_key, plain))
    other_header, other_chunks = chunks_of(seal(data_key, plain))
    broken(header + chunks[0] + other_chunks[1] + chunks[2], data_key, "chunk 1 fails authentication")
    broken(other_header + b"".join(chunks), data_key, "chunk 0 fails authentication")


def test_another_data_key_is_refused(data_key):
    other = Keyring(KEK).new_data_key()
    sealed = seal(data_key, b"the marker 9f8e7d")
    broken(sealed, other, f"it is sealed under data key {data_key.key_id}, not under its backup's")
    # Its header says whose it is: a reader given the right key by id opens it.
    assert unseal(sealed, {data_key.key_id: data_key, other.key_id: other}.__getitem__) == b"the marker 9f8e7d"


def test_plain_and_sealed_objects_read_through_one_door(data_key):
    plain_seen = []
    assert open_sealed_or_plain(io.BytesIO(b"zstd bytes"), None, "old", lambda: plain_seen.append(1)).read() == b"zstd bytes"
    assert plain_seen == [1]
    assert open_sealed_or_plain(io.BytesIO(b"short"), None, "tiny").read() == b"short"
    sealed = seal(data_key, b"x" * (CHUNK * 2 + 1))
    assert open_sealed_or_plain(io.BytesIO(sealed), data_key, "new", lambda: plain_seen.append(2)).read() == b"x" * (CHUNK * 2 + 1)
    assert plain_seen == [1]


def test_an_impossible_chunk_size_in_the_header(data_key):
    sealed = bytearray(seal(data_key, b"abc"))
    sealed[HEADER.size - 4:HEADER.size] = (0).to_bytes(4, "big")
    broken(bytes(sealed), data_key, "impossible chunk size")
