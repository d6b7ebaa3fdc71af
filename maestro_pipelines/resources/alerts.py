"""`AlertResource`: alerts to a Slack-compatible incoming webhook (MAESTRO_ALERT_WEBHOOK).

Every alert is logged; with a webhook it is also POSTed as `{"text": ..., "blocks": [...]}`
(Slack, Mattermost, Rocket.Chat and Teams' Slack-compatible endpoints accept it). Delivery is
best effort: a webhook that fails is retried a few times, then logged as a warning, never
raised, because the alert must not turn the thing it reports on (a sensor tick, a run) into
a second failure. The webhook URL is a secret (it is the credential of a Slack webhook): it
is never logged, and text that looks like a password or a configured secret is masked before
an alert leaves the process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.resources.secret_fields import SECRET_FIELD

SEVERITIES = ("info", "warning", "error", "critical")
_EMOJI = {"info": ":information_source:", "warning": ":warning:", "error": ":rotating_light:", "critical": ":fire:"}
_LOG_LEVEL = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
MAX_TEXT = 2800  # Slack truncates a section's text at 3000 characters

# Environment variables whose values are secrets (or URLs that may carry one).
SECRET_VARIABLES = (
    "MAESTRO_ALERT_WEBHOOK",
    "MAESTRO_DATABASE_URL",
    "MAESTRO_DAGSTER_DATABASE_URL",
    "MAESTRO_SOURCE_URL",
    "MAESTRO_SOURCE_PASSWORD",
    "MAESTRO_REDIS_URL",
    "MLFLOW_TRACKING_URI",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "PGPASSWORD",
    "MAESTRO_BACKUP_KEY",
    "MAESTRO_BACKUP_OLD_KEYS",
)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)[^\s@/]+@")
_KEY_VALUE_SECRET = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|accountkey|access_key|sig|api_key)=([^&\s;,'\"]+)"
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with passwords in URLs, `password=`-style values, the given secrets and the
    values of the secret environment variables replaced by `***`."""
    values = [s for s in secrets if s]
    for variable in SECRET_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            values.append(value)
            password = _url_password(value)
            if password:
                values.append(password)
    for value in sorted(set(values), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _KEY_VALUE_SECRET.sub(r"\1=***", text)


def _url_password(value: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(value).password
    except ValueError:
        return None
    return unquote(password) if password else None


class AlertResource(dg.ConfigurableResource):
    """Where alerts go: always the log; also a Slack-compatible webhook when one is set."""

    webhook_url: Optional[str] = Field(
        default=None,
        description=(
            "Slack-compatible incoming-webhook URL, set from the MAESTRO_ALERT_WEBHOOK environment "
            "variable (the URL is the credential: it never shows in the UI or the logs). "
            "Empty: alerts are logged only."
        ),
        json_schema_extra=SECRET_FIELD,
    )
    timeout_seconds: float = Field(
        default=5.0, gt=0, le=30, description="Timeout of one POST to the webhook, in seconds."
    )
    attempts: int = Field(
        default=3, ge=1, le=5,
        description="Tries per alert on network errors, HTTP 429 and 5xx (1 s, then 2 s between them).",
    )

    def send(self, title: str, text: str, severity: str = "error",
             log: Optional[logging.Logger] = None) -> bool:
        """Log the alert and POST it to the webhook if one is set. Never raises.

        Returns whether the alert reached every configured destination: True when it was
        posted, or when no webhook is set (the log is then the destination); False when the
        webhook failed, so a caller that alerts once per incident can try again next time.
        """
        log = log or logging.getLogger("maestro.alerts")
        severity = severity if severity in SEVERITIES else "error"
        url = (self.webhook_url or "").strip()
        title = redact(title, (url,))
        text = redact(text, (url,))
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 1] + "…"
        log.log(_LOG_LEVEL[severity], f"ALERT [{severity}] {title}: {text}")
        if not url:
            return True
        if not url.lower().startswith(("https://", "http://")):
            log.warning("The alert webhook (MAESTRO_ALERT_WEBHOOK) is not an http(s) URL: the alert was logged only")
            return False
        payload = {
            "text": f"{_EMOJI[severity]} [{severity.upper()}] {title}\n{text}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": f"[{severity.upper()}] {title}"[:150]}},
                {"type": "section", "text": {"type": "mrkdwn", "text": text or "-"}},
            ],
        }
        problem = self._post(url, json.dumps(payload).encode())
        if problem is None:
            log.info("Alert posted to the webhook")
            return True
        log.warning(f"The alert webhook failed ({problem}): the alert was logged only")
        return False

    def _post(self, url: str, body: bytes) -> str | None:
        """POST with bounded retries; None on success, else what went wrong (never the URL)."""
        import urllib.error
        import urllib.request

        problem = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(float(2 ** (attempt - 1)))
            request = urllib.request.Request(
                url, data=body, method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "maestro-alerts"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    response.read(1024)
                return None
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} after {attempt + 1} tries"
                if exc.code != 429 and exc.code < 500:
                    return problem  # the webhook refuses this request: retrying will not help
            except urllib.error.URLError as exc:
                reason = exc.reason
                problem = f"{type(reason).__name__ if isinstance(reason, BaseException) else 'network error'} after {attempt + 1} tries"
            except (TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__} after {attempt + 1} tries"
            except Exception as exc:  # a malformed URL and the like: never let its text (the URL) out
                return f"{type(exc).__name__}"
        return problem
