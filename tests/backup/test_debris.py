"""A backup or archive that fails or is killed midway leaves nothing in the store once it
has failed (or, killed, once the next `maestro backup retention` has run): no object, no
open S3 multipart upload, no temporary object, no partial `monthly/` folder, and nothing
partial is ever listed.

The backup or archive runs in a child process (child.py) that pauses at a known point (an
open multipart upload, the first object copied into the archive), where the test kills it
or the pg_dump under it; retention runs as on-call runs it, `maestro backup retention`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from maestro_pipelines.backup import DatabaseTarget, create_backup, list_backups, verify_backup
from tests.backup.conftest import (
    ARTIFACTS,
    REPO_ROOT,
    child_environment,
    keys,
    local_raw_files,
    store_spec,
    wait_until,
)
from tests.backup.test_killed import kill, start_backup
from tests.stores.conftest import AWS, PREFIX, LocalCase, S3Case
from tests.test_cli import MAESTRO, run_maestro

MODEL = f"{ARTIFACTS}model.pkl"


def cli_env(case) -> dict[str, str]:
    """The environment that points `maestro` at the test's store."""
    if isinstance(case, LocalCase):
        return {"MAESTRO_STORE_URL": case.root.as_uri()}
    return {"MAESTRO_STORE_URL": f"s3://{case.bucket}/{PREFIX}", "AWS_ENDPOINT_URL": case.endpoint,
            "AWS_DEFAULT_REGION": AWS["region_name"], "AWS_ACCESS_KEY_ID": AWS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": AWS["aws_secret_access_key"]}


def everything_but_the_model(case) -> list[str]:
    """Every name in the bucket or folder (objects, the store's records and temporary objects,
    pending multipart uploads) except the model artifact the test put there."""
    names = case.raw_names()
    if isinstance(case, LocalCase):
        return [n for n in names if ARTIFACTS not in n]
    return [n for n in names if n != f"{PREFIX}/{MODEL}"]


@pytest.fixture
def s3_case(moto_endpoint):
    made = S3Case(moto_endpoint)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def big_source(pg18_databases, s3_case):
    """A database whose dump compresses poorly (random hex, about 70 MB, some 35 MB
    compressed): its object is uploaded in several 8 MiB parts while pg_dump still runs."""
    dbs = pg18_databases
    database = dbs.create()
    dbs.execute(database, "CREATE TABLE big (id integer PRIMARY KEY, payload text NOT NULL)",
                "INSERT INTO big SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text) "
                "|| md5(random()::text) || md5(random()::text) FROM generate_series(1, 400000) g")
    s3_case.store.put_bytes(MODEL, b"weights" * 100)
    return dbs, database


def open_uploads(case) -> list[str]:
    return [u["Key"] for u in case.client.list_multipart_uploads(Bucket=case.bucket).get("Uploads", [])]


def children_named(pid: int, name: str) -> list[int]:
    """Pids of the processes called `name` whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == name:
            found.append(int(entry.name))
    return found


def test_backup_whose_pg_dump_is_killed_mid_upload_leaves_nothing(big_source, s3_case, tmp_path):
    """pg_dump killed (an OOM kill) while the dump's multipart upload is open: the backup
    fails with a message saying so, and the upload, the artifact manifest and the activity
    marker are gone from the bucket at once."""
    dbs, database = big_source
    child, marker = start_backup(tmp_path, s3_case, [("platform", dbs.url(database))], pause="upload-open")
    try:
        wait_until("a multipart upload in progress", marker.exists, child)
        assert open_uploads(s3_case), "the pause came before the upload opened"
        [pg_dump] = wait_until("pg_dump under the backup", lambda: children_named(child.pid, "pg_dump"), child)
        os.kill(pg_dump, signal.SIGKILL)
        out, err = child.communicate(timeout=120)  # closes stdin: the backup goes on from its pause
    finally:
        if child.poll() is None:
            kill(child)
    assert child.returncode != 0 and b"pg_dump" in err and b"failed" in err, err.decode()
    assert everything_but_the_model(s3_case) == []
    assert list_backups(s3_case.store) == []


def test_backup_killed_mid_upload_leaves_nothing_once_retention_ran(big_source, s3_case, tmp_path):
    """The backup process itself killed (SIGKILL) with its dump's multipart upload open: the
    upload stays open (nothing can abort it in a dead process); the next `maestro backup
    retention`, seeing the backup's marker is a dead process's, removes the backup's folder,
    aborts the upload and removes the marker."""
    dbs, database = big_source
    child, marker = start_backup(tmp_path, s3_case, [("platform", dbs.url(database))], pause="upload-open")
    try:
        wait_until("a multipart upload in progress", marker.exists, child)
    finally:
        kill(child)
    [upload] = open_uploads(s3_case)
    assert "/backups/" in upload  # the upload goes straight onto the dump's key
    assert list_backups(s3_case.store) == []

    retention = run_maestro("backup", "retention", env=cli_env(s3_case))
    assert retention.returncode == 0, retention.stderr
    assert "never finished" in retention.stdout
    assert everything_but_the_model(s3_case) == []


def archive_child(tmp_path: Path, case, month: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "archive-paused.json"
    config = tmp_path / "archive.json"
    config.write_text(json.dumps({"store": store_spec(case), "month": month, "marker": str(marker)}))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.backup.child", "--archive", str(config)], cwd=REPO_ROOT,
        env=child_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return child, marker


def verified_backup(dbs, case):
    database = dbs.create()
    dbs.execute(database, "CREATE TABLE t (id int, v text)",
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    case.store.put_bytes(MODEL, b"weights" * 100)
    manifest = create_backup(case.store, [DatabaseTarget("platform", dbs.url(database))])
    assert verify_backup(case.store, manifest.backup_id).ok
    return manifest


def test_archive_killed_midway_leaves_nothing_once_retention_ran(pg18_databases, case, tmp_path):
    """An archive killed after its first copy leaves a monthly folder without a manifest
    (never listed); the next `maestro backup retention` sees the archive's marker is a dead
    process's and removes the folder and the marker."""
    manifest = verified_backup(pg18_databases, case)
    month = manifest.started_at.strftime("%Y-%m")
    child, marker = archive_child(tmp_path, case, month)
    try:
        wait_until("the first object copied", marker.exists, child, running="archive")
    finally:
        kill(child)
    assert keys(case.store, "monthly/") != []
    assert list_backups(case.store, monthly=True) == []

    retention = run_maestro("backup", "retention", env=cli_env(case))
    assert retention.returncode == 0, retention.stderr
    assert keys(case.store, "monthly/") == [] and keys(case.store, "activity/") == []
    assert [e.backup_id for e in list_backups(case.store)] == [manifest.backup_id]  # the source is kept


def test_archive_of_a_corrupt_backup_fails_and_leaves_no_partial_monthly_folder(pg18_databases, local_case):
    """Bit rot in the backup being archived (the file's size and mtime as they were, so only
    reading it shows it): `maestro backup archive` fails when the copy reads the damaged
    dump, after it copied the artifact manifest; nothing of the archive stays."""
    manifest = verified_backup(pg18_databases, local_case)
    month = manifest.started_at.strftime("%Y-%m")
    dump = local_case.root / "backups" / manifest.backup_id / "platform.dump.zst"
    before = dump.stat()
    with open(dump, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(dump, ns=(before.st_atime_ns, before.st_mtime_ns))

    archived = run_maestro("backup", "archive", "--month", month, env=cli_env(local_case))
    assert archived.returncode == 1 and "platform.dump.zst" in archived.stderr, archived.stderr
    assert local_raw_files(local_case, "monthly") == []
    assert [p for p in local_raw_files(local_case, ".maestro-meta") if p.startswith(".maestro-meta/monthly/")] == []
    listed = run_maestro("backup", "list", "--monthly", "--json", env=cli_env(local_case))
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_backup_run_stopped_with_sigterm_removes_what_it_wrote(pg18_databases, local_case, tmp_path):
    """`maestro backup run` stopped the way a service manager or `kill` stops it (SIGTERM)
    while pg_dump waits for a table lock, after it wrote its marker and artifact manifest:
    it removes both and stops pg_dump before it exits; nothing is left to list or sweep."""
    dbs = pg18_databases
    database = dbs.create()
    dbs.execute(database, "CREATE TABLE busy (id int)", "INSERT INTO busy VALUES (1)")
    local_case.store.put_bytes(MODEL, b"weights" * 100)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))},
           "MAESTRO_DATABASE_URL": dbs.server.libpq_url(database), "MAESTRO_HOME": str(tmp_path / "home"),
           **cli_env(local_case)}
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'maestro-backup' "
               f"AND datname = '{database}' AND wait_event_type = 'Lock'")
    with dbs.connect(database, autocommit=False) as locker:
        locker.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        backup = subprocess.Popen([MAESTRO, "backup", "run", "--no-verify"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until("pg_dump waiting for the lock", lambda: dbs.scalar("postgres", waiting) >= 1, backup)
            [pg_dump] = wait_until("pg_dump under the backup", lambda: children_named(backup.pid, "pg_dump"), backup)
            assert keys(local_case.store, "backups/") != [] and keys(local_case.store, "activity/") != []
            backup.send_signal(signal.SIGTERM)
            out, err = backup.communicate(timeout=120)
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.wait()
        locker.rollback()
    assert backup.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err.decode()
    assert everything_but_the_model(local_case) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pg_dump, 0)  # stopped and reaped by the backup on its way out, not orphaned
