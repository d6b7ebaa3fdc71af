"""`maestro backup rekey`: every backup's data key rewrapped under the current key-encryption
key, without reading or rewriting any data (Dagster-free).

What holds a data key is a record: a JSON object in the store with a top-level `encryption`
envelope (a dump backup's manifest and verification record, a base backup's base.json, a WAL
key record, a drill record). Rekey finds them by listing the `*.json` objects under
`RECORD_PREFIXES`, and for each one whose envelope names another KEK than the current one:

1. checks what it read (the store's sha256, the record's `digest` if it has one, its `mac`
   under the data key) so that a damaged or forged record is reported, never rewritten;
2. rewraps the envelope (`Keyring.rewrap`: unwrapped by the old KEK, from
   MAESTRO_BACKUP_OLD_KEYS, wrapped by the current one) and recomputes the `digest`. The
   `mac` stays valid: it does not cover the wrapping (crypto/records.py);
3. rewrites the record in ONE put, which every store makes atomic (a reader sees the old
   object or the new one), keeping the object's metadata.

So a rekey killed at any instant leaves every record either as it was (openable by the old
KEK) or rewritten (openable by the new one), never neither; running it again carries on,
and running it when everything is current changes nothing. Records that are not JSON or have
no envelope (plaintext backups, from before encryption) are skipped.

`survey` is the read-only half: which KEK wraps how many records (`maestro backup info`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from maestro_pipelines.backup.drill_history import DRILLS_PREFIX
from maestro_pipelines.backup.manifest import BACKUPS_PREFIX, MANIFEST_NAME, MONTHLY_PREFIX, record_digest
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.pitr.layout import BASE_RECORD, PITR_PREFIX
from maestro_pipelines.backup.sealing import ENCRYPTION_FIELD, RecordForged, check_signature, keyring_of
from maestro_pipelines.crypto import BackupKeyWrong, Envelope, Keyring
from maestro_pipelines.crypto.keys import KEY_VARIABLE, KMS_VARIABLE, OLD_KEYS_VARIABLE, RUNBOOK, BackupKeyError, BackupKeyMissing
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage import ObjectStore
from maestro_pipelines.storage.base import ChecksumMismatch, ObjectNotFound


RECORD_PREFIXES = (BACKUPS_PREFIX, MONTHLY_PREFIX, PITR_PREFIX, DRILLS_PREFIX)
"""Where records that hold data keys live (retention never sweeps drills/, so they are kept)."""
STEP = "rekey"
REWRITE_ATTEMPTS = 2
"""A record that changes between the read and the write (a verification rewriting its record)
is read again once; changing again, it is reported and left for the next run."""

PREPARED, WRITING, REWRITTEN = "prepared", "writing", "written"
"""The checkpoints `rekey_store` reports for each record it rewrites: rewrapped in memory and
about to be put; inside the put (the store has started its write, e.g. the local store's
temporary file, and has not replaced the record); put."""
CURRENT, GONE = "current", "gone"


class RecordProblem(MaestroError):
    """One record rekey does not rewrite: damaged, forged, or its envelope does not open."""


@dataclass
class Record:
    """One `*.json` object as read: its body (None: not a JSON object), its envelope (None:
    plaintext), the bytes' sha256."""

    key: str
    sha256: str
    body: dict[str, Any] | None = None
    envelope: Envelope | None = None
    problem: str | None = None


def record_keys(store: ObjectStore) -> list[str]:
    """Every `*.json` object under RECORD_PREFIXES, sorted by key."""
    keys: list[str] = []
    for prefix in RECORD_PREFIXES:
        keys += [info.key for info in store.list(prefix + "/", with_metadata=False) if info.key.endswith(".json")]
    return keys


def read_record(store: ObjectStore, key: str) -> Record | None:
    """The record under `key`; None when it was deleted since the listing (retention)."""
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    except ChecksumMismatch as exc:
        return Record(key, "", problem=exc.problem)  # damaged: whether it has an envelope is unknown
    record = Record(key, hashlib.sha256(data).hexdigest())
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return record  # not JSON (a sealed object): not a record
    if not isinstance(body, dict):
        return record
    record.body = body
    if ENCRYPTION_FIELD not in body:
        return record
    try:
        record.envelope = Envelope.from_dict(body[ENCRYPTION_FIELD], f"record {key}")
    except BackupKeyError as exc:
        record.problem = exc.problem
    return record


