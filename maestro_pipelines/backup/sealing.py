"""Where backups meet the keys: what the backup library writes to the store is sealed here.

One place decides, for every kind of object (dumps, base backups, WAL segments, records):

- `new_data_key(store, what)`: a backup's own data key under the store's keyring (None: no
  key configured, the backup is plaintext; MAESTRO_BACKUP_ENCRYPTION=required refuses);
- `seal(data_key, chunks)`: the chunks as written (sealed when there is a key);
- `open_object(store, key, key_for, what)`: an object read back, sealed or (older) plain;
- `put_envelope(body, data_key)` / `data_key_of(store, body, what)`: the data key's envelope
  in a record (manifest, base.json, key record) and back;
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
    open_sealed_or_plain,
    record_mac,
    record_mac_valid,
    seal_chunks,
)
from maestro_pipelines.crypto.keys import KEY_VARIABLE, KMS_VARIABLE, BackupKeyError
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
                verify: bool = True) -> BinaryIO:
    """The plaintext of `key`: sealed (opened with `key_for`, a DataKey or key_id -> DataKey)
    or plain (a backup from before encryption). A sealed object and no key: one line."""

    def missing(key_id: str) -> DataKey:
        raise BackupKeyError(f"{what} is encrypted but its record names no data key (data key {key_id})",
                             "Do not restore from it: use another restore point")

    return open_sealed_or_plain(store.open_read(key, verify=verify), key_for or missing, what)


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
