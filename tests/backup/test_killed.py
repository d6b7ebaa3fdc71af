"""A backup killed with SIGKILL at any point leaves no backup behind: nothing to list or
restore, a clear answer when asked for it by id, and leftovers that retention removes.

The backup runs in a child process (child.py); the test kills it once a known point is
reached, found by polling for files, objects or server state with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from maestro_pipelines.backup import (
    BackupNotFound,
    activity,
    apply_retention,
    get_backup,
    list_backups,
    running_activities,
)
from maestro_pipelines.backup.manifest import ARTIFACTS_NAME, MANIFEST_NAME, utcnow
from maestro_pipelines.backup.retention import RetentionPolicy
from tests.backup.conftest import (
    ARTIFACTS,
    REPO_ROOT,
    child_environment,
    fill_big_table,
    keys,
    local_raw_files,
    store_spec,
    wait_until,
)



def start_backup(tmp_path, case, targets, pause=None) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "paused.json"
    config = tmp_path / "backup.json"
    config.write_text(json.dumps({
        "store": store_spec(case),
        "targets": [{"role": role, "url": url.render_as_string(hide_password=False)} for role, url in targets],
        "pause": pause,
        "marker": str(marker),
    }))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.backup.child", str(config)], cwd=REPO_ROOT, env=child_environment(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    return child, marker


def kill(child: subprocess.Popen) -> None:
    """SIGKILL the backup and the pg_dump it started (its own process group)."""
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    child.stdin.close()
    child.stdout.close()
    child.stderr.close()


def backup_ids(store) -> set[str]:
    return {key.split("/")[1] for key in keys(store, "backups/")}


def assert_no_backup_and_retention_cleans_up(case, backup_id: str) -> None:
    store = case.store
    assert list_backups(store) == []
    with pytest.raises(BackupNotFound) as raised:
        get_backup(store, backup_id)
    assert "never finished" in raised.value.hint
    with pytest.raises(BackupNotFound):
        get_backup(store, "latest")

    # The killed backup's marker names this host and a pid that is gone: it blocks nothing,
    # and retention removes it and the folder it was writing at once.
    assert keys(store, "activity/") == [f"activity/backup-{backup_id}.json"]
    assert running_activities(store) == []
    plan = apply_retention(store)
    assert plan.skipped is None and plan.delete_markers == [f"activity/backup-{backup_id}.json"]
    assert plan.delete_incomplete == [f"backups/{backup_id}"]
    assert keys(store, "activity/") == []
    assert keys(store, "backups/") == []
    assert keys(store, ARTIFACTS) == [f"{ARTIFACTS}model.pkl"], "retention touched the model artifacts"


@pytest.fixture
def source(pg18_databases, case):
    case.store.put_bytes(f"{ARTIFACTS}model.pkl", b"weights" * 100)
    database = pg18_databases.create()
    return pg18_databases, database


def test_killed_while_pg_dump_waits_leaves_no_backup(source, case, tmp_path):
    """Killed after it marked itself running and took its snapshot, while pg_dump waits for
    a table lock another session holds."""
    dbs, database = source
    dbs.execute(database, "CREATE TABLE busy (id int)", "INSERT INTO busy VALUES (1)")
    with dbs.connect(database, autocommit=False) as locker:
        locker.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        child, _ = start_backup(tmp_path, case, [("platform", dbs.url(database))])
        try:
            wait_until("pg_dump waiting for the lock", lambda: dbs.scalar(
                "postgres",
                "SELECT count(*) >= 2 FROM pg_stat_activity WHERE application_name = 'maestro-backup' "
                f"AND datname = '{database}' AND wait_event_type = 'Lock'",
            ), child)
            [marker] = wait_until("an activity marker", lambda: keys(case.store, "activity/"), child)
        finally:
            kill(child)
        locker.rollback()
    backup_id = marker.split("backup-", 1)[1].removesuffix(".json")
    assert keys(case.store, f"backups/{backup_id}/") == [f"backups/{backup_id}/{ARTIFACTS_NAME}"]
    assert_no_backup_and_retention_cleans_up(case, backup_id)


def test_killed_mid_dump_leaves_no_backup(source, case, tmp_path):
    """Killed 16 MiB into pg_dump's output, before the dump object exists."""
    dbs, database = source
    fill_big_table(dbs, database)
    child, marker = start_backup(tmp_path, case, [("platform", dbs.url(database))], pause="mid-dump")
    try:
        wait_until("the mid-dump pause", marker.exists, child)
    finally:
        kill(child)
    assert json.loads(marker.read_text())["bytes"] >= 16 * 1024 * 1024
    [backup_id] = backup_ids(case.store)
    assert keys(case.store, f"backups/{backup_id}/") == [f"backups/{backup_id}/{ARTIFACTS_NAME}"]
    assert_no_backup_and_retention_cleans_up(case, backup_id)