def survey(store: ObjectStore) -> Iterator[Record]:
    """Every record under RECORD_PREFIXES as read (no key needed: envelopes name their KEK)."""
    for key in record_keys(store):
        record = read_record(store, key)
        if record is not None:
            yield record


@dataclass
class KeyCensus:
    """How many records each KEK wraps (`backup info`)."""

    by_kek: dict[str, int] = field(default_factory=dict)
    plain: int = 0
    """JSON objects without an envelope (records of backups taken without a key)."""
    damaged: int = 0


def key_census(store: ObjectStore) -> KeyCensus:
    census = KeyCensus()
    for record in survey(store):
        if record.envelope is not None:
            census.by_kek[record.envelope.kek_id] = census.by_kek.get(record.envelope.kek_id, 0) + 1
        elif record.problem:
            census.damaged += 1
        elif record.body is not None and _holds_a_backup(record.key):
            census.plain += 1
    return census


def _holds_a_backup(key: str) -> bool:
    """A record that would carry a data key had its backup been taken with one (a dump's
    manifest, a base backup's record, a drill record), not one that never does (verification
    records, conflict records): what "taken without a key" counts."""
    return key.rsplit("/", 1)[-1] in (MANIFEST_NAME, BASE_RECORD) or key.startswith(DRILLS_PREFIX + "/")


