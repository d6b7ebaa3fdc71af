"""Base backups on real servers of the tests' own (archiving into a folder, pushed into the
store as `wal push` lays it out): a full and two incrementals on PostgreSQL 18 recovered and
compared with the source the way WAL-G's CI does it (a logical dump of each); PostgreSQL 15
takes full ones only; what is refused, and a damaged base backup, say so in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from maestro_pipelines.backup.manifest import BackupError
from maestro_pipelines.backup.pitr import base
from maestro_pipelines.backup.pitr.layout import BASE_RECORD, BASE_TAR, FULL, INCREMENTAL
from maestro_pipelines.backup.pitr.window import recovery_window
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.storage import open_store
from tests.pitr.base_helpers import (
    PG15_BIN,
    archiving_cluster,
    fetch_all_wal,
    logical_dump,
    push_archive,
    remove_cluster,
    start_recovered,
)
from tests.services import free_port
from tests.test_cli import run_maestro


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pitr-base")
    for parent in [folder, *folder.parents][:-1]:
        if parent.stat().st_mode & 0o005 != 0o005 and str(parent).startswith("/tmp"):
            parent.chmod(parent.stat().st_mode | 0o005)  # the server's OS user walks into it
    return folder


@pytest.fixture(scope="module")
def pg18_cluster(workdir):
    cluster = archiving_cluster(workdir / "pg18", free_port())
    cluster.execute("CREATE DATABASE app")
    cluster.execute("CREATE TABLE items AS SELECT i AS id, md5(i::text) AS body FROM generate_series(1, 20000) i;"
                    "ALTER TABLE items ADD PRIMARY KEY (id)", "app")
    yield cluster
    remove_cluster(cluster)


@pytest.fixture
def store(tmp_path):
    (tmp_path / "store").mkdir()
    return open_store(f"file://{tmp_path / 'store'}")


def _target(cluster, user: str = "postgres") -> DatabaseTarget:
    return DatabaseTarget("platform", cluster.url("app", user))


def _backup(store, cluster, kind: str = "auto"):
    record = base.take_base_backup(store, _target(cluster), kind=kind)
    assert base.verify_base_backup(store, record.base_id).ok
    return record


def test_incremental_chain_recovers_to_the_source(pg18_cluster, store, workdir):
    """Full, rows changed, incremental, changed again, incremental: the chain extracted,
    combined and recovered with the archived WAL equals the source, row for row."""
    cluster = pg18_cluster
    full = _backup(store, cluster)
    cluster.execute("UPDATE items SET body = 'first change' WHERE id % 20 = 0", "app")
    first = _backup(store, cluster)
    cluster.execute("DELETE FROM items WHERE id % 7 = 0; CREATE TABLE later (n int); INSERT INTO later VALUES (42)",
                    "app")
    second = _backup(store, cluster)
    assert (full.kind, first.kind, second.kind) == (FULL, INCREMENTAL, INCREMENTAL)
    assert (first.parent, second.parent) == (full.base_id, first.base_id)
    assert second.compressed_bytes < full.compressed_bytes / 3
    cluster.execute("INSERT INTO later VALUES (43)", "app")  # after the last backup: only the WAL has it
    cluster.switch_and_archive()
    push_archive(store, full.system_id, cluster.archive)
    expected = logical_dump(cluster, "app")

    chain = base.base_chain(store, second)
    assert [r.base_id for r in chain] == [full.base_id, first.base_id, second.base_id]
    data = base.extract_base(store, chain, workdir / "restored" / "data")
    fetched = workdir / "restored-wal"
    assert fetch_all_wal(store, full.system_id, fetched) > 0
    restored = start_recovered(data, fetched, workdir / "restored", free_port(), cluster)
    try:
        assert logical_dump(restored, "app") == expected
        assert restored.execute("SELECT array_agg(n ORDER BY n) FROM later", "app")[0][0] == [42, 43]
    finally:
        remove_cluster(restored)
        shutil.rmtree(fetched, ignore_errors=True)
    window = recovery_window(store, full.system_id)
    assert window.usable == [full.base_id, first.base_id, second.base_id] and not window.gaps
    assert window.earliest_lsn == full.stop_lsn


def test_damaged_or_missing_base_object_is_one_clear_line(pg18_cluster, store, workdir):
    record = base.take_base_backup(store, _target(pg18_cluster), kind=FULL)
    tar = Path(store.url.removeprefix("file://")) / base.layout.base_root(record.system_id, record.base_id) / BASE_TAR
    with open(tar, "r+b") as handle:  # bit rot: same size, other bytes
        handle.seek(record.compressed_bytes // 2)
        handle.write(b"\0" * 64)
    shown = run_maestro("backup", "verify", "latest", "--kind", "base", env={"MAESTRO_STORE_URL": store.url})
    assert shown.returncode == 1 and f"base backup {record.base_id} FAILED verification" in shown.stderr
    assert "Traceback" not in shown.stderr
    report = base.verify_base_backup(store, record.base_id)
    assert not report.ok and len(report.problems) == 1 and "\n" not in report.problems[0]
    assert record.base_id in report.problems[0]
    entry = base.get_base_backup(store, record.base_id)
    assert entry.bad and not entry.verified
    with pytest.raises(BackupError, match=f"{record.base_id} is damaged") as damaged:
        base.extract_base(store, [record], workdir / "damaged")
    assert "\n" not in str(damaged.value)
    tar.unlink()
    with pytest.raises(BackupError, match=f"{record.base_id}'s {BASE_TAR} is missing") as missing:
        base.extract_base(store, [record], workdir / "missing")
    assert "another base backup" in str(missing.value)


def test_a_file_changed_inside_the_tar_is_named_by_pg_verifybackup(pg18_cluster, store):
    """Verification checks every file inside the tar against the backup manifest, not only the
    object's sha256: a base.tar.zst rewritten with one data file's bytes changed, and its record
    rewritten to name it (as whoever can write the bucket could), fails naming that file."""
    import io
    import tarfile

    import zstandard

    record = base.take_base_backup(store, _target(pg18_cluster), kind=FULL)
    root = base.layout.base_root(record.system_id, record.base_id)
    tar = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(store.get_bytes(f"{root}/{BASE_TAR}")))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        member = next(m for m in archive.getmembers() if m.isfile() and m.name.startswith("base/") and m.size > 8192)
    changed = slice(member.offset_data + 100, member.offset_data + 116)
    tar[changed] = bytes(b ^ 0xFF for b in tar[changed])
    info = store.put_bytes(f"{root}/{BASE_TAR}", zstandard.ZstdCompressor().compress(bytes(tar)))
    record.sha256, record.compressed_bytes = info.sha256, info.size
    store.put_bytes(f"{root}/{BASE_RECORD}", record.to_json())
    report = base.verify_base_backup(store, record.base_id)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert f'checksum mismatch for file "{member.name}"' in report.problems[0] and record.base_id in report.problems[0]


def test_refused_without_replication_privilege(pg18_cluster, store):
    pg18_cluster.execute("DO $$BEGIN CREATE ROLE app_owner LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    with pytest.raises(BackupError, match="no REPLICATION privilege") as refused:
        base.take_base_backup(store, _target(pg18_cluster, "app_owner"))
    assert "managed service" in str(refused.value)
    assert not list(store.list("", with_metadata=False)) or not base.list_base_backups(store)


@pytest.fixture(scope="module")
def pg15_cluster(workdir):
    if not (PG15_BIN / "initdb").exists():
        pytest.skip("Debian's PostgreSQL 15 is not installed here")
    cluster = archiving_cluster(workdir / "pg15", free_port(), pg15=True, archive_command="")
    cluster.execute("CREATE DATABASE app")
    yield cluster
    remove_cluster(cluster)


def _cli_env(cluster, store, tmp_path) -> dict[str, str]:
    return {"MAESTRO_DATABASE_URL": f"postgresql://postgres@:{cluster.port}/app?host={cluster.sock}",
            "MAESTRO_STORE_URL": store.url, "MAESTRO_HOME": str(tmp_path / "home")}


def test_backup_run_takes_the_dumps_and_a_base_backup_then_an_incremental(pg18_cluster, store, tmp_path):
    env = _cli_env(pg18_cluster, store, tmp_path)
    both = run_maestro("backup", "run", "--json", env=env)
    assert both.returncode == 0, both.stderr
    summary = json.loads(both.stdout)
    assert summary["verified"] and summary["databases"]["platform"]["database"] == "app"
    [taken] = summary["base_backups"]["taken"]
    assert taken["kind"] == FULL and summary["base_backups"]["verified"] == {taken["id"]: True}
    only_base = run_maestro("backup", "run", "--kind", "base", "--json", env=env)
    assert only_base.returncode == 0, only_base.stderr
    [incremental] = json.loads(only_base.stdout)["taken"]
    assert (incremental["kind"], incremental["parent"]) == (INCREMENTAL, taken["id"])


def test_pg15_refused_while_archiving_is_off_then_full_only(pg15_cluster, store, tmp_path):
    with pytest.raises(BackupError, match="archive_command is empty") as refused:
        base.take_base_backup(store, _target(pg15_cluster))
    assert "--kind dump" in str(refused.value)
    env = _cli_env(pg15_cluster, store, tmp_path)
    dumps_only = run_maestro("backup", "run", "--json", env=env)  # the dumps, and a note on the RPO the user has
    assert dumps_only.returncode == 0, dumps_only.stderr
    [skipped] = json.loads(dumps_only.stdout)["base_backups"]["skipped"]
    assert "archive_command is empty" in skipped and "RPO is the latest dump's age" in skipped
    base_only = run_maestro("backup", "run", "--kind", "base", env=env)
    assert base_only.returncode == 1 and "archive_command is empty" in base_only.stderr
    assert "Traceback" not in base_only.stderr
    pg15_cluster.execute(f"ALTER SYSTEM SET archive_command = 'cp %p {pg15_cluster.archive}/%f'")
    pg15_cluster.execute("SELECT pg_reload_conf()")
    first = _backup(store, pg15_cluster)
    said: list[str] = []
    second = base.take_base_backup(store, _target(pg15_cluster), log=said.append)
    assert (first.kind, second.kind, second.parent) == (FULL, FULL, None)
    assert "no incremental backups" in said[0]
    assert first.server_version_num // 10000 == 15
    with pytest.raises(BackupError, match="No incremental base backup possible"):
        base.take_base_backup(store, _target(pg15_cluster), kind=INCREMENTAL)


def test_killed_mid_base_backup_leaves_none_and_retention_sweeps_it(pg18_cluster, store, tmp_path):
    """kill -9 of `maestro backup run --kind base` while the tar streams: no base backup exists,
    `backup info` says one was killed, retention removes what it left, the next one is taken."""
    import os
    import signal
    import subprocess

    from tests.pitr.base_helpers import poll
    from tests.test_cli import MAESTRO

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))},
           **_cli_env(pg18_cluster, store, tmp_path)}
    root = Path(store.url.removeprefix("file://"))
    child = subprocess.Popen([MAESTRO, "backup", "run", "--kind", "base"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll("the base backup's folder in the store", lambda: list(root.glob("pitr/*/base/*")), deadline_s=60)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert base.list_base_backups(store) == []
    info = json.loads(run_maestro("backup", "info", "--json", env=_cli_env(pg18_cluster, store, tmp_path)).stdout)
    assert any(r["message"].startswith("killed: base ") for r in info["reasons"])
    swept = run_maestro("backup", "retention", env=_cli_env(pg18_cluster, store, tmp_path))
    assert swept.returncode == 0, swept.stderr
    assert not list(root.glob("pitr/*/base/*/*")) and not list(root.glob("activity/*"))
    again = run_maestro("backup", "run", "--kind", "base", "--json", env=_cli_env(pg18_cluster, store, tmp_path))
    assert again.returncode == 0, again.stderr
    assert [b.base_id for b in base.list_base_backups(store)] == [json.loads(again.stdout)["taken"][0]["id"]]
