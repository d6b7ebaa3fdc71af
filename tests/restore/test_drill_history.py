"""The drill history in the object store: every drill (failed ones too) leaves one record
under drills/, `list_drills` reads them newest last and skips (and names) a damaged one,
a write killed half way leaves nothing readable as a record, and retention keeps them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from maestro_pipelines.backup import run_drill, verify_backup
from maestro_pipelines.backup.drill_history import (
    DRILLS_PREFIX,
    DrillRecord,
    list_drills,
    new_drill_id,
    record_drill,
)
from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage.local import LocalObjectStore
from tests.backup.conftest import REPO_ROOT, keys, replace_raw
from tests.stores.conftest import FAST_RETRY


def a_record(started: datetime, source: str = "cli", rto_s: float | None = 8.0, ok: bool = True) -> DrillRecord:
    return DrillRecord(new_drill_id(started), source, started, ok, 900.0, 26 * 3600.0, rto_s=rto_s,
                       run_id="0f1e2d3c-0000-4000-8000-000000000001" if source == "dagster" else None,
                       backup_id="20261126T020000Z-1a2b3c", problems=[] if ok else ["it broke"])


def test_every_drill_is_recorded_in_the_store_failed_ones_too(pg18_mlflow_installation, local_case):
    """A drill with no verified backup to drill, a good drill and one that misses its RTO
    each leave one record in the store, listed oldest first with where they ran, the
    backup, RTO, RPO and targets, the result and why, and the seconds of every step."""
    inst = pg18_mlflow_installation
    store = local_case.store
    with pytest.raises(MaestroError, match="no verified backup"):
        run_drill(store, inst.destinations(), source="cli")
    manifest = inst.backup(store)
    assert verify_backup(store, manifest.backup_id).ok
    good = run_drill(store, inst.destinations(), source="dagster", run_id="0f1e2d3c-0000-4000-8000-000000000002")
    missed = run_drill(store, inst.destinations(), rto_target=timedelta(milliseconds=1), source="cli")
    assert good.ok and not missed.ok

    history = list_drills(store)
    assert history.skipped == []
    empty, first, second = history.records
    assert [r.source for r in history.records] == ["cli", "dagster", "cli"]
    assert not empty.ok and empty.backup_id is None and empty.rto_s is None
    assert "no verified backup" in empty.problems[0]
    assert first.ok and first.problems == [] and first.run_id == "0f1e2d3c-0000-4000-8000-000000000002"
    assert first.where == "dagster run 0f1e2d3c"
    assert first.backup_id == manifest.backup_id and first.rto_s == pytest.approx(good.rto_s, abs=0.001)
    assert first.rpo_s == pytest.approx(good.rpo_s, abs=0.1) and first.rpo_target_s == 26 * 3600
    assert {"pg_restore platform", "amcheck platform", "mlflow registry smoke test", "drop scratch databases"} <= set(first.steps)
    assert first.key == good.record_key and good.as_dict()["record_key"] == good.record_key
    assert not second.ok and second.rto_target_s == 0.001 and "over the target" in second.problems[0]
    assert keys(store, f"{DRILLS_PREFIX}/") == [r.key for r in history.records]
    assert [r.key for r in list_drills(store, limit=2).records] == [first.key, second.key]


def test_a_damaged_record_is_skipped_and_named(case):
    """A record whose bytes rotted behind the store's back and an object under drills/ that
    is not a drill record are skipped, each named once (to `log` and in `skipped`); the
    readable ones still list, newest last, and a limit counts readable records only."""
    store = case.store
    now = utcnow()
    oldest, rotten, newest = (a_record(now - timedelta(hours=h)) for h in (3, 2, 1))
    for record in (oldest, rotten, newest):
        record_drill(store, record)
    replace_raw(case, rotten.key, b'{"format": 1, "source": "cli", "ok": tru' + b" " * 300)
    store.put_bytes(f"{DRILLS_PREFIX}/{new_drill_id(now)}.json", b'{"what": "a note someone left"}')
    said: list[str] = []

    history = list_drills(store, log=said.append)

    assert [r.drill_id for r in history.records] == [oldest.drill_id, newest.drill_id]
    assert len(history.skipped) == 2 and said == list(reversed(history.skipped))
    assert rotten.key in history.skipped[0] and "corrupt" in history.skipped[0]
    assert "not a drill record" in history.skipped[1]
    assert [r.drill_id for r in list_drills(store, limit=2).records] == [oldest.drill_id, newest.drill_id]


CHILD = """
import os, sys, threading
from maestro_pipelines.backup.drill_history import DrillRecord, new_drill_id, record_drill
from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.storage.local import LocalObjectStore

real_replace = os.replace
def paused(src, dst, *args, **kwargs):
    # The record's own rename (not its sidecar's): the bytes are written, not yet published.
    if os.path.basename(os.path.dirname(dst)) == "drills":
        print("PAUSED", flush=True)
        threading.Event().wait()
    return real_replace(src, dst, *args, **kwargs)
os.replace = paused
now = utcnow()
record_drill(LocalObjectStore(sys.argv[1]), DrillRecord(new_drill_id(now), "cli", now, True, 900.0, 93600.0, rto_s=8.0))
"""


def test_a_record_write_killed_half_way_is_never_visible(tmp_path):
    """`maestro drill` killed with SIGKILL while its record is being written (bytes on disk,
    not yet renamed into place) leaves no record and nothing listed as damaged."""
    root = tmp_path / "store"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "PAUSED"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert any((root / DRILLS_PREFIX).iterdir()), "the record's bytes were being written when it was killed"

    store = LocalObjectStore(root, retry=FAST_RETRY)
    history = list_drills(store)
    assert history.records == [] and history.skipped == []
    record_drill(store, a_record(utcnow()))
    assert len(list_drills(store).records) == 1


def test_records_read_back_as_written(tmp_path):
    """What a record keeps survives the round trip through the store (JSON on disk)."""
    store = LocalObjectStore(tmp_path, retry=FAST_RETRY)
    written = a_record(datetime(2026, 11, 29, 3, 0, 5, 123456, tzinfo=timezone.utc), source="dagster", ok=False)
    key = record_drill(store, written)
    (read,) = list_drills(store).records
    assert read == written and key == f"drills/{written.drill_id}.json"
    assert json.loads(store.get_bytes(key))["started_at"] == "2026-11-29T03:00:05.123456Z"
