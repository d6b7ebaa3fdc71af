"""dr_drill materialized in process: a real scratch restore of the embedded PostgreSQL's
databases, RTO/RPO checks, the chart of the last drills, alerts to a webhook on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.assets.drills import RPO_CHECK, RTO_CHECK, dr_drill, rto_chart_png
from maestro_pipelines.backup.drill_history import DrillRecord, list_drills, new_drill_id
from maestro_pipelines.formatting import human_duration
from maestro_pipelines.resources import AlertResource
from maestro_pipelines.sensors.backups import backup_failure_alert_sensor

from ..test_cli import run_maestro
from .conftest import WEBHOOK_SECRET
from .test_restore import step_failures

PNG_PREFIX = "![RTO of the last drills](data:image/png;base64,"


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def chart_png(metadata) -> bytes:
    markdown = metadata["rto_history"].value
    assert markdown.startswith(PNG_PREFIX) and markdown.endswith(")")
    png = base64.b64decode(markdown[len(PNG_PREFIX):-1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return png


def history_rows(metadata) -> list[list[str]]:
    """The cells of the `drill_history` markdown table, newest drill first."""
    lines = metadata["drill_history"].value.splitlines()
    assert lines[0] == "| started (UTC) | ran from | result | RTO | RPO | backup |"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_drill_history_has_the_cli_drills_a_new_dagster_instance_never_saw(drill_env, tmp_path):
    """`maestro drill` (its own process, no Dagster) then dr_drill in a Dagster instance that
    has never seen a drill: the materialization's history table and RTO chart show both,
    read from the store, and Dagster's plots get the numeric rto_s and rpo_h."""
    backup = drill_env.take_backup()
    env = {"MAESTRO_HOME": str(tmp_path / "cli-home"), "MAESTRO_DATABASE_URL": drill_env.databases.platform_url,
           "MAESTRO_STORE_URL": drill_env.store_dir.as_uri()}
    cli = run_maestro("drill", "--json", env=env)
    assert cli.returncode == 0, cli.stderr
    cli_report = json.loads(cli.stdout)

    result = drill_env.run("dr_drill_job")
    assert result.success, step_failures(result)
    (materialization,) = result.asset_materializations_for_node("dr_drill")
    metadata = materialization.metadata
    rows = history_rows(metadata)
    assert [row[1] for row in rows] == [f"[dagster run {result.run_id[:8]}](/runs/{result.run_id})", "cli"]
    assert [row[5] for row in rows] == [backup.backup_id] * 2 and [row[2] for row in rows] == ["ok", "ok"]
    assert rows[1][3] == human_duration(cli_report["rto_s"])  # as the CLI says it
    chart_png(metadata)
    assert isinstance(metadata["rto_s"].value, float) and isinstance(metadata["rpo_h"].value, float)
    records = list_drills(drill_env.store()).records
    assert [(r.source, r.run_id) for r in records] == [("cli", None), ("dagster", result.run_id)]
    assert records[0].key == cli_report["record_key"]


def drill_at(hours_ago: float, source: str, rto_s: float | None, ok: bool = True) -> DrillRecord:
    started = datetime(2026, 11, 29, 12, tzinfo=timezone.utc) - timedelta(hours=hours_ago)
    return DrillRecord(new_drill_id(started), source, started, ok, 900.0, 93600.0, rto_s=rto_s)


def test_the_rto_chart_axis_fits_the_drills_not_a_far_target():
    """RTOs of 8 s against the default 900 s target: the axis goes a little above the largest
    RTO (the bars are readable) and the target is written, not drawn; a target within reach
    is drawn as a line on the axis. A failed drill without an RTO does not stretch it."""
    drills = [drill_at(3, "cli", 8.0), drill_at(2, "dagster", 9.0), drill_at(1, "dagster", None, ok=False)]

    far = rto_chart_png(drills, 900.0)
    assert far.png.startswith(b"\x89PNG") and not far.target_drawn
    assert far.ylim[0] == 0 and 9.0 < far.ylim[1] <= 12.0

    near = rto_chart_png(drills, 20.0)
    assert near.target_drawn and 20.0 < near.ylim[1] <= 25.0


