"""Backup sensors evaluated against a real store, a real Dagster instance and a webhook
receiver on 127.0.0.1: one alert per RPO breach, alerts on failed backup runs, one
verification run per new backup."""

from __future__ import annotations

import json
from datetime import timedelta
from unittest import mock

import dagster as dg
import pytest

from maestro_pipelines.resources import AlertResource, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.sensors import backups as backup_sensors
from maestro_pipelines.sensors.backups import (
    RPO_TARGET,
    backup_failure_alert_sensor,
    rpo_breach_sensor,
    verify_new_backup_sensor,
)

from .conftest import WEBHOOK_SECRET
from .test_assets import checks_of, step_failures


def evaluate_rpo(env, alerts, now, cursor=None, store=None):
    context = dg.build_sensor_context(
        instance=env.instance, cursor=cursor, resources={"store": store or env.resources["store"], "alerts": alerts}
    )
    with mock.patch.object(backup_sensors, "_now", return_value=now):
        result = rpo_breach_sensor(context)
    assert isinstance(result, dg.SensorResult) and not result.run_requests
    return result


def test_rpo_breach_alerts_once_per_breach(backup_env, webhook, capsys):
    alerts = AlertResource(webhook_url=webhook.url)
    first = backup_env.take_backup()
    taken_at = first.snapshot_at

    fresh = evaluate_rpo(backup_env, alerts, taken_at + timedelta(hours=1))
    assert "old (target 26.0 h)" in fresh.skip_reason.skip_message and webhook.posts == []

    breached = evaluate_rpo(backup_env, alerts, taken_at + RPO_TARGET + timedelta(hours=1), fresh.cursor)
    assert len(webhook.posts) == 1
    (alert,) = webhook.posts
    assert alert["text"].startswith(":fire: [CRITICAL] RPO breached: latest verified backup is 27.0 h old")
    assert first.backup_id in alert["text"] and alert["blocks"][0]["type"] == "header"

    still = evaluate_rpo(backup_env, alerts, taken_at + RPO_TARGET + timedelta(hours=2), breached.cursor)
    assert len(webhook.posts) == 1, "no second alert while the same breach lasts"
    assert "no new alert until it recovers" in still.skip_reason.skip_message

    # Recovery: a new verified backup (started a minute later: ids have one-second resolution).
    second = backup_env.take_backup(at=first.started_at + timedelta(minutes=1))
    recovered = evaluate_rpo(backup_env, alerts, second.snapshot_at + timedelta(hours=1), still.cursor)
    assert len(webhook.posts) == 1 and json.loads(recovered.cursor)["status"] == "ok"

    evaluate_rpo(backup_env, alerts, second.snapshot_at + RPO_TARGET + timedelta(minutes=1), recovered.cursor)
    assert len(webhook.posts) == 2, "a new breach after recovery alerts again"
    assert second.backup_id in webhook.posts[1]["text"]

    # The webhook's token (its credential) is in the URL only: never in a payload or a log line.
    assert WEBHOOK_SECRET.encode() not in b"".join(webhook.raw)
    logged = capsys.readouterr().err
    assert "Alert posted to the webhook" in logged and WEBHOOK_SECRET not in logged


def test_rpo_alerts_when_there_is_no_verified_backup_or_the_store_cannot_be_read(backup_env, webhook, tmp_path):
    from datetime import datetime, timezone

    alerts = AlertResource(webhook_url=webhook.url)
    now = datetime.now(timezone.utc)
    empty = evaluate_rpo(backup_env, alerts, now)
    assert webhook.posts[-1]["text"].startswith(":fire: [CRITICAL] RPO breached: no verified backup")
    evaluate_rpo(backup_env, alerts, now, empty.cursor)
    assert len(webhook.posts) == 1

    missing = ObjectStoreResource(url=(tmp_path / "no-such-store").as_uri())
    unreadable = evaluate_rpo(backup_env, alerts, now, empty.cursor, store=missing)
    assert len(webhook.posts) == 2 and "Backup store unreadable" in webhook.posts[-1]["text"]
    evaluate_rpo(backup_env, alerts, now, unreadable.cursor, store=missing)
    assert len(webhook.posts) == 2


