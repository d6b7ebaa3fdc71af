"""Continuous WAL archiving as a user meets it: `maestro db start` and nothing else archives
every segment into the store (the server's archive_command spools it, the pusher moves it),
`maestro wal status` says so, `maestro db stop` leaves nothing behind in the spool; and
`maestro wal push`, PostgreSQL's archive_command, is idempotent and refuses other bytes
under an archived name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.crypto import generate_key, is_sealed
from maestro_pipelines.platform_db.embedded import pusher_keys
from maestro_pipelines.storage.local import LocalObjectStore
from tests.stores.conftest import LocalCase
from tests.pitr.conftest import archived_names, archiver_knows, maestro, switch_wal, system_id, wait_for
from tests.test_cli import run_maestro

# One worker for the module: its tests share one server (module fixture), started once.
pytestmark = pytest.mark.xdist_group("pitr-embedded")


def test_a_switched_segment_reaches_the_store_and_wal_status_shows_it(archiving_home, tmp_path):
    conninfo = archiving_home.socket_url
    sysid = system_id(conninfo)
    segment = switch_wal(conninfo)
    store = archiving_home.store
    wait_for(f"{segment} in the store", lambda: segment in archived_names(store, sysid))
    wait_for(f"pg_stat_archiver counting {segment}", lambda: archiver_knows(conninfo, segment))

    status = json.loads(maestro("wal", "status", "--json", env=archiving_home.env))
    assert status["archiving"] is True and status["problem"] is None, status
    assert (status["wal_level"], status["archive_mode"], status["archive_timeout_s"], status["summarize_wal"]) == \
        ("replica", "on", 60, "on")
    assert status["system_id"] == sysid and status["last_archived_wal"] >= segment
    assert status["newest_in_store"] >= segment and status["pusher_running"] is True
    text = maestro("wal", "status", env=archiving_home.env)
    assert f"newest segment {status['newest_in_store']}" in text and "archiving: on" in text

    # What PostgreSQL's restore_command would get back: the segment, whole and verified.
    fetched = tmp_path / "fetched"
    maestro("wal", "fetch", segment, str(fetched), "--system-id", sysid, env=archiving_home.env)
    system, timeline, size = layout.segment_header(fetched.read_bytes()[:64])
    assert (str(system), timeline, fetched.stat().st_size) == (sysid, 1, size)
    missing = run_maestro("wal", "fetch", layout.next_segment(layout.next_segment(segment)), str(tmp_path / "no"),
                          "--system-id", sysid, env=archiving_home.env)
    assert missing.returncode == 1 and not (tmp_path / "no").exists()


def ready_count(home: Path) -> int:
    return (home / "pgdata" / "log").read_text().count("database system is ready to accept connections")


def test_a_data_folder_made_without_archiving_archives_after_one_restart_and_db_stop_drains_it(tmp_path):
    """A data folder made by an older Maestro (here: MAESTRO_WAL_ARCHIVING=off) restarts once
    at its next start to turn archive_mode on; a backup key set after the server started
    reaches the pusher. The server archives its last segments while it
    shuts down; once `maestro db stop` returns they are in the store and the spool is empty."""
    env = {"MAESTRO_HOME": str(tmp_path / "home")}
    home = Path(env["MAESTRO_HOME"])
    maestro("db", "start", env={**env, "MAESTRO_WAL_ARCHIVING": "off"})
    maestro("db", "stop", env=env)
    assert not (home / "wal-spool").exists() and not (home / "store").exists()
    before = ready_count(home)
    maestro("db", "start", env=env)
    assert ready_count(home) == before + 2  # its start, and the one restart for archive_mode
    conninfo = (home / "pgdata" / "postmaster.pid").read_text().splitlines()[4]
    conninfo = f"host={conninfo} user=postgres dbname=postgres"
    sysid = system_id(conninfo)

    # The server (and its pusher) started before the user set a backup key: the next Maestro
    # process with the key replaces the pusher, so WAL is not archived in plaintext from then
    # on; a later process without the key (another shell) does not put the plaintext one back.
    try:
        plain_pusher = pusher_pid(home)
        maestro("db", "start", env={**env, "MAESTRO_BACKUP_KEY": generate_key()})
        sealed_pusher = pusher_pid(home)
        assert sealed_pusher != plain_pusher and pusher_keys(home)
        maestro("db", "start", env=env)
        assert pusher_pid(home) == sealed_pusher
        segment = switch_wal(conninfo)
    finally:
        maestro("db", "stop", env=env)
    store = LocalObjectStore(home / "store")
    assert segment in archived_names(store, sysid)
    assert is_sealed(store.get_bytes(layout.wal_key(sysid, segment))[:16])
    assert [p.name for p in (home / "wal-spool").iterdir()] == []
    assert not (home / "wal-pusher.pid").exists()


def pusher_pid(home: Path) -> int:
    """The running pusher's pid, once it has written its file (it starts beside the command)."""
    path = home / "wal-pusher.pid"
    return int(wait_for("the pusher's pid file", lambda: path.exists() and len(path.read_text().splitlines()) == 2
                        and path.read_text()).split()[0])


