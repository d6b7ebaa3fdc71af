"""The history of DR drills, kept in the object store beside the backups they drilled.

Every drill (`maestro drill`, the `dr_drill` asset, a script calling `run_drill`) writes one
record, `drills/<started>-<random>.json`, whatever its outcome: the store is what survives
the loss of Dagster (or of its instance database), so the drill history on-call reads is
there, not in Dagster's event log. The store makes an object visible only once it is
complete with its sha256 recorded (as for manifests), so a record is never half-readable;
`list_drills` skips (and names) a record that does not verify or parse.

Retention sweeps `backups/` and `monthly/` only: drill records are kept.

With a backup key configured, a record is sealed under a data key of its own:

    {"format": 1, "drill_id": ..., "encryption": <envelope>, "sealed": <base64 of the sealed
     record JSON>, "mac": ...}

Sealed rather than kept in plaintext with a MAC: a drill's problems and notes name hosts,
databases, tables and row counts that differ, which the store's reader has no business
reading, and the issue asks for drill records encrypted like every other backup object. The
envelope is at the top level (and the MAC skips its wrapping) so `maestro backup rekey`
rewraps it like a manifest's; the sealed body repeats the drill id, checked against the
record's key, so a body moved into another record is caught. Without the key, `list_drills`
counts the records it cannot read (`DrillHistory.locked`) and says which key they need.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from maestro_pipelines.backup.manifest import _iso, _parse_time, utcnow
from maestro_pipelines.backup.sealing import (
    ENCRYPTION_FIELD,
    check_signature,
    new_data_key,
    open_bytes,
    put_envelope,
    seal,
    sign,
    usable_data_key,
)
from maestro_pipelines.crypto import BackupKeyError, SealBroken
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage import ObjectStore
from maestro_pipelines.storage.base import ChecksumMismatch, ObjectNotFound

DRILLS_PREFIX = "drills"
RECORD_FORMAT = 1
SOURCES = ("cli", "dagster", "library")
"""Where a drill ran: `maestro drill`, a Dagster run of `dr_drill`, or a program calling run_drill."""


@dataclass
class DrillRecord:
    """One drill as recorded in the store."""

    drill_id: str
    source: str
    started_at: datetime
    ok: bool
    rto_target_s: float
    rpo_target_s: float
    run_id: str | None = None
    """The Dagster run's id (source `dagster`)."""
    host: str | None = None
    backup_id: str | None = None
    restored: bool = False
    rto_s: float | None = None
    rpo_s: float | None = None
    problems: list[str] = field(default_factory=list)
    """Why the drill failed (a missed target included); empty when it is ok."""
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds of each step."""
    notes: list[str] = field(default_factory=list)
    key: str | None = None
    """Where the record is in the store."""

    @property
    def where(self) -> str:
        """`cli`, or `dagster run <id>` (its first 8 characters, as Dagster's UI shows run ids):
        where the drill ran, for tables."""
        return f"dagster run {self.run_id[:8]}" if self.source == "dagster" and self.run_id else self.source

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "drill_id": self.drill_id,
            "source": self.source,
            "run_id": self.run_id,
            "host": self.host,
            "started_at": _iso(self.started_at),
            "backup_id": self.backup_id,
            "ok": self.ok,
            "restored": self.restored,
            "rto_s": self.rto_s,
            "rto_target_s": self.rto_target_s,
            "rpo_s": self.rpo_s,
            "rpo_target_s": self.rpo_target_s,
            "problems": self.problems,
            "steps": self.steps,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: bytes, key: str) -> "DrillRecord":
        """A record read back; ValueError (or KeyError/TypeError) for one that is not a drill record."""
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a drill record of format {RECORD_FORMAT}")
        if body["source"] not in SOURCES or not isinstance(body["ok"], bool):
            raise ValueError("its source or ok field is not one a drill writes")

        def seconds(name: str) -> float | None:
            value = body.get(name)
            return None if value is None else float(value)

        return cls(
            drill_id=str(body["drill_id"]), source=body["source"], started_at=_parse_time(body["started_at"]),
            ok=body["ok"], rto_target_s=float(body["rto_target_s"]), rpo_target_s=float(body["rpo_target_s"]),
            run_id=body.get("run_id"), host=body.get("host"), backup_id=body.get("backup_id"),
            restored=bool(body.get("restored")), rto_s=seconds("rto_s"), rpo_s=seconds("rpo_s"),
            problems=[str(p) for p in body.get("problems") or []],
            steps={str(k): float(v) for k, v in (body.get("steps") or {}).items()},
            notes=[str(n) for n in body.get("notes") or []], key=key,
        )


def new_drill_id(now: datetime | None = None) -> str:
    """`<UTC start to the microsecond>-<random>`: keys sort by start time."""
    now = now or utcnow()
    return f"{now.astimezone(timezone.utc):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def drill_record(report, source: str, run_id: str | None = None) -> DrillRecord:
    """The record of a DrillReport (backup.drill) as it ended."""
    if source not in SOURCES:
        raise ValueError(f"drill source {source!r} is not one of {', '.join(SOURCES)}")
    return DrillRecord(
        drill_id=new_drill_id(report.started_at), source=source, run_id=run_id, host=socket.gethostname(),
        started_at=report.started_at, ok=report.ok, restored=report.restored, backup_id=report.backup_id,
        rto_s=round(report.rto_s, 3) if report.rto_s is not None else None, rto_target_s=report.rto_target_s,
        rpo_s=round(report.rpo_s, 1) if report.rpo_s is not None else None, rpo_target_s=report.rpo_target_s,
        problems=report.failures(), steps={s.name: round(s.seconds, 3) for s in report.steps},
        notes=list(report.notes),
    )


def record_drill(store: ObjectStore, record: DrillRecord) -> str:
    """Write the record (one object, visible only once complete; sealed under a data key of
    its own when a backup key is configured); its key."""
    key = f"{DRILLS_PREFIX}/{record.drill_id}.json"
    body = record.to_dict()
    data_key = new_data_key(store, f"drill record {record.drill_id}")
    if data_key is not None:
        sealed = b"".join(seal(data_key, [json.dumps(body).encode()]))
        outer = {"format": RECORD_FORMAT, "drill_id": record.drill_id, "sealed": base64.b64encode(sealed).decode()}
        body = sign(put_envelope(outer, data_key), data_key)
    store.put_bytes(key, json.dumps(body, indent=2).encode(), {"source": record.source})
    record.key = key
    return key


@dataclass
class DrillHistory:
    records: list[DrillRecord]
    """Oldest first (newest last)."""
    skipped: list[str]
    """One line per record that could not be read, naming it and why."""
    locked: int = 0
    """Records that are encrypted with a key not configured here (not read, not skipped as damaged)."""
    locked_by: str | None = None
    """Why the first of them could not be opened: the key it needs (one line)."""


class _Locked(Exception):
    """A sealed record whose data key cannot be opened here (no key, another key, KMS down)."""

    def __init__(self, error: BackupKeyError):
        super().__init__(str(error))
        self.error = error


def _unsealed(store: ObjectStore, data: bytes, key: str) -> bytes:
    """The record JSON of a drill record object: as stored, or opened from its seal after
    its MAC checked. _Locked without its key; ValueError when forged or damaged."""
    body = json.loads(data)
    if not isinstance(body, dict) or ENCRYPTION_FIELD not in body:
        return data
    what = f"drill record {key!r}"
    try:
        data_key, locked = usable_data_key(store, body, what)
    except BackupKeyError as exc:  # malformed, or refused by the configured key: altered
        raise ValueError(exc.problem) from None
    if locked is not None:
        raise _Locked(locked)
    try:
        check_signature(body, data_key, what)
        inner = open_bytes(base64.b64decode(body["sealed"], validate=True), data_key, what)
    except (BackupKeyError, SealBroken, binascii.Error) as exc:
        raise ValueError(getattr(exc, "problem", str(exc))) from None
    drill_id = json.loads(inner).get("drill_id")
    if body.get("drill_id") != drill_id or not key.endswith(f"/{drill_id}.json"):
        raise ValueError(f"its sealed body is drill {drill_id}'s, moved in from another record")
    return inner


def _read_record(store: ObjectStore, key: str) -> DrillRecord:
    try:
        return DrillRecord.from_json(_unsealed(store, store.get_bytes(key), key), key)
    except ChecksumMismatch as exc:
        raise ValueError(str(exc)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
        raise ValueError(f"drill record {key!r} in the store at {store.url} is damaged: {detail}") from None


def list_drills(store: ObjectStore, limit: int | None = None, log: Callable[[str], None] | None = None,
                after: str | None = None) -> DrillHistory:
    """The recorded drills, newest last: the newest `limit` readable ones (all without a
    limit), only those whose drill id sorts after `after` if given (ids sort by start time).
    A record that does not verify or parse is skipped and named (`log` and `skipped`)."""
    if limit is not None and limit < 1:
        raise MaestroError(f"the limit {limit} is not a positive number of drills", "Give a limit of 1 or more")
    keys = [i.key for i in store.list(f"{DRILLS_PREFIX}/", with_metadata=False) if i.key.endswith(".json")
            and (after is None or i.key[len(DRILLS_PREFIX) + 1:-len(".json")] > after)]
    records: list[DrillRecord] = []
    skipped: list[str] = []
    history = DrillHistory(records, skipped)
    for key in reversed(keys):  # newest first, so a limit reads only what it shows
        if limit is not None and len(records) >= limit:
            break
        try:
            records.append(_read_record(store, key))
        except ObjectNotFound:
            continue  # deleted between the listing and the read
        except _Locked as exc:
            history.locked += 1
            history.locked_by = history.locked_by or exc.error.problem
        except ValueError as exc:
            skipped.append(f"skipped {exc}")
            if log:
                log(skipped[-1])
    records.sort(key=lambda r: (r.started_at, r.drill_id))
    skipped.reverse()
    return history
