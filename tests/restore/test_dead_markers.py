"""Markers left by killed processes block nothing, and cleanup lists every leftover.

A `maestro backup run` and a `maestro restore` killed with SIGKILL leave their activity
markers in the store. Those name this host and a pid that is gone: `maestro restore cleanup`
drops the killed restore's scratch database (it used to say "would drop 0" for 12 hours),
lists every restore leftover with its size and age, and `maestro backup retention` runs
(it used to skip everything) and removes the dead markers. A live process's marker whose
heartbeat stopped for minutes (a process on another host, hung or gone) counts as dead too;
one whose heartbeat goes on counts as running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import timedelta

from maestro_pipelines.backup import LIVE, activity, get_backup, restore_backup, running_activities
from maestro_pipelines.backup.activity import HEARTBEAT_STALE_AFTER
from maestro_pipelines.backup.manifest import utcnow
from tests.backup.conftest import keys, wait_until
from tests.restore.conftest import fresh_suffix
from tests.restore.test_half_done import cli_env
from tests.restore.test_killed import GATE_FUNCTION, waiting_at_gate
from tests.test_cli import MAESTRO, run_maestro


def start_maestro(env: dict[str, str], *args: str) -> subprocess.Popen:
    # As run_maestro: a user's shell has neither MLFLOW_TRACKING_URI (MLflow exports it when an
    # earlier in-process test sets it) nor the other tests' MAESTRO_* settings.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
    return subprocess.Popen([MAESTRO, *args], env={**clean, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill_when(what: str, condition, child: subprocess.Popen, running: str, group: bool = False):
    """SIGKILL the command once `condition` holds: only it (what it started must die with
    it), or with `group` its process group (pg_dump, which is not tethered)."""
    try:
        return wait_until(what, condition, child, running=running)
    finally:
        os.killpg(child.pid, signal.SIGKILL) if group else os.kill(child.pid, signal.SIGKILL)
        child.communicate()


def test_killed_backup_and_restore_block_neither_cleanup_nor_retention(pg18_installation, local_case, tmp_path):
    inst, store, dbs = pg18_installation, local_case.store, pg18_installation.dbs
    gate = f"restore-gate-{fresh_suffix()}"
    dbs.execute(inst.platform, GATE_FUNCTION.format(gate=gate),
                "CREATE TABLE gated (id int PRIMARY KEY CHECK (restore_gate(id)))", "INSERT INTO gated VALUES (1)")
    backup = inst.backup(store)
    env = cli_env(inst, local_case, tmp_path)
    # An old live database kept aside by a live restore: the way back, never dropped unasked.
    report = restore_backup(store, get_backup(store, backup.backup_id), inst.destinations(), target=LIVE,
                            confirm=inst.mlflow, roles=["mlflow"])
    kept = report.databases[0].kept_as

    with dbs.connect(inst.platform, autocommit=False) as locker:
        locker.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        backing_up = start_maestro(env, "backup", "run")
        kill_when("a backup waiting for the lock", lambda: dbs.scalar(
            "postgres", "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'maestro-backup' "
            f"AND datname = '{inst.platform}' AND wait_event_type = 'Lock'") and keys(store, "activity/"),
            backing_up, "backup", group=True)
        locker.rollback()
    with dbs.connect("postgres") as gate_session:
        gate_session.execute(f"SET application_name = '{gate}'")
        restoring = start_maestro(env, "restore", "--backup", backup.backup_id, "--databases", "platform")
        [scratch] = kill_when("pg_restore at the gate", lambda: waiting_at_gate(dbs, inst.platform), restoring,
                              "restore")
    assert sorted(k.split("/")[1].split("-")[0] for k in keys(store, "activity/")) == ["backup", "restore"]
    assert running_activities(store) == []

    dry = run_maestro("restore", "cleanup", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"would drop {scratch} \(scratch restore of {inst.platform}, [\d.,]+ (KiB|MiB), [\d.]+ h old\)",
                     dry.stdout), dry.stdout
    assert re.search(rf"kept {kept} \(old live database of {inst.mlflow}, [\d.,]+ (KiB|MiB), [\d.]+ h old\): "
                     rf"the way back from that restore; drop it with --confirm {inst.platform}", dry.stdout), dry.stdout
    assert scratch in dbs.scalar("postgres", "SELECT string_agg(datname, ',') FROM pg_database")

    real = run_maestro("restore", "cleanup", env=env)
    assert real.returncode == 0 and f"dropped {scratch} (" in real.stdout, real.stdout + real.stderr
    assert [k.split("/")[1].split("-")[0] for k in keys(store, "activity/")] == ["backup"], "the dead restore's marker"
    retention = run_maestro("backup", "retention", env=env)
    assert retention.returncode == 0 and "skipped" not in retention.stderr, retention.stderr
    assert keys(store, "activity/") == [], "retention left the dead markers"


def heartbeat(store, key: str) -> str:
    return json.loads(store.get_bytes(key, verify=False))["heartbeat_at"]


def test_a_marker_counts_as_running_while_its_heartbeat_goes_on(local_case):
    store = local_case.store
    with activity(store, "restore", "20261201t000000", heartbeat_every=timedelta(milliseconds=50)) as marker:
        first = heartbeat(store, marker.key)
        deadline = time.monotonic() + 30
        while heartbeat(store, marker.key) == first:
            assert time.monotonic() < deadline, "the marker's heartbeat was never rewritten"
            time.sleep(0.02)
        assert [a.ident for a in running_activities(store)] == ["20261201t000000"]
        # Minutes without a heartbeat: dead, even though this pid is alive.
        later = utcnow() + HEARTBEAT_STALE_AFTER + timedelta(seconds=1)
        assert running_activities(store, now=later) == []
    assert keys(store, "activity/") == []
