"""Encrypted backups as the backup library writes them (the record rules of issue 17), made
directly through backup/sealing.py, without a database: for the rekey, info and KMS tests.

A "backup" here is one sealed data object and its record: a JSON object with the data key's
envelope (`encryption`), the object's key, its `mac` (sealing.sign, last) and, like a dump
manifest or base.json, its `digest` (manifest's digest function). `check_backup` opens one
the way a restore does: the record's digest, its envelope (with whatever keyring is given),
its MAC, then the object's every chunk back to its plaintext."""

from __future__ import annotations

import json

from maestro_pipelines.backup import sealing
from maestro_pipelines.backup.rekey import record_digest
from maestro_pipelines.crypto import Keyring, keyring_from_values
from maestro_pipelines.storage import ObjectStore

DRILL_FIELDS = {"format": 1, "drill_id": "20261201T030000000000Z-000001", "source": "cli", "ok": True, "rto_target_s": 3600.0, "rpo_target_s": 93600.0,
                "started_at": "2026-12-01T03:00:00Z", "problems": [], "steps": {}, "notes": []}
"""What a drill record holds (drill_history.DrillRecord.to_dict), so `list_drills` reads it."""


def keyring(current: str | None, *old: str) -> Keyring:
    return keyring_from_values(current, " ".join(old) or None, None, None)


def plaintext_of(key: str) -> bytes:
    return f"the data of {key}: marker 7c1e5a\n".encode() * 40


def write_backup(store: ObjectStore, record_key: str, fields: dict | None = None, digest: bool = True) -> dict:
    """A sealed object beside `record_key` and the record holding its data key, under the
    store's keyring (its current KEK); without a key, both plaintext. The record's body."""
    data_key = sealing.new_data_key(store, record_key)
    object_key = record_key.rsplit("/", 1)[0] + "/" + record_key.rsplit("/", 1)[1].replace(".json", ".data.zst")
    store.put_stream(object_key, sealing.seal(data_key, [plaintext_of(object_key)]))
    body = {"format_version": 1, **(fields or {}), "object": object_key}
    sealing.put_envelope(body, data_key)
    sealing.sign(body, data_key)
    if digest:
        body["digest"] = record_digest(body)
    store.put_bytes(record_key, json.dumps(body, indent=2, sort_keys=True).encode(), {"source": "test"})
    return body


def check_backup(store: ObjectStore, record_key: str, keys: Keyring) -> str | None:
    """The KEK id `record_key` is wrapped by, once its record and object opened with `keys`
    and read back whole (None: a plaintext backup). Raises what a restore would."""
    body = json.loads(store.get_bytes(record_key))
    if "digest" in body:
        assert body["digest"] == record_digest({k: v for k, v in body.items() if k != "digest"}), record_key
    envelope = sealing.envelope_of(body, record_key)
    data_key = None if envelope is None else keys.open(envelope, record_key)
    sealing.check_signature(body, data_key, record_key)
    with sealing.open_object(store, body["object"], data_key, body["object"]) as reader:
        assert reader.read() == plaintext_of(body["object"]), record_key
    return envelope.kek_id if envelope else None
