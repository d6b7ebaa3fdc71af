"""`maestro wal push` killed with SIGKILL mid-upload (the server restarting, the OOM killer)
leaves nothing under the segment's final name: recovery can never fetch half a segment, and
PostgreSQL's retry of the same archive_command succeeds.

The push runs in a child process (push_child.py) that pauses once 24 MB of a 32 MB segment
(random bytes: zstd cannot shrink them, so the upload is as long as the segment) have gone to
the store; the test checks the upload is under way (a temporary file, an open multipart
upload) and kills it there."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.wal import fetch_wal, list_wal, push_wal
from tests.backup.conftest import REPO_ROOT, case, child_environment, store_spec, wait_until  # noqa: F401 (fixture)
from tests.backup.child import upload_open
from tests.pitr.conftest import SYNTHETIC_SYSTEM_ID, synthetic_segment
from maestro_pipelines.platform_db.embedded import PUSHER_MODULE, WAL_SPOOL
from tests.stores.conftest import LocalCase
from tests.test_cli import run_maestro

SEGMENT_BYTES = 32 * 1024 * 1024
PAUSE_AFTER = 24 * 1024 * 1024


def upload_under_way(case) -> bool:
    if isinstance(case, LocalCase):
        return any(path.name.startswith(".maestro-tmp-") and path.stat().st_size > 0
                   for path in case.root.rglob("*") if path.is_file())
    return upload_open(case.store)


def test_a_push_killed_mid_upload_leaves_no_segment_and_the_retry_archives_it(case, tmp_path):
    segment = synthetic_segment(tmp_path, size=SEGMENT_BYTES)
    sysid = str(SYNTHETIC_SYSTEM_ID)
    key = layout.wal_key(sysid, segment.name)
    marker = tmp_path / "paused.json"
    config = tmp_path / "push.json"
    config.write_text(json.dumps({"store": store_spec(case), "path": str(segment), "marker": str(marker),
                                  "pause_after": PAUSE_AFTER}))
    child = subprocess.Popen([sys.executable, "-m", "tests.pitr.push_child", str(config)], cwd=REPO_ROOT,
                             env=child_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until("the pause mid-upload", marker.exists, child, running="push")
        wait_until("part of the segment in the store", lambda: upload_under_way(case), child, running="push")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)

    assert not case.store.exists(key)
    assert list_wal(case.store, sysid) == []
    if isinstance(case, LocalCase):
        assert not case.root.joinpath(*key.split("/")).exists()

    # PostgreSQL runs archive_command again for the same file: this time it is archived whole.
    if isinstance(case, LocalCase):  # as the server runs it: the CLI
        retried = run_maestro("wal", "push", str(segment), env={"MAESTRO_STORE_URL": case.root.as_uri()})
        assert retried.returncode == 0 and retried.stdout.startswith("archived"), retried.stderr
    else:
        assert push_wal(case.store, segment) == "archived"
    [archived] = list_wal(case.store, sysid)
    raw = hashlib.sha256(segment.read_bytes()).hexdigest()
    assert (archived.name, archived.wal_sha256) == (segment.name, raw)
    assert fetch_wal(case.store, sysid, segment.name, tmp_path / "fetched")
    assert hashlib.sha256((tmp_path / "fetched").read_bytes()).hexdigest() == raw


def test_the_pusher_killed_mid_upload_keeps_the_spooled_segment_and_the_next_pusher_archives_it(tmp_path):
    """The spool is the only copy once archive_command has succeeded (PostgreSQL recycles its
    own): the pusher deletes a spooled segment only after the store has all of it."""
    home = tmp_path / "home"
    (home / WAL_SPOOL).mkdir(parents=True)
    segment = synthetic_segment(home / WAL_SPOOL, size=SEGMENT_BYTES)
    raw = hashlib.sha256(segment.read_bytes()).hexdigest()
    local = LocalCase(home / "store")
    marker = tmp_path / "paused.json"
    config = tmp_path / "push.json"
    config.write_text(json.dumps({"store": store_spec(local), "home": str(home), "marker": str(marker),
                                  "pause_after": PAUSE_AFTER}))
    child = subprocess.Popen([sys.executable, "-m", "tests.pitr.push_child", str(config)], cwd=REPO_ROOT,
                             env=child_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until("the pusher's pause mid-upload", marker.exists, child, running="pusher")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert segment.exists() and hashlib.sha256(segment.read_bytes()).hexdigest() == raw
    assert list_wal(local.store, str(SYNTHETIC_SYSTEM_ID)) == []

    # The next pusher (as a Maestro process attaching to the server starts it) archives it.
    pusher = subprocess.Popen([sys.executable, "-m", PUSHER_MODULE, str(home)], cwd=REPO_ROOT,
                              env={**child_environment(), "MAESTRO_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until("the spool emptied", lambda: not segment.exists(), pusher, running="pusher")
    finally:
        pusher.terminate()
        pusher.wait(timeout=60)
    [archived] = list_wal(local.store, str(SYNTHETIC_SYSTEM_ID))
    assert (archived.name, archived.wal_sha256) == (segment.name, raw)
