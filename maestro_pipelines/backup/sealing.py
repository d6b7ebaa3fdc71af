"""Where backups meet the keys: what the backup library writes to the store is sealed here.

One place decides, for every kind of object (dumps, base backups, WAL segments, records):

- `new_data_key(store, what)`: a backup's own data key under the store's keyring (None: no
  key configured, the backup is plaintext; MAESTRO_BACKUP_ENCRYPTION=required refuses);
- `seal(data_key, chunks)`: the chunks as written (sealed when there is a key);
- `open_object(store, key, key_for, what)`: an object read back, sealed or (older) plain;
  `open_bytes(data, data_key, what)`: sealed bytes kept inside a record;
- `put_envelope(body, data_key)` / `data_key_of(store, body, what)`: the data key's envelope
  in a record (manifest, base.json, key record) and back; `usable_data_key` tells a record
  whose key is not at hand (unchecked) from one whose envelope the key refuses (bad);
- `sign(body, data_key)` / `check_signature(store, body, data_key, what)`: the record's MAC.

The store's keyring is `store.keyring` (set by `open_configured_store`); a store opened
without one reads and writes plaintext exactly as before encryption existed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from maestro_pipelines.crypto import (
    DataKey,
    Envelope,
    Keyring,
    SealBroken,
    open_sealed_or_plain,
    record_mac,
    record_mac_valid,
    seal_chunks,
)
from maestro_pipelines.crypto.keys import KEY_VARIABLE, KMS_VARIABLE, BackupKeyError, BackupKeyWrong
from maestro_pipelines.storage import ObjectStore

ENCRYPTION_FIELD = "encryption"
CLOUD_SCHEMES = ("s3", "gs", "az")


class RecordForged(BackupKeyError):
    """A record whose MAC does not match under its data key: edited by someone without the key."""


def keyring_of(store: ObjectStore) -> Keyring:
    return getattr(store, "keyring", None) or Keyring()


def new_data_key(store: ObjectStore, what: str) -> DataKey | None:
    return keyring_of(store).new_data_key(what)


def seal(data_key: DataKey | None, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks` sealed under `data_key`, or as they are without one."""
    if data_key is None:
        return iter(chunks)
    return seal_chunks(data_key, chunks)


def open_object(store: ObjectStore, key: str, key_for: DataKey | Callable[[str], DataKey] | None, what: str,
                verify: bool = True, sealed_only: bool = False) -> BinaryIO:
    """The plaintext of `key`: sealed (opened with `key_for`, a DataKey or key_id -> DataKey)
    or plain (a backup from before encryption). A sealed object and no key: one line.
    `sealed_only`: the object's record is encrypted, so a plain object there was put in its
    place by someone without the key (SealBroken)."""

    def missing(key_id: str) -> DataKey:
        raise BackupKeyError(f"{what} is encrypted but its record names no data key (data key {key_id})",
                             "Do not restore from it: use another restore point")

    def plain() -> None:
        raise SealBroken(f"{what} is not encrypted though its backup is: it was replaced by someone without the key",
                         "Do not restore from it: use another restore point, and find out who can write the store")

    raw = store.open_read(key, verify=verify)
    try:
        return open_sealed_or_plain(raw, key_for or missing, what, on_plain=plain if sealed_only else None)
    except BaseException:
        raw.close()
        raise


def open_bytes(data: bytes, data_key: DataKey, what: str) -> bytes:
    """The plaintext of `data`, bytes sealed by `seal` and kept inside a record (a drill
    record's body); SealBroken when they do not authenticate under `data_key`."""
    import io

    with open_sealed_or_plain(io.BytesIO(data), data_key, what, on_plain=lambda: _not_sealed(what)) as reader:
        return reader.read()


def _not_sealed(what: str) -> None:
    raise SealBroken(f"{what} is not encrypted though its record is: it was replaced by someone without the key",
                     "Do not trust it, and find out who can write the store")


def put_envelope(body: dict[str, Any], data_key: DataKey | None) -> dict[str, Any]:
    """`body` with the data key's envelope under `encryption` (unchanged without a key)."""
    if data_key is not None:
        body[ENCRYPTION_FIELD] = data_key.envelope.to_dict()
    return body


def envelope_of(body: dict[str, Any], what: str) -> Envelope | None:
    raw = body.get(ENCRYPTION_FIELD)
    return None if raw is None else Envelope.from_dict(raw, what)


def data_key_of(store: ObjectStore, body: dict[str, Any], what: str) -> DataKey | None:
    """The data key a record's envelope holds, unwrapped by the store's keyring; None for a
    plaintext record. The KEK missing or wrong: one line naming the key it needs."""
    envelope = envelope_of(body, what)
    return None if envelope is None else keyring_of(store).open(envelope, what)


def usable_data_key(store: ObjectStore, body: dict[str, Any], what: str) -> tuple[DataKey | None, BackupKeyError | None]:
    """(data key, None) for a record whose envelope opens (None, None: a plaintext record);
    (None, the error) when the key it needs is not at hand: no key configured, only others,
    the key service down or refusing Maestro: the record is unchecked, not bad. A malformed
    envelope, or one the configured key does not open (altered), raises: that record is bad."""
    envelope = envelope_of(body, what)
    if envelope is None:
        return None, None
    try:
        return keyring_of(store).open(envelope, what), None
    except BackupKeyWrong as exc:
        if keyring_of(store).kek(envelope.kek_id) is not None:
            raise
        return None, exc
    except BackupKeyError as exc:
        return None, exc


def sign(body: dict[str, Any], data_key: DataKey | None) -> dict[str, Any]:
    """`body` with its `mac` (keyed from the data key; unchanged without one). Call last,
    after every other field, `encryption` included, is in place."""
    if data_key is not None:
        body["mac"] = record_mac(body, data_key)
    return body


def check_signature(body: dict[str, Any], data_key: DataKey | None, what: str) -> None:
    """RecordForged unless `body`'s MAC is right under `data_key` (a plaintext record passes)."""
    if data_key is not None and not record_mac_valid(body, data_key):
        raise RecordForged(
            f"{what} does not match its signature: it was altered or replaced by someone without the backup key",
            "Do not restore from it: use another restore point, and find out who can write the store",
        )


def unencrypted_warning(store: ObjectStore) -> str | None:
    """The warning a cloud store's plaintext backups carry; None when sealed or local."""
    if keyring_of(store).encrypts or getattr(store, "scheme", "") not in CLOUD_SCHEMES:
        return None
    return (f"backups in {store.url} are not encrypted: whoever can read the bucket reads every tenant's data; "
            f"set {KEY_VARIABLE} (`maestro backup keygen`) or {KMS_VARIABLE}")
