"""Markers of backups and restores in progress, in the store itself.

Retention must never delete while a backup or restore runs, and the processes that run
them may be a Dagster run, the CLI on a laptop and a drill on another machine: the store is
the one place they all see. A marker younger than `stale_after` counts as running; a
process killed with SIGKILL leaves a marker that stops counting once stale.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

from maestro_pipelines.backup.manifest import ACTIVITY_PREFIX, _iso, _parse_time, utcnow
from maestro_pipelines.storage import ObjectNotFound, ObjectStore

DEFAULT_STALE_AFTER = timedelta(hours=12)


@dataclass(frozen=True)
class Activity:
    kind: str
    ident: str
    started_at: datetime
    host: str
    pid: int
    key: str


@contextmanager
def activity(store: ObjectStore, kind: str, ident: str) -> Iterator[Activity]:
    """Mark `kind` (backup, restore, archive) as running for the duration of the block."""
    key = f"{ACTIVITY_PREFIX}/{kind}-{ident}.json"
    record = Activity(kind, ident, utcnow(), socket.gethostname(), os.getpid(), key)
    body = {"kind": kind, "id": ident, "started_at": _iso(record.started_at), "host": record.host, "pid": record.pid}
    store.put_bytes(key, json.dumps(body).encode())
    try:
        yield record
    finally:
        try:
            store.delete(key)
        except Exception:  # a stale marker expires on its own; never mask the real outcome
            pass


def running_activities(
    store: ObjectStore, now: datetime | None = None, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> list[Activity]:
    now = now or utcnow()
    running = []
    for info in store.list(f"{ACTIVITY_PREFIX}/", with_metadata=False):
        try:
            body = json.loads(store.get_bytes(info.key, verify=False))
            started = _parse_time(body["started_at"])
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            continue
        if now - started < stale_after:
            running.append(Activity(body["kind"], body["id"], started, body.get("host", "?"), body.get("pid", 0), info.key))
    return running


def stale_activities(
    store: ObjectStore, now: datetime | None = None, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> list[str]:
    """Keys of markers left by processes killed inside a backup or restore (older than
    `stale_after`, or unreadable and last written before then)."""
    now = now or utcnow()
    stale = []
    for info in store.list(f"{ACTIVITY_PREFIX}/", with_metadata=False):
        try:
            started = _parse_time(json.loads(store.get_bytes(info.key, verify=False))["started_at"])
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError):
            started = info.last_modified
        if started is not None and now - started >= stale_after:
            stale.append(info.key)
    return stale
