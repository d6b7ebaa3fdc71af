"""dr_drill materialized in process: a real scratch restore of the embedded PostgreSQL's
databases, RTO/RPO checks, the chart of the last drills, alerts to a webhook on 127.0.0.1."""

from __future__ import annotations

import base64
import os

import dagster as dg

from maestro_pipelines.assets.drills import RPO_CHECK, RTO_CHECK, dr_drill
from maestro_pipelines.resources import AlertResource
from maestro_pipelines.sensors.backups import backup_failure_alert_sensor

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


def test_a_drill_proves_the_backup_and_a_missed_rto_alerts(drill_env, webhook):
    backup = drill_env.take_backup()
    alerts = AlertResource(webhook_url=webhook.url)

    result = drill_env.run("dr_drill_job", alerts=alerts)
    assert result.success, step_failures(result)
    assert result.dagster_run.tags["maestro/kind"] == "drill"
    (materialization,) = result.asset_materializations_for_node("dr_drill")
    metadata = materialization.metadata
    assert metadata["ok"].value is True and metadata["backup_id"].value == backup.backup_id
    assert 0 < metadata["rto_s"].value < 15 * 60 and metadata["rto_target_s"].value == 900
    assert 0 <= metadata["rpo_h"].value < 0.1 and metadata["rpo_target_h"].value == 26
    assert metadata["indexes_checked"].value > 0, "amcheck ran on the restored btree indexes"
    assert metadata["aliases_resolved"].value == 1, "the restored registry resolves acme-churn@production"
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
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR and "target 0 s" in evaluation.description
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