@dataclass
class RekeyReport:
    store_url: str
    kek_id: str
    """The current KEK's id (what every record is wrapped by after a complete run)."""
    dry_run: bool = False
    rewrapped: list[str] = field(default_factory=list)
    """Records rewritten under the current KEK (with --dry-run: that would be)."""
    current: list[str] = field(default_factory=list)
    """Records already under the current KEK."""
    needs_key: dict[str, list[str]] = field(default_factory=dict)
    """KEK id -> records wrapped by it, which is configured neither as current nor as old."""
    problems: dict[str, str] = field(default_factory=dict)
    """Record -> why it was not rewritten (damaged, forged, changing)."""
    plain: int = 0
    """JSON objects without an envelope, skipped."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.needs_key and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store_url, "kek_id": self.kek_id, "dry_run": self.dry_run, "ok": self.ok,
                "rewrapped": self.rewrapped, "already_current": self.current,
                "needs_key": [{"kek_id": kek, "records": keys} for kek, keys in self.needs_key.items()],
                "problems": [{"record": key, "problem": why} for key, why in self.problems.items()],
                "plain": self.plain, "duration_s": round(self.seconds, 3)}


def _checked(record: Record, keyring: Keyring) -> None:
    """RecordProblem unless the record is what its digest and its MAC say it is."""
    body, what = record.body, f"record {record.key}"
    if "digest" in body and body["digest"] != record_digest({k: v for k, v in body.items() if k != "digest"}):
        raise RecordProblem(f"{what} does not match its digest (damaged, or edited after it was written)",
                            "Not rewritten: find out what changed it (`maestro backup verify`)")
    if "mac" in body:
        try:
            check_signature(body, keyring.open(record.envelope, what), what)
        except (RecordForged, BackupKeyWrong) as exc:
            raise RecordProblem(exc.problem, exc.hint) from None


def rewrapped_bytes(record: Record, keyring: Keyring) -> bytes:
    """The record's bytes with its envelope under the current KEK and its digest recomputed,
    the fields in their order (a manifest written with sorted keys stays so)."""
    _checked(record, keyring)
    try:
        envelope = keyring.rewrap(record.envelope, f"record {record.key}")
    except BackupKeyWrong as exc:  # the KEK is configured but does not open it: altered
        raise RecordProblem(exc.problem, exc.hint) from None
    body = {name: (envelope.to_dict() if name == ENCRYPTION_FIELD else value) for name, value in record.body.items()}
    if "digest" in body:
        body["digest"] = record_digest({k: v for k, v in body.items() if k != "digest"})
    return json.dumps(body, indent=2).encode()


Checkpoint = Callable[[str, int, str], None]
"""(PREPARED, WRITING or REWRITTEN, the how-manyth record rewritten in this run, its key)."""


def _reporting(data: bytes, checkpoint: Checkpoint | None, n: int, key: str) -> Iterator[bytes]:
    """`data` as the one put's source, with the WRITING checkpoint between its two halves."""
    yield data[: len(data) // 2]
    if checkpoint:
        checkpoint(WRITING, n, key)
    yield data[len(data) // 2:]


def _rewrite(store: ObjectStore, record: Record, keyring: Keyring, checkpoint: Checkpoint | None,
             counts: dict[str, int]) -> str:
    """One record rewrapped and put in one write; read again if it changed since it was read.
    REWRITTEN, or CURRENT (rewritten meanwhile by a writer under the current KEK) or GONE."""
    for _attempt in range(REWRITE_ATTEMPTS):
        data = rewrapped_bytes(record, keyring)
        info = store.head(record.key)
        if info.sha256 == record.sha256:
            counts[PREPARED] += 1
            if checkpoint:
                checkpoint(PREPARED, counts[PREPARED], record.key)
            store.put_stream(record.key, _reporting(data, checkpoint, counts[PREPARED], record.key), info.metadata)
            counts[REWRITTEN] += 1
            if checkpoint:
                checkpoint(REWRITTEN, counts[REWRITTEN], record.key)
            return REWRITTEN
        fresh = read_record(store, record.key)
        if fresh is None or fresh.envelope is None or fresh.problem:
            return GONE  # deleted, or no longer a record: nothing of it to rewrap
        if fresh.envelope.kek_id == keyring.current.id:
            return CURRENT
        record = fresh
    raise RecordProblem(f"record {record.key} changed while it was being rewrapped",
                        "Run `maestro backup rekey` again once the backups, verifications and drills running now are done")


def rekey_store(store: ObjectStore, dry_run: bool = False, phases: PhaseProgress | None = None,
                checkpoint: Checkpoint | None = None) -> RekeyReport:
    """Every record of `store` rewrapped under its keyring's current KEK, record by record."""
    keyring = keyring_of(store)
    if keyring.current is None:
        raise BackupKeyMissing("`maestro backup rekey` rewraps backups under the key new backups use, and none is configured",
                               f"Set {KEY_VARIABLE} (or {KMS_VARIABLE}) to the new key and the old ones in {OLD_KEYS_VARIABLE}")
    started = monotonic()
    report = RekeyReport(store.url, keyring.current.id, dry_run)
    keys = record_keys(store)
    counts = {PREPARED: 0, REWRITTEN: 0}
    for done, key in enumerate(keys):
        if phases:
            phases(Phase(STEP, done, len(keys), "records", key))
        record = read_record(store, key)
        if record is None:
            continue
        _sort(store, record, keyring, report, dry_run, checkpoint, counts)
    report.seconds = monotonic() - started
    if phases:
        phases(Phase(STEP, len(keys), len(keys), "records", finished=True, seconds=report.seconds,
                     detail=f"{len(report.rewrapped)} rewrapped, {len(report.current)} already current"))
    return report


def _sort(store: ObjectStore, record: Record, keyring: Keyring, report: RekeyReport, dry_run: bool,
          checkpoint: Checkpoint | None, counts: dict[str, int]) -> None:
    """One record into its line of the report (rewritten on the way unless `dry_run`)."""
    if record.problem:
        report.problems[record.key] = record.problem
    elif record.envelope is None:
        report.plain += record.body is not None
    elif record.envelope.kek_id == keyring.current.id:
        report.current.append(record.key)
    elif keyring.kek(record.envelope.kek_id) is None:
        report.needs_key.setdefault(record.envelope.kek_id, []).append(record.key)
    else:
        try:
            if dry_run:
                _checked(record, keyring)
                outcome = REWRITTEN
            else:
                outcome = _rewrite(store, record, keyring, checkpoint, counts)
        except RecordProblem as exc:
            report.problems[record.key] = exc.problem
            return
        if outcome != GONE:
            (report.rewrapped if outcome == REWRITTEN else report.current).append(record.key)


def needs_key_hint(kek_id: str) -> str:
    return (f"Add backup key {kek_id} to {OLD_KEYS_VARIABLE} and run `maestro backup rekey` again; "
            f"if it is lost, those backups cannot be read: see {RUNBOOK}")
