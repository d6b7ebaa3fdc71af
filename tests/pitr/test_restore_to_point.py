"""`maestro restore --to-time/--to-lsn` as on-call runs it (the CLI in a subprocess), against
an embedded PostgreSQL 18 that archives its WAL into the store: one base backup, then marker
rows t1 < t2 < t3, each committed and its WAL archived and pushed before the test goes on.

One module-scoped history serves every test (a server, a base backup, three markers: about
5 s); each restore recovers a temporary server from it (a few seconds each).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.base import take_base_backup
from maestro_pipelines.backup.pitr.feeder import fetch_segment
from maestro_pipelines.platform_db.location import DatabaseLocation
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.storage import open_store
from tests.pitr.recovery_fixtures import ArchivingServer, _push
from tests.test_cli import run_maestro

DATABASE = "pitr_app"


@pytest.fixture(scope="module")
def history():
    root = Path(tempfile.mkdtemp(prefix="maestro-pitr-test-"))
    root.chmod(0o755)
    (root / "store").mkdir()
    store = open_store((root / "store").as_uri(), create=True)
    server = ArchivingServer(root / "server", store)
    try:
        server.execute("postgres", f"CREATE DATABASE {DATABASE}")
        upgrade(DatabaseLocation(platform_url=server.url.set(database=DATABASE), source="test"))
        server.execute(DATABASE, "CREATE TABLE markers (id serial PRIMARY KEY, label text NOT NULL)")
        # Left in postgresql.auto.conf by an earlier recovery by hand (a primary ignores it): it
        # comes with the base backups and must neither apply nor clash with the restore's target.
        server.execute("postgres", "ALTER SYSTEM SET recovery_target_xid = '999'")
        older = take_base_backup(store, server.target(DATABASE), kind="full")
        server.execute(DATABASE, "INSERT INTO markers (label) VALUES ('t0')")  # replayed from the older one
        server.execute(DATABASE, "DELETE FROM markers")
        base = take_base_backup(store, server.target(DATABASE), kind="full")
        t1, t2 = server.marker(DATABASE, "t1"), server.marker(DATABASE, "t2")
        between = server.execute("postgres", "SELECT clock_timestamp()")[0][0]
        t3 = server.marker(DATABASE, "t3")
        server.archive_now()
        server.marker(DATABASE, "t4")  # and a later segment: a hole before it is a gap, not the end
        server.archive_now()
        socket = server.url.query["host"]
        env = {"MAESTRO_DATABASE_URL": f"postgresql://postgres@/{DATABASE}?host={socket}",
               "MAESTRO_STORE_URL": (root / "store").as_uri(), "MAESTRO_HOME": str(root / "home"),
               "TMPDIR": str(root)}
        yield {"server": server, "store": store, "base": base, "older": older, "t1": t1, "t2": t2, "t3": t3, "between": between,
               "env": env, "root": root}
    finally:
        server.stop()


def markers(server: ArchivingServer, database: str) -> list[str]:
    return [row[0] for row in server.execute(database, "SELECT label FROM markers ORDER BY id")]


def restores(server: ArchivingServer) -> list[str]:
    return [row[0] for row in server.execute("postgres", f"SELECT datname FROM pg_database "
                                                        f"WHERE datname LIKE '{DATABASE}\\_%' ORDER BY 1")]


def restore(history, *args: str):
    done = run_maestro("restore", "--databases", "platform", *args, env=history["env"])
    leftovers = [p for p in Path(history["root"]).glob("maestro-recover-*")]
    assert not leftovers, f"the temporary server's folder was left: {leftovers}"
    return done


def delivered(history, done) -> tuple[dict, list[str]]:
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [database] = report["databases"]
    assert database["role"] == "platform" and database["restored_as"].startswith(f"{DATABASE}_restore_")
    found = markers(history["server"], database["restored_as"])
    history["server"].execute("postgres", f'DROP DATABASE "{database["restored_as"]}" WITH (FORCE)')
    return report, found


def test_to_time_between_t2_and_t3_restores_t1_and_t2_not_t3(history):
    done = restore(history, "--to-time", history["between"].isoformat(), "--json")
    report, found = delivered(history, done)
    assert found == ["t1", "t2"]
    assert report["target"] == "scratch" and report["point"]["base_backup"] == history["base"].base_id
    # The point reached is t2's commit: after t1's marker, before the target.
    assert history["t1"][0] < datetime_of(report["point"]["time"]) <= history["between"]
    assert markers(history["server"], DATABASE) == ["t1", "t2", "t3", "t4"]  # live untouched


def datetime_of(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text)


def test_to_time_without_zone_is_utc_and_said_in_the_steps(history):
    naive = history["between"].astimezone(__import__("datetime").timezone.utc).replace(tzinfo=None).isoformat()
    done = restore(history, "--to-time", naive)
    assert done.returncode == 0, done.stderr
    assert "restore to " in done.stdout and "UTC" in done.stdout and "point reached: LSN" in done.stdout
    [scratch] = restores(history["server"])
    assert markers(history["server"], scratch) == ["t1", "t2"]
    history["server"].execute("postgres", f'DROP DATABASE "{scratch}" WITH (FORCE)')


def test_to_lsn_after_t2(history):
    report, found = delivered(history, restore(history, "--to-lsn", history["t2"][1], "--json"))
    assert found == ["t1", "t2"]
    assert layout.parse_lsn(report["point"]["lsn"]) >= layout.parse_lsn(history["t1"][1])


def test_latest_restores_every_marker(history):
    _report, found = delivered(history, restore(history, "--to-time", "latest", "--json"))
    assert found == ["t1", "t2", "t3", "t4"]


@pytest.mark.parametrize("when, said", [("2001-01-01T00:00:00Z", "before the recovery window"),
                                        ("2999-01-01T00:00:00Z", "the archive ends at segment")])
def test_a_point_outside_the_recovery_window_is_one_line(history, when, said):
    done = restore(history, "--to-time", when)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert said in lines[-1] and lines[-1].startswith("error: ") and "Traceback" not in done.stderr
    assert restores(history["server"]) == []


def test_bad_input_is_one_line(history):
    for args, said in ((["--to-time", "yesterday"], "is not a time"), (["--to-lsn", "3000060"], "is not a WAL position"),
                       (["--to-time", "latest", "--backup", "20261126T020000Z-3f2a1b"], "two restore points"),
                       (["--to-time", "latest", "--target", "live"], "Confirm with --confirm")):
        done = run_maestro("restore", *args, env=history["env"])
        assert done.returncode == 1 and said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert restores(history["server"]) == [] and not list(Path(history["root"]).glob("maestro-recover-*"))


@pytest.mark.parametrize("damage", ["corrupted", "missing", "replaced"])
def test_a_damaged_segment_is_named_and_nothing_is_restored(history, damage, tmp_path):
    server, store = history["server"], history["store"]
    segment = server.execute("postgres", "SELECT pg_walfile_name(%s::pg_lsn)", [history["t2"][1]])[0][0]
    key = layout.wal_key(server.system_id, segment)
    original = tmp_path / segment
    assert fetch_segment(store, server.system_id, segment, original)
    if damage == "corrupted":  # bit rot: a byte changed in place, the store's records as they were
        path = Path(history["root"], "store", *key.split("/"))
        with open(path, "r+b") as stored:
            stored.seek(os.path.getsize(path) // 2)
            byte = stored.read(1)
            stored.seek(-1, 1)
            stored.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "missing":
        store.delete(key)
    else:  # another segment's object under this name, with that segment's own records
        store.copy(layout.wal_key(server.system_id, layout.next_segment(segment)), key)
    try:
        done = restore(history, "--to-time", "latest", "--target", "live", "--confirm", DATABASE)
    finally:
        store.delete(key)
        _push(store, original, server.system_id)
    assert done.returncode == 1, done.stdout
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert segment in error and "Nothing was restored" in error, done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert markers(server, DATABASE) == ["t1", "t2", "t3", "t4"] and restores(server) == []


def test_the_restore_job_restores_to_a_time(history, tmp_path):
    """The Launchpad's restore_database with `to_time`: the same restore, the point in its metadata."""
    import dagster as dg

    from maestro_pipelines.definitions import defs
    from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase

    url = history["env"]["MAESTRO_DATABASE_URL"]
    resources = {"platform_db": PlatformDatabase(database_url=url, home=str(tmp_path / "home")),
                 "mlflow": MLflowRegistry(database_url=url), "store": ObjectStoreResource(url=history["env"]["MAESTRO_STORE_URL"])}
    config = {"to_time": history["between"].isoformat(), "databases": ["platform"]}
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("restore_database").execute_in_process(
            instance=instance, resources=resources, raise_on_error=False,
            run_config={"ops": {"restore_from_backup": {"config": config}}})
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    [materialization] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = materialization.event_specific_data.metadata
    assert metadata["reached_lsn"].value and metadata["base_backup"].value == history["base"].base_id
    [scratch] = restores(history["server"])
    assert markers(history["server"], scratch) == ["t1", "t2"]
    history["server"].execute("postgres", f'DROP DATABASE "{scratch}" WITH (FORCE)')


