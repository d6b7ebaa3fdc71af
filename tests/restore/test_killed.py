"""A restore killed with SIGKILL in the middle of pg_restore leaves the live databases as
they were; what it left half-restored is listed by `restore_leftovers` and dropped by
`restore_cleanup`; its download folder is removed by the next restore.

The restore runs in a child process (child.py). To kill it at a known point rather than
race a timer, the backed-up platform database holds a table whose CHECK constraint, in a
database named like a restore, waits while a "gate" session of the test is connected: the
test sees pg_restore's COPY waiting there, kills the restore, then closes the gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from maestro_pipelines.backup import LIVE, restore_cleanup, running_activities
from maestro_pipelines.backup.restore import remove_stale_workdirs
from tests.backup.conftest import REPO_ROOT, child_environment, store_spec, wait_until
from tests.restore.conftest import contents, fresh_suffix


GATE_FUNCTION = """
CREATE FUNCTION restore_gate(id int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  IF current_database() LIKE '%\\_restore\\_%' THEN
    LOOP
      PERFORM pg_stat_clear_snapshot();
      EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = '{gate}');
      PERFORM pg_sleep(0.005);
    END LOOP;
  END IF;
  RETURN true;
END $$
"""




def waiting_at_gate(dbs, platform: str) -> list[str]:
    """The restore databases in which pg_restore's COPY of `gated` waits at the gate."""
    with dbs.connect("postgres") as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_stat_activity WHERE application_name = 'maestro-restore' "
            "AND starts_with(datname, %s) AND query LIKE 'COPY %%gated%%' AND wait_event = 'PgSleep'",
            [f"{platform}_restore_"],
        ).fetchall()]


def pg_restores_into(database: str) -> list[str]:
    """pg_restore processes (leader and -j workers share the command line) restoring into `database`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "pid"]):
        if process.info["name"] == "pg_restore" and f"--dbname={database}" in (process.info["cmdline"] or []):
            found.append(f"pid {process.info['pid']}")
    return found


def wait_for_no_pg_restore(database: str, deadline_s: float = 30) -> list[str]:
    """Poll until no pg_restore into `database` runs; return those still there at the
    deadline. (Their server sessions are no sign: a backend looping in the gate only sees
    its client gone once the gate opens.)"""
    deadline = time.monotonic() + deadline_s
    while True:
        left = pg_restores_into(database)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_restore_killed_during_pg_restore_leaves_the_live_database_untouched(pg18_installation, case, tmp_path):
    """SIGKILL of the restoring process while pg_restore fills the platform database of a
    live restore: pg_restore and its workers die with it (no orphan keeps writing), the live
    databases keep their rows (the swap never happened), and the half-restored
    `<platform>_restore_<stamp>` database is what `restore_leftovers` reports, so
    `restore_cleanup` can drop it."""
    inst = pg18_installation
    dbs = inst.dbs
    gate = f"restore-gate-{fresh_suffix()}"
    dbs.execute(
        inst.platform,
        GATE_FUNCTION.format(gate=gate),
        "CREATE TABLE gated (id int PRIMARY KEY CHECK (restore_gate(id)))",
        "INSERT INTO gated SELECT generate_series(1, 10)",
    )
    manifest = inst.backup(case.store)
    dbs.execute(inst.platform, "INSERT INTO tenants (name) VALUES ('after-the-backup')")
    live_before = {name: contents(dbs, name, schema=False) for name in inst.names}

    config = tmp_path / "restore.json"
    config.write_text(json.dumps({
        "store": store_spec(case),
        "destinations": [{"role": d.role, "url": d.url.render_as_string(hide_password=False), "source": d.source}
                         for d in inst.destinations()],
        "backup_id": manifest.backup_id, "target": LIVE, "confirm": inst.platform,
    }))
    with dbs.connect("postgres") as gate_session:
        gate_session.execute(f"SET application_name = '{gate}'")
        scratch = tmp_path / "tmp"  # the killed restore's decompressed dumps stay there
        scratch.mkdir()
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.restore.child", str(config)], cwd=REPO_ROOT,
            env={**child_environment(), "TMPDIR": str(scratch)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            [restoring] = wait_until("pg_restore waiting at the gate", lambda: waiting_at_gate(dbs, inst.platform), child,
                                     running="restore")
        finally:
            # The restoring process only, not its process group: its pg_restore must die with it.
            os.kill(child.pid, signal.SIGKILL)
            out, err = child.communicate()
        # Checked while the gate still holds pg_restore: an orphan would wait there for ever.
        orphans = wait_for_no_pg_restore(restoring)
        assert orphans == [], f"pg_restore outlived the restore that started it: {orphans}"
    assert child.returncode == -signal.SIGKILL
    assert f"restoring platform into {restoring}" in out.decode()
    assert "swapping" not in out.decode()

    assert {name: contents(dbs, name, schema=False) for name in inst.names} == live_before
    assert inst.leftovers() == [restoring]
    # The killed restore's marker is left, but its pid is gone: it blocks nothing.
    assert [key for key in case.store.list("activity/", with_metadata=False)] != []
    assert running_activities(case.store) == []

    cleaned = [i for i in restore_cleanup(inst.destinations(), store=case.store) if i.leftover.configured]
    assert [(i.leftover.name, i.leftover.kind, i.leftover.live, i.action) for i in cleaned] == [
        (restoring, "restore", inst.platform, "dropped")
    ]
    assert list(case.store.list("activity/", with_metadata=False)) == [], "the dead marker was not removed"
    assert inst.leftovers() == []
    assert {name: contents(dbs, name, schema=False) for name in inst.names} == live_before

    # Its download folder (a whole decompressed dump) is removed by the next restore; a
    # running restore's folder (this process's) is not.
    [left] = list(scratch.glob("maestro-restore-*"))
    assert (left / "platform.dump").stat().st_size > 0
    running = scratch / f"maestro-restore-{os.getpid()}-running"
    running.mkdir()
    assert remove_stale_workdirs(scratch) == [left]
    assert list(scratch.iterdir()) == [running]