def test_a_drill_proves_the_backup_and_a_missed_rto_alerts(drill_env, webhook):
    backup = drill_env.take_backup()
    alerts = AlertResource(webhook_url=webhook.url)

    result = drill_env.run("dr_drill_job", alerts=alerts)
    assert result.success, step_failures(result)
    assert result.dagster_run.tags["maestro/kind"] == "drill"
    (materialization,) = result.asset_materializations_for_node("dr_drill")
    metadata = materialization.metadata
    assert metadata["ok"].value is True and metadata["backup_id"].value == backup.backup_id
    # Measured values are numbers (Dagster plots them); targets and counts are text (a target
    # plotted is a flat line, a count of 1 gets fractional ticks).
    assert 0 < metadata["rto_s"].value < 15 * 60 and metadata["rto_target"].value == "15 min"
    assert 0 <= metadata["rpo_h"].value < 0.1 and metadata["rpo_target"].value == "26 h"
    plotted = {key for key, value in metadata.items() if isinstance(value, (dg.FloatMetadataValue, dg.IntMetadataValue))}
    assert plotted == {"rto_s", "rpo_h"}, plotted
    assert int(metadata["indexes_checked"].value.split()[0]) > 0, "amcheck ran on the restored btree indexes"
    assert metadata["aliases_resolved"].value == "1 production alias", "the restored registry resolves acme-churn@production"
    assert metadata["problems"].value == "none"
    steps = {row.data["step"] for row in metadata["steps"].value.records}
    assert {"pg_restore platform", "verify mlflow", "amcheck platform", "mlflow registry smoke test",
            "drop scratch databases"} <= steps
    assert {row.data["role"] for row in metadata["databases"].value.records} == {"platform", "mlflow"}
    first_chart = chart_png(metadata)
    assert checks(result) == {RTO_CHECK: True, RPO_CHECK: True}
    assert webhook.posts == [], "a drill that met its targets does not alert"
    assert drill_env.leftovers() == [], "the scratch databases are dropped"

    # The same drill against a target no restore can meet.
    missed = drill_env.run("dr_drill_job", {"rto_target_minutes": 0.0001}, alerts=alerts)
    assert missed.success, "a missed target is a failed check, not a failed run"
    assert checks(missed) == {RTO_CHECK: False, RPO_CHECK: True}
    (evaluation,) = [e for e in missed.get_asset_check_evaluations() if e.check_name == RTO_CHECK]
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR and "target 0.0 s" in evaluation.description
    (alert,) = webhook.posts
    assert alert["text"].startswith(":rotating_light: [ERROR] Maestro DR drill missed its RTO target")
    assert missed.run_id in alert["text"] and backup.backup_id in alert["text"]
    assert "is over the target of 0 s" in alert["text"]
    (second,) = missed.asset_materializations_for_node("dr_drill")
    assert "RTO" in second.metadata["problems"].value
    # The chart now reads both drills from the instance.
    assert chart_png(second.metadata) != first_chart
    records = drill_env.instance.fetch_materializations(dr_drill.key, limit=10).records
    assert len(records) == 2
    assert WEBHOOK_SECRET.encode() not in b"".join(webhook.raw)


def failure_context(env, result, alerts):
    return dg.build_run_status_sensor_context(
        sensor_name="backup_failure_alert_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=env.instance,
        dagster_run=result.dagster_run,
        resources={"alerts": alerts},
    ).for_run_failure()


def test_a_drill_on_a_damaged_backup_fails_alerts_and_leaves_nothing_behind(drill_env, webhook):
    alerts = AlertResource(webhook_url=webhook.url)
    # No backup at all: nothing to drill with.
    empty = drill_env.run("dr_drill_job", alerts=alerts)
    assert not empty.success
    assert "DR drill failed: There is no verified backup in the store" in step_failures(empty)[0]
    assert webhook.texts()[-1].startswith(":rotating_light: [ERROR] Maestro DR drill failed\nRun id: ")
    assert "There is no verified backup in the store" in webhook.texts()[-1]

    backup = drill_env.take_backup()
    dump = backup.database("platform")
    path = drill_env.store_dir / "backups" / backup.backup_id / dump.key.rsplit("/", 1)[-1]
    written = path.stat()
    with open(path, "r+b") as f:  # bit rot: one byte changed in place, the store's record kept
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))  # and the mtime: only reading shows it

    result = drill_env.run("dr_drill_job", alerts=alerts)
    assert not result.success
    (message,) = step_failures(result)
    assert message.startswith(f"DR drill failed with backup {backup.backup_id}: ") and "is damaged" in message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert result.asset_materializations_for_node("dr_drill") == []
    (observation,) = result.asset_observations_for_node("dr_drill")
    assert observation.metadata["ok"].value is False and "is damaged" in observation.metadata["problems"].value
    assert "rto_s" not in observation.metadata, "no RTO for a restore that did not finish"
    # Both failed drills are in the history, newest first, with why they failed.
    rows = history_rows(observation.metadata)
    assert [row[1] for row in rows] == [f"[dagster run {run.run_id[:8]}](/runs/{run.run_id})" for run in (result, empty)]
    assert rows[0][2].startswith("FAILED: ") and "is damaged" in rows[0][2]
    assert rows[1][2].startswith("FAILED: There is no verified backup in the store")
    assert [r.ok for r in list_drills(drill_env.store()).records] == [False, False]
    drill_alert = webhook.texts()[-1]
    assert drill_alert.startswith(f":rotating_light: [ERROR] Maestro DR drill failed: backup {backup.backup_id}")
    assert "is damaged" in drill_alert and result.run_id in drill_alert
    assert drill_env.leftovers() == [], "a failed restore drops what it created"

    # The run failure alert sensor reports the failed drill run too (tagged maestro/kind: drill).
    backup_failure_alert_sensor(failure_context(drill_env, result, alerts))
    run_alert = webhook.texts()[-1]
    assert run_alert.startswith(":rotating_light: [ERROR] Maestro drill run failed: dr_drill_job")
    assert "Error: dr_drill: DR drill failed with backup" in run_alert
    assert len(webhook.posts) == 3
