"""AlertResource: log always, POST to a Slack-compatible webhook when one is set, never raise,
never leak the webhook URL or a password."""

from __future__ import annotations

import logging

import dagster as dg
import pytest

from maestro_pipelines.environment import resources_for_environment
from maestro_pipelines.resources import AlertResource
from maestro_pipelines.resources.alerts import redact
from maestro_pipelines.settings import Settings

from tests.services import free_port

from .conftest import WEBHOOK_SECRET


def test_without_a_webhook_an_alert_is_logged_only(caplog):
    with caplog.at_level(logging.INFO, logger="maestro.alerts"):
        assert AlertResource().send("Backup failed", "pg_dump exited 1", "warning") is True
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == "ALERT [warning] Backup failed: pg_dump exited 1"


def test_an_alert_is_posted_as_slack_json(webhook, caplog):
    with caplog.at_level(logging.INFO, logger="maestro.alerts"):
        assert AlertResource(webhook_url=webhook.url).send("RPO breached", "newest backup is 30 h old", "critical")
    (payload,) = webhook.posts
    assert payload["text"] == ":fire: [CRITICAL] RPO breached\nnewest backup is 30 h old"
    assert payload["blocks"][1] == {"type": "section", "text": {"type": "mrkdwn", "text": "newest backup is 30 h old"}}
    assert WEBHOOK_SECRET not in caplog.text and "127.0.0.1" not in caplog.text


def test_an_unreachable_or_refusing_webhook_is_a_warning_never_an_exception(webhook, caplog):
    webhook.status = 404  # a revoked webhook: retrying cannot help
    alerts = AlertResource(webhook_url=webhook.url, attempts=3)
    with caplog.at_level(logging.INFO, logger="maestro.alerts"):
        assert alerts.send("t", "x") is False
        assert len(webhook.raw) == 1
        closed = AlertResource(
            webhook_url=f"http://127.0.0.1:{free_port()}/services/{WEBHOOK_SECRET}", attempts=1, timeout_seconds=2
        )
        assert closed.send("t", "x") is False
        assert AlertResource(webhook_url="not a url " + WEBHOOK_SECRET).send("t", "x") is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == "The alert webhook failed (HTTP 404 after 1 tries): the alert was logged only"
    assert warnings[1] == "The alert webhook failed (ConnectionRefusedError after 1 tries): the alert was logged only"
    assert "not an http(s) URL" in warnings[2]
    assert WEBHOOK_SECRET not in caplog.text


def test_passwords_and_configured_secrets_are_masked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENGbPxRfiCY")
    monkeypatch.setenv("MAESTRO_DATABASE_URL", "postgresql://maestro:pa55word@db.internal:5432/maestro")
    text = (
        "connect to postgresql://maestro:pa55word@db.internal:5432/maestro failed; "
        "key wJalrXUtnFEMIK7MDENGbPxRfiCY; mysql+pymysql://u:other-pw@h/db; AccountKey=abc123==;x pa55word"
    )
    masked = redact(text)
    for secret in ("pa55word", "wJalrXUtnFEMIK7MDENGbPxRfiCY", "other-pw", "abc123"):
        assert secret not in masked
    assert "mysql+pymysql://u:***@h/db" in masked and "AccountKey=***" in masked


def test_the_environment_passes_the_webhook_by_name(tmp_path):
    unset = resources_for_environment(Settings(home=tmp_path, database_url=None))["alerts"]
    assert isinstance(unset, AlertResource) and unset.webhook_url is None
    configured = resources_for_environment(
        Settings(home=tmp_path, database_url=None, alert_webhook=f"https://hooks.slack.com/services/{WEBHOOK_SECRET}")
    )["alerts"]
    assert isinstance(configured.webhook_url, dg.EnvVar) and configured.webhook_url == "MAESTRO_ALERT_WEBHOOK"
    assert WEBHOOK_SECRET not in repr(configured)


@pytest.mark.parametrize("field", list(AlertResource.model_fields))
def test_every_field_is_described(field):
    assert AlertResource.model_fields[field].description
