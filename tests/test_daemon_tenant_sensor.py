"""A new tenant's first steps with a real `dagster-daemon` on the embedded default: the tenant
sensor gives `maestro tenants add`'s tenant its partition and waits (its tick says how to load
rows, no run fails), then requests its first training once `maestro tenants load` ran."""

from __future__ import annotations

import subprocess

import dagster as dg
import pytest

from .backup.conftest import wait_until
from .test_cli import run_maestro
from .test_daemon_runs import user_setup  # noqa: F401 (the fixture)
from .test_production_instance import start_daemon, stop_daemon

DEADLINE_S = 180


def wait_for(what: str, condition, daemon: subprocess.Popen, log):
    return wait_until(what, condition, daemon, deadline_s=DEADLINE_S, running="dagster-daemon",
                      output=lambda: log.read_text()[-4000:], poll_s=0.5)


def latest_tick(instance: dg.DagsterInstance, name: str):
    for state in instance.all_instigator_state():
        if state.name == name:
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
            return ticks[0] if ticks else None
    return None


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S * 2 + 120)
def test_the_daemon_waits_for_a_new_tenants_rows_then_trains_it(user_setup, tmp_path):  # noqa: F811
    env = user_setup
    assert run_maestro("tenants", "add", "umbrella", env=env).returncode == 0
    rows = tmp_path / "umbrella.csv"
    rows.write_text("id,f1,f2,label\n" + "".join(f"k{i},{i},{(i * 7) % 11},{i % 2}\n" for i in range(80)))
    log = tmp_path / "daemon.log"
    # The instance's storage is created (and its schema stamped) before the daemon opens it:
    # two processes creating a new SQLite storage at once can stamp two alembic heads, and the
    # daemon then cannot load the code location.
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    daemon = start_daemon(env, log, cwd=env["MAESTRO_HOME"])
    try:
        reason = "tenant umbrella has no training rows yet: load them with `maestro tenants load umbrella FILE`"

        def waiting_tick():
            tick = latest_tick(instance, "tenant_partitions_sensor")
            return tick if tick is not None and tick.skip_reason == reason else None

        wait_for("tick saying umbrella has no rows", waiting_tick, daemon, log)
        assert "umbrella" in instance.get_dynamic_partitions("tenants")
        assert instance.get_runs() == [], "no training launched for a tenant without rows"

        loaded = run_maestro("tenants", "load", "umbrella", str(rows), env=env)
        assert loaded.returncode == 0, loaded.stderr
        (run,) = wait_for("first training of umbrella", lambda: instance.get_runs(), daemon, log)
        assert run.job_name == "train_and_deploy" and run.tags["dagster/partition"] == "umbrella"
        assert run.tags["maestro/trigger"] == "new-tenant"
    finally:
        stop_daemon(daemon)
        instance.dispose()
