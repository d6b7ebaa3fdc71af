"""The journal of a live restore's swap, in the store: which databases it swaps, and how far it got.

A live restore of several databases swaps them one after another (one transaction per
database: RENAME <live> TO <live>_pre_restore_<stamp>, RENAME <live>_restore_<stamp> TO <live>).
A process killed between two swaps would leave the platform database restored and MLflow's
old. So before the first rename the restore writes `swaps/<stamp>.json` naming every
database, the backup and the names involved; before each rename it marks that database
`started`, after it `done`; after the last it deletes the journal. A journal whose restore
is no longer running (its activity marker is gone or dead) is a half-done swap.

Why the store and not the server: every reader that must see a half-done swap already
reads the store, including those that never connect to the databases (`maestro backup
list`, the RPO sensor), the databases may be on several servers, and a role with only
LOGIN and CREATEDB may not create a table in `postgres`. Each write is one object put,
atomic in every backend. The journal is the intent; the server is the truth of each step:
a database marked `started` was renamed or not, and pg_database says which
(`maestro_pipelines.backup.recovery`). It holds names and host:port only, never a URL.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime

from maestro_pipelines.backup.activity import running_activities
from maestro_pipelines.backup.manifest import _iso, _parse_time, utcnow
from maestro_pipelines.storage import ObjectNotFound, ObjectStore

JOURNAL_PREFIX = "swaps"
PENDING, STARTED, DONE = "pending", "started", "done"


@dataclass
class SwapStep:
    role: str
    live: str
    restored: str
    """The verified restored copy: `<live>_restore_<stamp>` until swapped."""
    kept: str
    """Where the old live database goes: `<live>_pre_restore_<stamp>`."""
    live_existed: bool
    where: str
    """host:port of the server (for people; recovery finds the server from the configuration)."""
    state: str = PENDING


@dataclass
class SwapJournal:
    stamp: str
    backup_id: str
    snapshot_at: datetime
    started_at: datetime
    host: str
    pid: int
    steps: list[SwapStep] = field(default_factory=list)
    action: str = "swap"
    """swap (the restore), finish or undo (`maestro restore finish|undo` at work)."""

    @property
    def key(self) -> str:
        return journal_key(self.stamp)

    def to_json(self) -> bytes:
        body = {
            "stamp": self.stamp, "backup_id": self.backup_id, "snapshot_at": _iso(self.snapshot_at),
            "started_at": _iso(self.started_at), "host": self.host, "pid": self.pid, "action": self.action,
            "updated_at": _iso(utcnow()), "steps": [asdict(step) for step in self.steps],
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SwapJournal:
        body = json.loads(data)
        return cls(
            body["stamp"], body["backup_id"], _parse_time(body["snapshot_at"]), _parse_time(body["started_at"]),
            body.get("host", "?"), int(body.get("pid") or 0), [SwapStep(**step) for step in body["steps"]],
            body.get("action", "swap"),
        )

    def summary(self) -> str:
        """One line from the journal alone (no server read), for `backup list` and the sensor."""
        parts = []
        for step in self.steps:
            if step.state == DONE:
                parts.append(f"{step.role} ({step.live}) is backup {self.backup_id}'s")
            elif step.state == STARTED:
                parts.append(f"{step.role} ({step.live}) was being swapped (`maestro restore status` says which)")
            else:
                parts.append(f"{step.role} ({step.live}) is still the one from before the restore")
        return (
            f"the live restore of backup {self.backup_id} (started {self.started_at:%Y-%m-%d %H:%M:%S} UTC "
            f"on {self.host}, pid {self.pid}) stopped half way: " + "; ".join(parts)
        )


def journal_key(stamp: str) -> str:
    return f"{JOURNAL_PREFIX}/{stamp}.json"


def new_journal(stamp: str, backup_id: str, snapshot_at: datetime, steps: list[SwapStep]) -> SwapJournal:
    return SwapJournal(stamp, backup_id, snapshot_at, utcnow(), socket.gethostname(), os.getpid(), steps)


def write_journal(store: ObjectStore, journal: SwapJournal) -> None:
    store.put_bytes(journal.key, journal.to_json())


def delete_journal(store: ObjectStore, journal: SwapJournal) -> None:
    store.delete(journal.key)


def read_journals(store: ObjectStore) -> list[SwapJournal]:
    """Every journal in the store, oldest first; an unreadable one is skipped."""
    found = []
    for info in store.list(f"{JOURNAL_PREFIX}/", with_metadata=False):
        try:
            found.append(SwapJournal.from_json(store.get_bytes(info.key, verify=False)))
        except ObjectNotFound:
            continue  # finished between the listing and the read
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda journal: journal.stamp)


def interrupted_swaps(store: ObjectStore) -> list[SwapJournal]:
    """Journals whose restore (or finish/undo) is not running: half-done swaps."""
    running = {a.ident for a in running_activities(store) if a.kind == "restore"}
    return [journal for journal in read_journals(store) if journal.stamp not in running]


def journal_names(store: ObjectStore) -> set[str]:
    """Every database a journal (running or not) may still need: cleanup never drops them."""
    return {name for journal in read_journals(store) for step in journal.steps for name in (step.restored, step.kept)}