@pytest.fixture
def segment(archiving_home, tmp_path) -> Path:
    """A real segment of the embedded server, under its own name in a folder of its own."""
    sysid = system_id(archiving_home.socket_url)
    name = switch_wal(archiving_home.socket_url)
    wait_for(f"{name} in the store", lambda: name in archived_names(archiving_home.store, sysid))
    (tmp_path / "wal").mkdir()
    maestro("wal", "fetch", name, str(tmp_path / "wal" / name), "--system-id", sysid, env=archiving_home.env)
    return tmp_path / "wal" / name


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_wal_push_twice_succeeds_and_other_bytes_under_the_name_are_refused(segment, tmp_path):
    env = {"MAESTRO_STORE_URL": (tmp_path / "store").as_uri(), "MAESTRO_HOME": str(tmp_path / "home")}
    (tmp_path / "store").mkdir()
    first = run_maestro("wal", "push", str(segment), env=env)
    again = run_maestro("wal", "push", str(segment), env=env)
    assert (first.returncode, again.returncode) == (0, 0), (first.stderr, again.stderr)
    assert first.stdout.startswith("archived") and again.stdout.startswith("already archived")

    store = LocalObjectStore(tmp_path / "store")
    sysid = str(layout.segment_header(segment.read_bytes()[:64])[0])
    key = layout.wal_key(sysid, segment.name)
    before = store.head(key)
    assert before.metadata[layout.WAL_SHA256_KEY] == hashlib.sha256(segment.read_bytes()).hexdigest()

    damaged = bytearray(segment.read_bytes())
    damaged[1_000_000] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    refused = one_error_line(run_maestro("wal", "push", str(segment), env=env))
    assert f"{segment.name} is already archived" in refused and "other bytes" in refused
    after = store.head(key)
    assert (after.sha256, after.metadata) == (before.sha256, before.metadata)
    conflicts = [info.key for info in store.list(f"pitr/{sysid}/{layout.CONFLICTS_FOLDER}/")]
    assert conflicts == [layout.conflict_key(sysid, segment.name, hashlib.sha256(bytes(damaged)).hexdigest())]
    assert conflicts[0] in refused
    recorded = json.loads(store.get_bytes(conflicts[0]))
    assert recorded["stored_wal_sha256"] == before.metadata[layout.WAL_SHA256_KEY]


def test_wal_push_refuses_a_file_that_is_not_the_segment_its_name_says(segment, tmp_path):
    env = {"MAESTRO_STORE_URL": (tmp_path / "store").as_uri(), "MAESTRO_HOME": str(tmp_path / "home")}
    (tmp_path / "store").mkdir()
    renamed = segment.with_name(layout.next_segment(segment.name))
    segment.rename(renamed)
    refused = one_error_line(run_maestro("wal", "push", str(renamed), env=env))
    assert "starts at WAL position" in refused
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_wal_fetch_of_a_segment_damaged_in_the_store_fails_with_one_line_and_writes_nothing(segment, tmp_path):
    """What recovery's restore_command meets after bit rot in the store: not a segment
    PostgreSQL would replay, but one line naming the object (exit 1), and no file at %p."""
    case = LocalCase(tmp_path / "store")
    env = {"MAESTRO_STORE_URL": case.root.as_uri(), "MAESTRO_HOME": str(tmp_path / "home")}
    maestro("wal", "push", str(segment), env=env)
    sysid = str(layout.segment_header(segment.read_bytes()[:64])[0])
    case.corrupt(layout.wal_key(sysid, segment.name))
    dest = tmp_path / "restored"
    damaged = one_error_line(run_maestro("wal", "fetch", segment.name, str(dest), "--system-id", sysid, env=env))
    assert "is damaged" in damaged and layout.wal_key(sysid, segment.name) in damaged
    assert list(tmp_path.glob("restored*")) == [] and list(tmp_path.glob(f".{segment.name}.*")) == []