def test_a_killed_restore_leaves_no_server_and_the_next_one_sweeps_its_folder(history):
    """kill -9 of `maestro restore` while its temporary server recovers: the server dies with it
    (parent-death signal), and the next restore removes the folder it left."""
    import signal
    import subprocess
    import time

    from maestro_pipelines.processes import process_alive
    from tests.test_cli import MAESTRO

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
    child = subprocess.Popen([MAESTRO, "restore", "--databases", "platform", "--to-time", "latest"],
                             env={**clean, **history["env"]}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = Path(history["root"])
    deadline = time.monotonic() + 120
    while not list(root.glob("maestro-recover-*/pgdata/postmaster.pid")):
        assert child.poll() is None and time.monotonic() < deadline, "the temporary server never started"
        time.sleep(0.01)
    [pidfile] = list(root.glob("maestro-recover-*/pgdata/postmaster.pid"))
    while not pidfile.read_text().strip():
        time.sleep(0.01)
    postmaster = int(pidfile.read_text().splitlines()[0])
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30
    while process_alive(postmaster):
        assert time.monotonic() < deadline, "the temporary server outlived the killed restore"
        time.sleep(0.05)
    assert list(root.glob("maestro-recover-*"))  # left by the killed process...
    _report, found = delivered(history, restore(history, "--to-time", "latest", "--json"))  # ...swept by the next
    assert found == ["t1", "t2", "t3", "t4"] and restores(history["server"]) == []


def test_a_time_without_a_zone_is_read_in_maestro_timezone():
    """Pure parsing (no server): what on-call types is what the recovery aims at, and it says so."""
    from datetime import datetime, timezone

    from maestro_pipelines.backup.pitr.recover import RecoveryTarget

    berlin = RecoveryTarget.parse("2026-11-26T14:04:00", timezone_name="Europe/Berlin")
    assert berlin.time == datetime(2026, 11, 26, 13, 4, tzinfo=timezone.utc)
    assert "14:04:00 in Europe/Berlin" in berlin.describe()
    assert RecoveryTarget.parse("2026-11-26T14:04:00Z", timezone_name="Europe/Berlin").time.hour == 14
    assert RecoveryTarget.parse("2026-11-26 14:04", timezone_name="UTC").describe() == "2026-11-26 14:04:00 UTC"
    assert RecoveryTarget.parse(to_lsn="16/b374d848").lsn == "16/B374D848"


def test_a_damaged_base_backup_is_skipped_for_the_one_before_it(history):
    """Bit rot in the newest base backup's tar: the restore says so and recovers from the older
    one (more WAL to replay), to the same point. Last in this file: it changes a stored object."""
    base = history["base"]
    key = f"{layout.base_root(base.system_id, base.base_id)}/{layout.BASE_TAR}"
    path = Path(history["root"], "store", *key.split("/"))
    with open(path, "r+b") as stored:
        stored.seek(os.path.getsize(path) // 2)
        byte = stored.read(1)
        stored.seek(-1, 1)
        stored.write(bytes([byte[0] ^ 0xFF]))
    done = restore(history, "--to-time", history["between"].isoformat(), "--json")
    report, found = delivered(history, done)
    assert found == ["t1", "t2"] and report["point"]["base_backup"] == history["older"].base_id
    assert f"skipping base backup {base.base_id}" in done.stderr