def test_an_alert_the_webhook_refused_is_tried_again(backup_env, webhook, capsys):
    from datetime import datetime, timezone

    webhook.status = 500
    alerts = AlertResource(webhook_url=webhook.url, attempts=2)
    now = datetime.now(timezone.utc)
    failed = evaluate_rpo(backup_env, alerts, now)
    assert len(webhook.raw) == 2, "two tries"
    assert "webhook failed" in failed.skip_reason.skip_message and failed.cursor is None
    logged = capsys.readouterr().err  # context.log: Dagster's handler writes to stderr
    assert "The alert webhook failed (HTTP 500 after 2 tries)" in logged
    assert "ALERT [critical] RPO breached" in logged and WEBHOOK_SECRET not in logged

    webhook.status = 200
    evaluate_rpo(backup_env, alerts, now, failed.cursor)
    assert len(webhook.posts) == 1


def failure_context(env, result, alerts):
    return dg.build_run_status_sensor_context(
        sensor_name="backup_failure_alert_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=env.instance,
        dagster_run=result.dagster_run,
        resources={"alerts": alerts},
    ).for_run_failure()


def test_a_failed_backup_run_alerts_with_run_id_job_and_error_and_no_secret(backup_env, webhook):
    # A host that does not resolve fails at once (a refused connection would be retried as
    # transient, minutes later).
    unreachable = PlatformDatabase(database_url="postgresql://maestro:hunter2-Secret@no-such-host.invalid:5432/maestro")
    result = backup_env.run("nightly_backup", platform_db=unreachable)
    assert not result.success
    assert "cannot be resolved" in step_failures(result)[0]

    alerts = AlertResource(webhook_url=webhook.url)
    backup_failure_alert_sensor(failure_context(backup_env, result, alerts))
    (alert,) = webhook.posts
    text = alert["text"]
    assert text.startswith(":rotating_light: [ERROR] Maestro backup run failed: nightly_backup")
    assert result.run_id in text
    assert "Error: database_backup: MAESTRO_DATABASE_URL: the host 'no-such-host.invalid' cannot be resolved" in text
    sent = b"".join(webhook.raw)
    assert b"hunter2" not in sent and WEBHOOK_SECRET.encode() not in sent


def test_a_backup_materialized_from_the_ui_alerts_too_but_other_runs_do_not(backup_env, webhook):
    from maestro_pipelines.assets.backups import database_backup

    alerts = AlertResource(webhook_url=webhook.url)
    # "Materialize" in the UI: an ad hoc asset run, without the job's tags.
    unreachable = PlatformDatabase(database_url="postgresql://maestro:pw@no-such-host.invalid:5432/maestro")
    ad_hoc = dg.materialize(
        [database_backup], instance=backup_env.instance,
        resources={**backup_env.resources, "platform_db": unreachable}, raise_on_error=False,
    )
    assert not ad_hoc.success and "maestro/kind" not in ad_hoc.dagster_run.tags
    backup_failure_alert_sensor(failure_context(backup_env, ad_hoc, alerts))
    assert len(webhook.posts) == 1 and "cannot be resolved" in webhook.posts[0]["text"]

    @dg.op
    def boom():
        raise RuntimeError("not a backup")

    @dg.job(tags={"maestro/kind": "training"})
    def training_like():
        boom()

    other = training_like.execute_in_process(instance=backup_env.instance, raise_on_error=False)
    skipped = backup_failure_alert_sensor(failure_context(backup_env, other, alerts))
    assert isinstance(skipped, dg.SkipReason) and len(webhook.posts) == 1


def test_verify_sensor_requests_one_verification_per_new_backup(backup_env):
    store = backup_env.resources["store"]

    def evaluate(cursor=None):
        context = dg.build_sensor_context(instance=backup_env.instance, cursor=cursor, resources={"store": store})
        return verify_new_backup_sensor(context)

    backup_env.take_backup()  # verified when taken (as database_backup does)
    by_cli = backup_env.take_backup(verify=False)  # as `maestro backup run` leaves it
    first = evaluate()
    (request,) = first.run_requests
    assert request.run_key == by_cli.backup_id
    assert request.run_config == {"ops": {"verify_stored_backup": {"config": {"backup_id": by_cli.backup_id}}}}

    again = evaluate(first.cursor)
    assert not again.run_requests and "No new unverified backup" in again.skip_reason.skip_message

    # The requested run verifies it, recorded as database_backup's check `verified`.
    assert backup_env.run("verify_backup_job", run_config=request.run_config).success
    (check,) = checks_of(backup_env.instance)
    assert check.passed and check.metadata["backup_id"].value == by_cli.backup_id
    later = backup_env.take_backup(verify=False)
    (next_request,) = evaluate(again.cursor).run_requests
    assert next_request.run_key == later.backup_id
