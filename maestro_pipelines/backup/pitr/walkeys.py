"""WAL key records: where the data keys of sealed WAL live, since WAL has no manifest.

    pitr/<system_id>/keys/<YYYYMMDD>-<key_id>.json
        {"format_version": 1, "system_id", "created_at", "encryption": <envelope>, "mac", "digest"}

The first push of a day (UTC) with a backup key makes one (a new data key, wrapped by the
current KEK, the record signed with that key); every later push of the day reuses it, so a
segment costs one listing of today's records and no new key. Two pushes that both find none
make two: harmless, each segment names the key id it was sealed with (its header, and the
store metadata `wal_key_id`). A reader finds the record by that id (one listing of keys/,
cached in the process) and checks its MAC: a record forged or moved under another id by
someone without the key opens nothing.

`wal_sha256`, the store metadata `wal push` compares when a name is pushed again, is for a
sealed object an HMAC keyed from the record's data key over the file's name and bytes: a
plain sha256 of the plaintext would let whoever reads the bucket confirm guesses of its
content, and the name in it makes a sealed segment copied under another segment's name (its
metadata with it) fail the check, also for history files, whose content names no position.
Rotation (`maestro backup rekey`) rewraps the envelopes here like any record's; the MAC and
the HMACs stay valid (they are keyed from the data key, which does not change).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from maestro_pipelines.backup.manifest import ManifestInvalid, _iso, signed_body
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.layout import WalError, record_digest
from maestro_pipelines.backup.sealing import (
    RecordForged,
    check_signature,
    envelope_of,
    keyring_of,
    new_data_key,
    put_envelope,
    sign,
    usable_data_key,
)
from maestro_pipelines.crypto import DataKey
from maestro_pipelines.crypto.keys import BackupKeyError
from maestro_pipelines.storage import StoreError

FORMAT_VERSION = 1
DIGEST_PURPOSE = b"wal digest v1"
_CACHE = "_maestro_wal_keys"


class WalKeyUnavailable(BackupKeyError):
    """The key a WAL key record needs is not at hand (none configured, only others, the key
    service down or refusing): the WAL it keys is unchecked, not damaged."""


@dataclass(frozen=True)
class KeyRecordName:
    key: str
    day: str
    key_id: str


def today(now: datetime | None = None) -> str:
    return f"{(now or datetime.now(timezone.utc)).astimezone(timezone.utc):%Y%m%d}"


def key_records(store, system_id: str, month: str | None = None, day: str = "") -> list[KeyRecordName]:
    """The server's key records (only day `day`'s when given), by name: no object is read."""
    prefix = layout.keys_prefix(str(system_id), month)
    found = []
    for info in store.list(prefix + day, with_metadata=False):
        match = layout.KEY_RECORD.match(info.key[len(prefix):])
        if match:
            found.append(KeyRecordName(info.key, match.group(1), match.group(2)))
    return sorted(found, key=lambda r: r.key)


def _cache(store) -> dict:
    """Data keys already found, per store object and keyring (a store given other keys in a
    test, or a key removed, finds none of another keyring's)."""
    return store.__dict__.setdefault(_CACHE, {})


def _read_record(store, name: KeyRecordName, system_id: str, kek_id: str | None = None) -> tuple[dict, DataKey] | None:
    """The record's body and data key: JSON, digest, server, id and MAC checked. One line each.
    None when `kek_id` is given and the record is wrapped by another KEK (not unwrapped)."""
    what = f"the WAL of server {system_id} sealed with data key {name.key_id} (key record {name.key})"

    def invalid(why: str) -> ManifestInvalid:
        return ManifestInvalid(f"{what} {why}", "WAL sealed with its key cannot be read: recover to a point before "
                                                "it, or restore the record from another copy of the store")

    body = signed_body(store.get_bytes(name.key), invalid, FORMAT_VERSION)
    envelope = envelope_of(body, what)
    if envelope is None or envelope.key_id != name.key_id or str(body.get("system_id")) != str(system_id):
        raise invalid("is not the record of its name (another key id or server)")
    if kek_id is not None and envelope.kek_id != kek_id:
        return None
    data_key, key_error = usable_data_key(store, body, what)
    if key_error is not None:
        raise WalKeyUnavailable(key_error.problem, key_error.hint)
    check_signature(body, data_key, what)
    return body, data_key


def push_key(store, system_id: str, now: datetime | None = None) -> DataKey | None:
    """The data key a WAL file pushed now is sealed with: today's key record that the current
    KEK opens, else a new one. None without a key (plaintext; MAESTRO_BACKUP_ENCRYPTION=required
    refuses in one line)."""
    keyring = keyring_of(store)
    if not keyring.encrypts:
        return new_data_key(store, f"the WAL of server {system_id}")  # None, or the `required` refusal
    day = today(now)
    cached = _cache(store).get(("push", keyring.current.id, str(system_id), day))
    if cached is not None and cached[0] is keyring:
        return cached[1]
    data_key = None
    for name in key_records(store, system_id, day=day):
        try:
            found = _read_record(store, name, system_id, keyring.current.id)
        except (BackupKeyError, ManifestInvalid, StoreError):
            continue  # a forged record, or one gone since the listing: not reused, never deleted here
        if found is not None:
            data_key = found[1]
            break
    if data_key is None:
        data_key = _new_record(store, system_id, day, now)
    _cache(store)[("push", keyring.current.id, str(system_id), day)] = (keyring, data_key)
    return data_key


def _new_record(store, system_id: str, day: str, now: datetime | None) -> DataKey:
    data_key = new_data_key(store, f"the WAL of server {system_id}")
    body = {"format_version": FORMAT_VERSION, "system_id": str(system_id),
            "created_at": _iso(now or datetime.now(timezone.utc))}
    sign(put_envelope(body, data_key), data_key)
    body["digest"] = record_digest(body)
    store.put_bytes(layout.key_record_key(str(system_id), day, data_key.key_id),
                    json.dumps(body, indent=2, sort_keys=True).encode())
    return data_key


def wal_data_key(store, system_id: str, key_id: str, month: str | None = None) -> DataKey:
    """The data key `key_id` (named by a sealed WAL object): its record found by listing
    keys/ once per process, its MAC checked. One line when missing or forged (WalError), or
    when its key is not at hand (WalKeyUnavailable)."""
    keyring = keyring_of(store)
    prefix = layout.keys_prefix(str(system_id), month)
    cached = _cache(store).get(("read", prefix, key_id))
    if cached is not None and cached[0] is keyring:
        return cached[1]
    listed = _cache(store).get(("list", prefix))
    if listed is None or key_id not in listed:  # a record made since the last listing: list again
        listed = _cache(store)[("list", prefix)] = {n.key_id: n for n in key_records(store, system_id, month)}
    names = [listed[key_id]] if key_id in listed else []
    if not names:
        raise WalError(f"WAL of server {system_id} is sealed with data key {key_id}, whose key record is not in "
                       f"{store.url} ({prefix}*-{key_id}.json)",
                       "Without it that WAL cannot be read: restore the record from another copy of the store, "
                       "or recover to a point before that WAL")
    try:
        _body, data_key = _read_record(store, names[0], system_id)  # type: ignore[misc]
    except (RecordForged, ManifestInvalid) as exc:
        raise WalError(exc.problem, exc.hint) from None
    _cache(store)[("read", prefix, key_id)] = (keyring, data_key)
    return data_key


def key_finder(store, system_id: str, month: str | None = None, opened: dict | None = None) -> Callable[[str], DataKey]:
    """`key_for` for sealing.open_object: a sealed WAL object's header names its data key id.
    `opened["key"]` is set to the key used, for the HMAC of what was read."""

    def key_for(key_id: str) -> DataKey:
        data_key = wal_data_key(store, system_id, key_id, month)
        if opened is not None:
            opened["key"] = data_key
        return data_key

    return key_for


def wal_digest(data_key: DataKey | None, name: str):
    """The hasher of `wal_sha256`: sha256 of the bytes (plaintext), or the HMAC (sealed)."""
    if data_key is None:
        return hashlib.sha256()
    return hmac.new(data_key.subkey(DIGEST_PURPOSE), name.encode() + b"\n", hashlib.sha256)


def same_digest(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a, b)
