"""The physical tier in Dagster as on-call meets it: `dagster asset materialize` of
base_backup and then of pitr_drill (each step in a process of its own, as the UI and the
daemon run them) against the embedded server that `maestro db start` left archiving; and
wal_rpo_sensor's view of that server. The server's archive_timeout is lowered the way a user
tightens the RPO (ALTER SYSTEM: Maestro keeps a value the user chose), so the drill waits
seconds for its markers' WAL rather than a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster._core.instance.ref import InstanceRef

from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
from maestro_pipelines.sensors.wal import ALERT_GRACE, server_wal_state
from maestro_pipelines.objectives import PITR_RPO_TARGET
from tests.pitr.conftest import archiver_knows, maestro, switch_wal, wait_for

DAGSTER = str(Path(sys.executable).with_name("dagster"))
pytestmark = pytest.mark.xdist_group("pitr-graph")  # its tests share one archiving server


def _materialize(env: dict, asset: str) -> str:
    done = subprocess.run([DAGSTER, "asset", "materialize", "-m", "maestro_pipelines.definitions", "--select", asset],
                          env=env, cwd=env["DAGSTER_HOME"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"materialize {asset} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stderr


def _env(archiving_home, tmp_path: Path) -> dict:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}
    return {**clean, "MAESTRO_HOME": str(archiving_home.home), "DAGSTER_HOME": str(dagster_home)}


def test_base_backup_and_the_pitr_drill_materialize_and_prove_the_archive(archiving_home, tmp_path):
    with psycopg.connect(archiving_home.socket_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET archive_timeout = '2s'")
        conn.execute("SELECT pg_reload_conf()")
    maestro("db", "upgrade", env=archiving_home.env)
    env = _env(archiving_home, tmp_path)
    _materialize(env, "base_backup")
    logs = _materialize(env, "pitr_drill")
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"]))

    base = instance.get_latest_materialization_event(dg.AssetKey("base_backup")).asset_materialization.metadata
    assert base["servers_without_archiving"].value == 0
    assert base["encryption"].value == "not encrypted (no backup key configured; local store)"
    assert "any point from" in base["recovery_window"].value and "GAP" not in base["recovery_window"].value
    drill = instance.get_latest_materialization_event(dg.AssetKey("pitr_drill")).asset_materialization.metadata
    assert drill["ok"].value is True, drill
    assert 0 < drill["rpo_s"].value <= PITR_RPO_TARGET.total_seconds()
    assert drill["rto_s"].value > 0 and drill["reached_lsn"].value
    # The last transaction replayed is the first marker's: after its insert, before the target.
    assert drill["marker_at"].value <= drill["reached_time"].value <= drill["target_time"].value
    for check in ("pitr_rto_within_target", "pitr_rpo_within_target"):
        record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("pitr_drill"), check))
        assert record is not None and record.event.asset_check_evaluation.passed, check
    assert int(drill["relations_checked"].value.split()[0]) > 0  # pg_amcheck ran on the recovered server
    assert "markers written" in logs

    # The markers stay on the live server (two per drill); the recovered copy held only the first.
    with psycopg.connect(archiving_home.socket_url.replace("dbname=postgres", "dbname=maestro_pitr_drill")) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT drill) FROM pitr_markers").fetchone() == (2, 1)


def test_wal_rpo_sensor_alerts_on_wal_that_waits_not_on_an_idle_server(archiving_home):
    home = EmbeddedPostgres(archiving_home.home)
    server = DatabaseTarget("platform", home.start().set(database="postgres"), "the embedded server")
    segment = switch_wal(archiving_home.socket_url)
    wait_for(f"{segment} in the store", lambda: archiving_home.store.exists(
        f"pitr/{_system_id(archiving_home)}/wal/{segment}.zst"))
    # Every segment the server archived is in the store: hours later, with nothing written that
    # PostgreSQL switches a segment for, nothing is at risk.
    idle = server_wal_state(server, archiving_home.store, utcnow() + timedelta(hours=3))
    assert idle["archiving"] and not idle["alert"], idle

    # The pusher gone: the server keeps archiving into the spool, the store falls behind.
    assert home.stop_pusher()
    try:
        behind = switch_wal(archiving_home.socket_url)
        wait_for(f"the server archiving {behind}", lambda: archiver_knows(archiving_home.socket_url, behind))
        assert not server_wal_state(server, archiving_home.store, utcnow())["alert"]  # within the target
        late = server_wal_state(server, archiving_home.store, utcnow() + PITR_RPO_TARGET + ALERT_GRACE + timedelta(minutes=1))
        assert late["alert"] and f"archived {behind}" in late["problem"] and "pusher" in late["problem"], late
    finally:
        home.ensure_pusher()
    wait_for(f"{behind} pushed once the pusher is back", lambda: archiving_home.store.exists(
        f"pitr/{_system_id(archiving_home)}/wal/{behind}.zst"))

    # An archive_timeout past the target: said at once, it is the RPO the server gives.
    with psycopg.connect(archiving_home.socket_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET archive_timeout = '1h'")
        conn.execute("SELECT pg_reload_conf()")
    slow = server_wal_state(server, archiving_home.store, utcnow())
    assert slow["alert"] and "archive_timeout is 3600 s" in slow["problem"], slow


def _system_id(archiving_home) -> str:
    with psycopg.connect(archiving_home.socket_url) as conn:
        return str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