def test_killed_between_the_dumps_and_the_manifest_leaves_no_backup(source, case, tmp_path):
    """Killed after every dump object is committed, before the manifest is written."""
    dbs, database = source
    dbs.execute(database, "CREATE TABLE t (id int)", "INSERT INTO t SELECT generate_series(1, 1000)")
    other = dbs.create()
    targets = [("platform", dbs.url(database)), ("mlflow", dbs.url(other))]
    child, marker = start_backup(tmp_path, case, targets, pause="dump-committed")
    try:
        wait_until("the pause after the last dump", marker.exists, child)
    finally:
        kill(child)
    [backup_id] = backup_ids(case.store)
    root = f"backups/{backup_id}"
    assert keys(case.store, f"{root}/") == [
        f"{root}/{ARTIFACTS_NAME}", f"{root}/mlflow.dump.zst", f"{root}/platform.dump.zst"
    ]
    assert not case.store.exists(f"{root}/{MANIFEST_NAME}")
    assert_no_backup_and_retention_cleans_up(case, backup_id)


def test_killed_mid_dump_leaves_no_partial_dump_on_local_disk(pg18_databases, local_case, tmp_path):
    """The partial dump a killed backup was writing (a temporary file in the backup's folder,
    as big as the dump had got) is gone from the disk once retention has removed the backup."""
    dbs = pg18_databases
    database = dbs.create()
    fill_big_table(dbs, database)
    child, marker = start_backup(tmp_path, local_case, [("platform", dbs.url(database))], pause="mid-dump")
    try:
        wait_until("the mid-dump pause", marker.exists, child)
    finally:
        kill(child)
    assert [name for name in local_raw_files(local_case, "backups") if "/.maestro-tmp-" in name], "no partial dump?"
    # Retention runs 12 hours later: the files on disk are as old as its clock says.
    stale_after = RetentionPolicy().stale_after
    later = utcnow() + stale_after + timedelta(minutes=1)
    then = (utcnow() - stale_after - timedelta(minutes=1)).timestamp()
    for path in (local_case.root / "backups").rglob("*"):
        os.utime(path, (then, then))
    assert apply_retention(local_case.store, now=later).delete_incomplete != []
    assert local_raw_files(local_case, "backups") == [], "the killed backup's partial files are still on disk"


def test_retention_removes_the_activity_marker_a_killed_process_left(case):
    """A process killed inside a backup or restore leaves its activity marker; once stale,
    retention removes it (it no longer blocks anything, but would pile up forever)."""
    store = case.store
    marking = activity(store, "backup", "20261126T020000Z-aaaaaa")
    marking.__enter__()  # a process killed here never leaves the block
    assert keys(store, "activity/") != []
    later = utcnow() + RetentionPolicy().stale_after + timedelta(minutes=1)
    assert apply_retention(store, now=later).skipped is None
    assert keys(store, "activity/") == [], "the killed process's activity marker is never removed"
