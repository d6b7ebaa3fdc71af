"""Markers of backups and restores in progress, in the store itself.

Retention must never delete while a backup or restore runs, and the processes that run
them may be a Dagster run, the CLI on a laptop and a drill on another machine: the store is
the one place they all see. Each marker names its host and pid and carries a heartbeat,
rewritten every `HEARTBEAT_EVERY` while the work runs. A marker counts as running unless its
process is known to be gone: on the same host its pid no longer exists, or (any host) its
heartbeat is older than `HEARTBEAT_STALE_AFTER` (a marker without a heartbeat, written by an
older Maestro, counts for `DEFAULT_STALE_AFTER`). So a process killed with SIGKILL stops
blocking retention and cleanup at once on its own host, within minutes elsewhere, and its
marker is removed by the next retention (or cleanup) that sees it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

from maestro_pipelines.backup.manifest import ACTIVITY_PREFIX, _iso, _parse_time, utcnow
from maestro_pipelines.processes import process_alive
from maestro_pipelines.storage import ObjectNotFound, ObjectStore

DEFAULT_STALE_AFTER = timedelta(hours=12)
"""Unfinished backup folders younger than this may still be in progress (retention keeps them)."""
HEARTBEAT_EVERY = timedelta(seconds=30)
HEARTBEAT_STALE_AFTER = timedelta(minutes=5)
"""A marker whose heartbeat is older than this is a dead process's (ten missed heartbeats:
a slow store does not make a live process look dead)."""


@dataclass(frozen=True)
class Activity:
    kind: str
    ident: str
    started_at: datetime
    host: str
    pid: int
    key: str
    heartbeat_at: datetime | None = None
    """None: a marker written before heartbeats existed (it counts for DEFAULT_STALE_AFTER)."""
    pid_namespace: str = ""

    def alive(self, now: datetime, stale_after: timedelta = HEARTBEAT_STALE_AFTER) -> bool:
        """False when the process that wrote the marker is known to be gone."""
        if self.heartbeat_at is None:
            return now - self.started_at < DEFAULT_STALE_AFTER
        if now - self.heartbeat_at >= stale_after:
            return False
        # Its pid means something here only on the same host and in the same pid namespace
        # (two containers may share a hostname, each with its own pids).
        here = self.host == socket.gethostname() and self.pid_namespace == pid_namespace()
        if here and self.pid and not process_alive(self.pid):
            return False
        return True


def pid_namespace() -> str:
    """This process's pid namespace on Linux (its inode), "" where there is none to tell."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _heartbeat(store: ObjectStore, key: str, body: dict, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            store.put_bytes(key, json.dumps({**body, "heartbeat_at": _iso(utcnow())}).encode())
        except Exception:  # a store outage: try again next time; ten misses make it stale
            pass


@contextmanager
def activity(store: ObjectStore, kind: str, ident: str,
             heartbeat_every: timedelta = HEARTBEAT_EVERY) -> Iterator[Activity]:
    """Mark `kind` (backup, restore, archive) as running for the duration of the block,
    with a heartbeat rewritten every `heartbeat_every` by a background thread."""
    key = f"{ACTIVITY_PREFIX}/{kind}-{ident}.json"
    record = Activity(kind, ident, utcnow(), socket.gethostname(), os.getpid(), key)
    body = {"kind": kind, "id": ident, "started_at": _iso(record.started_at), "host": record.host, "pid": record.pid,
            "pid_namespace": pid_namespace()}
    store.put_bytes(key, json.dumps({**body, "heartbeat_at": body["started_at"]}).encode())
    stop = threading.Event()
    beating = threading.Thread(target=_heartbeat, args=(store, key, body, heartbeat_every.total_seconds(), stop),
                               name=f"maestro-heartbeat-{kind}", daemon=True)
    beating.start()
    try:
        yield record
    finally:
        stop.set()
        beating.join()  # no heartbeat may rewrite the marker after it is deleted
        try:
            store.delete(key)
        except Exception:  # a dead marker is ignored and removed by others; never mask the real outcome
            pass


def _read_markers(store: ObjectStore) -> Iterator[tuple[str, Activity | None, datetime | None]]:
    """(key, the marker or None when unreadable, the object's last write) for every marker."""
    for info in store.list(f"{ACTIVITY_PREFIX}/", with_metadata=False):
        try:
            body = json.loads(store.get_bytes(info.key, verify=False))
            started = _parse_time(body["started_at"])
            beat = _parse_time(body["heartbeat_at"]) if body.get("heartbeat_at") else None
            marker = Activity(body["kind"], body["id"], started, body.get("host", "?"), int(body.get("pid") or 0),
                              info.key, beat, str(body.get("pid_namespace", "")))
        except ObjectNotFound:
            continue  # removed between the listing and the read
        except (ValueError, KeyError, TypeError):
            marker = None
        yield info.key, marker, info.last_modified


def running_activities(
    store: ObjectStore, now: datetime | None = None, stale_after: timedelta = HEARTBEAT_STALE_AFTER
) -> list[Activity]:
    """Markers of processes that may still be running (see `Activity.alive`)."""
    now = now or utcnow()
    return [marker for _key, marker, _written in _read_markers(store) if marker is not None and marker.alive(now, stale_after)]


def stale_activities(
    store: ObjectStore, now: datetime | None = None, stale_after: timedelta = HEARTBEAT_STALE_AFTER
) -> list[str]:
    """Keys of markers left by processes killed inside a backup or restore (their pid gone
    on this host, or no heartbeat for `stale_after`), and of unreadable markers last
    written before then."""
    now = now or utcnow()
    stale = []
    for key, marker, written in _read_markers(store):
        if marker is not None and not marker.alive(now, stale_after):
            stale.append(key)
        elif marker is None and written is not None and now - written >= stale_after:
            stale.append(key)
    return stale


def remove_stale_activities(store: ObjectStore, kinds: tuple[str, ...], now: datetime | None = None) -> list[str]:
    """Delete the markers of `kinds` that `stale_activities` finds; return their keys.
    (Retention removes a dead backup's marker itself: it tells which unfinished folder to sweep.)"""
    removed = []
    for key in stale_activities(store, now):
        if not key.rsplit("/", 1)[-1].startswith(tuple(f"{kind}-" for kind in kinds)):
            continue
        try:
            store.delete(key)
        except ObjectNotFound:
            pass
        removed.append(key)
    return removed
