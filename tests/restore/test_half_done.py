"""A live restore killed with SIGKILL at each step of its swap (platform, MLflow, Dagster's,
one after another) is seen by the next commands and finished or undone by one command.

Each database holds a label row: `A` when the backup was taken, `B` since. After the kill
the live databases are a mix (the swapped ones `A`); `maestro restore status`, `maestro
backup list`, `maestro restore cleanup`, `maestro restore` and the RPO sensor all report the
half-done swap and which database is from which backup; `maestro restore undo` makes every
one `B` again (the restored copies kept), `maestro restore finish` every one `A` (the old
ones kept). The restore runs in a child process (child.py) that stops at the chosen write of
the swap journal, where the test kills it; everything after that is the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import dagster as dg
import pytest

from maestro_pipelines.backup import LIVE
from maestro_pipelines.backup.journal import read_journals
from maestro_pipelines.resources import AlertResource, ObjectStoreResource
from maestro_pipelines.sensors.backups import rpo_breach_sensor
from tests.backup.conftest import REPO_ROOT, child_environment, store_spec, wait_until
from tests.restore.conftest import database_names
from tests.test_cli import run_maestro
from tests.webhook import webhook_receiver

# (the journal write the child stops at, before or after it), databases swapped by then
POINTS = {
    "before-the-journal": ((0, "before"), 0),
    "journal-written": ((0, "after"), 0),
    "platform-started": ((1, "after"), 0),
    "platform-renamed": ((2, "before"), 1),
    "platform-done": ((2, "after"), 1),
    "mlflow-renamed": ((4, "before"), 2),
    "dagster-renamed": ((6, "before"), 3),
    "all-done": ((6, "after"), 3),
}


def label(dbs, database: str) -> str:
    return dbs.scalar(database, "SELECT label FROM restore_label")


def labels(inst) -> dict[str, str]:
    return {name: label(inst.dbs, name) for name in inst.names}


def cli_env(inst, case, tmp_path) -> dict[str, str]:
    server = inst.dbs.server
    return {"MAESTRO_HOME": str(tmp_path / "home"), "MAESTRO_STORE_URL": case.root.as_uri(),
            "MAESTRO_DATABASE_URL": server.libpq_url(inst.platform),
            "MAESTRO_DAGSTER_DATABASE_URL": server.libpq_url(inst.dagster)}


def kill_in_swap(inst, case, backup_id: str, pause_at, tmp_path, recover: str | None = None) -> None:
    """Run a live restore (or with `recover` its finish or undo) in a child process and
    SIGKILL it where it stopped."""
    config = tmp_path / "restore.json"
    config.write_text(json.dumps({
        "store": store_spec(case),
        "destinations": [{"role": d.role, "url": d.url.render_as_string(hide_password=False), "source": d.source}
                         for d in inst.destinations()],
        "backup_id": backup_id, "target": LIVE, "confirm": inst.platform, "pause_at": list(pause_at),
        "recover": recover,
    }))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.restore.child", str(config)], cwd=REPO_ROOT, env=child_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in child.stdout), daemon=True)
    reader.start()
    try:
        wait_until("the pause in the swap", lambda: any(line.startswith("PAUSED") for line in lines), child,
                   running="restore")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        reader.join()
        child.stderr.close()


def assert_reported(inst, case, env, backup_id: str, swapped: int) -> None:
    """What the next commands say about the half-done swap."""
    [journal] = read_journals(case.store)
    steps = journal.steps
    status = run_maestro("restore", "status", env=env)
    assert status.returncode == 1 and "HALF-DONE RESTORE" in status.stderr, status.stderr
    said = " ".join(status.stderr.split())
    for i, step in enumerate(steps):
        state = f"from backup {backup_id}" if i < swapped else "as it was before the restore"
        assert f"{step.role} ({step.live} at " in said and f"{step.live} at {step.where}): {state}" in said, said
    assert f"maestro restore finish --confirm {inst.platform}" in said
    assert f"maestro restore undo --confirm {inst.platform}" in said

    listed = run_maestro("backup", "list", env=env)
    assert listed.returncode == 0 and "HALF-DONE RESTORE" in listed.stderr and backup_id in listed.stderr

    cleanup = run_maestro("restore", "cleanup", env=env)  # not a dry run: it must still keep them
    assert cleanup.returncode == 0 and "HALF-DONE RESTORE" in cleanup.stderr, cleanup.stderr
    needed = {s.restored for s in steps[swapped:]} | {s.kept for s in steps[:swapped] if s.live_existed}
    for name in needed:
        assert "a half-done live restore needs it" in next(
            line for line in cleanup.stdout.splitlines() if f" {name} (" in line)
    assert needed <= set(database_names(inst.dbs, inst.platform)), "cleanup dropped what the swap needs"

    again = run_maestro("restore", "--backup", backup_id, "--target", "live", "--confirm", inst.platform, env=env)
    assert again.returncode == 1 and "stopped half way" in again.stderr and "restore finish" in again.stderr

    with webhook_receiver("half-done-secret") as webhook:
        context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={
            "store": ObjectStoreResource(url=env["MAESTRO_STORE_URL"]),
            "alerts": AlertResource(webhook_url=webhook.url)})
        result = rpo_breach_sensor(context)
        [alert] = [text for text in webhook.texts() if "stopped half way" in text]
        assert backup_id in alert and "maestro restore finish" in alert
        context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=result.cursor, resources={
            "store": ObjectStoreResource(url=env["MAESTRO_STORE_URL"]),
            "alerts": AlertResource(webhook_url=webhook.url)})
        rpo_breach_sensor(context)
        assert len([text for text in webhook.texts() if "stopped half way" in text]) == 1, "alerted twice"


def labelled_backup(inst, case) -> str:
    """Label every database 'A', back them up, relabel them 'B': after a recovery each database
    says which side of the swap it is."""
    for name in inst.names:
        inst.dbs.execute(name, "CREATE TABLE restore_label (label text)", "INSERT INTO restore_label VALUES ('A')")
    backup_id = inst.backup(case.store).backup_id
    for name in inst.names:
        inst.dbs.execute(name, "UPDATE restore_label SET label = 'B'")
    return backup_id


@pytest.mark.parametrize("point", list(POINTS))
def test_a_live_restore_killed_in_its_swap_is_reported_then_undone_or_finished(
        point, pg18_installation, local_case, tmp_path):
    pause_at, swapped = POINTS[point]
    inst = pg18_installation
    backup_id = labelled_backup(inst, local_case)
    env = cli_env(inst, local_case, tmp_path)

    for recovery in ("undo", "finish"):
        kill_in_swap(inst, local_case, backup_id, pause_at, tmp_path)
        assert list(labels(inst).values()) == ["A"] * swapped + ["B"] * (len(inst.names) - swapped)
        if pause_at == (0, "before"):  # killed before the journal: nothing was renamed
            assert run_maestro("restore", "status", env=env).returncode == 0
            refused = run_maestro("restore", "finish", "--confirm", inst.platform, env=env)
            assert refused.returncode == 1 and "no half-done live restore" in refused.stderr
            return
        [journal] = read_journals(local_case.store)
        if recovery == "undo":
            assert_reported(inst, local_case, env, backup_id, swapped)

        done = run_maestro("restore", recovery, "--confirm", inst.platform, env=env)
        assert done.returncode == 0, done.stderr
        want, other = ("B", "A") if recovery == "undo" else ("A", "B")
        assert labels(inst) == {name: want for name in inst.names}, f"not every database is {want} after {recovery}"
        # Nothing lost: the other side of each swap is kept.
        for step in journal.steps:
            assert label(inst.dbs, step.restored if recovery == "undo" else step.kept) == other
        assert read_journals(local_case.store) == [], "the journal is still there: status would report it"


def test_a_finish_killed_in_its_swap_is_reported_and_undone(pg18_installation, local_case, tmp_path):
    """`finish` is journaled like the restore: killed after it renamed MLflow's database and
    before it marked it done (the platform swapped by the restore, Dagster's not yet), the
    swap is still reported half done, and `undo` puts every database back as before."""
    inst = pg18_installation
    backup_id = labelled_backup(inst, local_case)
    env = cli_env(inst, local_case, tmp_path)
    kill_in_swap(inst, local_case, backup_id, POINTS["platform-done"][0], tmp_path)
    kill_in_swap(inst, local_case, backup_id, (1, "before"), tmp_path, recover="finish")
    assert list(labels(inst).values()) == ["A", "A", "B"]

    status = run_maestro("restore", "status", env=env)
    assert status.returncode == 1 and "HALF-DONE RESTORE" in status.stderr
    [journal] = read_journals(local_case.store)
    assert journal.action == "finish" and [s.state for s in journal.steps] == ["done", "started", "pending"]
    # `backup info`, where on-call looks first, says it too: an error, and the way out.
    info = run_maestro("backup", "info", env=env)
    assert info.returncode == 2, info.stdout + info.stderr
    said = " ".join(info.stdout.split())
    assert f"error: half-done restore: the live restore of backup {backup_id} " in said
    assert "stopped half way" in said and "`maestro restore finish` or `maestro restore undo`" in said
    [half_done] = json.loads(run_maestro("backup", "info", "--json", env=env).stdout)["half_done_restores"]
    assert (half_done["backup_id"], half_done["stamp"]) == (backup_id, journal.stamp)
    done = run_maestro("restore", "undo", "--confirm", inst.platform, env=env)
    assert done.returncode == 0, done.stderr
    assert labels(inst) == {name: "B" for name in inst.names}
    assert [label(inst.dbs, step.restored) for step in journal.steps] == ["A", "A", "A"]
    assert read_journals(local_case.store) == []
    assert json.loads(run_maestro("backup", "info", "--json", env=env).stdout)["half_done_restores"] == []
