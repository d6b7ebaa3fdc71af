"""A database restarting or failing over is retried, a wrong setting is not.

Refused connections and servers that are starting up come out of `translate_error` as
`TransientError`; under `fail_fast_on_user_errors` a Dagster step retries those under its
RetryPolicy and fails at once on any other MaestroError. The failover here is a real refused
connection (a port nothing listens on) on the first attempt and the real server on the
second: what a step sees when the primary is replaced between its retries."""

from __future__ import annotations

import dagster as dg
import pytest

from maestro_pipelines.errors import TransientError
from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.platform_db.connection import check_server
from maestro_pipelines.platform_db.urls import parse_postgres_url
from tests.services import free_port


def run_op(urls: list[str]) -> dg.ExecuteInProcessResult:
    """One op that checks the server at urls[attempt]; retried up to len(urls) - 1 times."""

    @dg.op(retry_policy=dg.RetryPolicy(max_retries=len(urls) - 1, delay=0))
    @fail_fast_on_user_errors
    def server_version(context) -> int:
        return check_server(parse_postgres_url(urls[context.retry_number], "MAESTRO_DATABASE_URL"), "MAESTRO_DATABASE_URL")

    @dg.job
    def probe():
        server_version()

    return probe.execute_in_process(raise_on_error=False)


def retries(result) -> int:
    return sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def test_a_refused_connection_is_retried_and_the_step_succeeds_once_the_server_is_back(pg18):
    down = f"postgresql://maestro:pw@127.0.0.1:{free_port()}/maestro"
    with pytest.raises(TransientError, match="nothing accepts connections"):
        check_server(parse_postgres_url(down, "MAESTRO_DATABASE_URL"), "MAESTRO_DATABASE_URL")

    result = run_op([down, pg18.libpq_url("postgres")])

    assert result.success and retries(result) == 1
    assert result.output_for_node("server_version") >= 180000


def test_a_wrong_password_fails_at_once_with_its_reason(pg15):
    """Debian's PostgreSQL 15 checks passwords on its TCP port (the embedded server trusts its
    socket): a wrong one is not transient, so the step is not retried."""
    wrong = pg15.admin_url.set(drivername="postgresql", password="certainly-wrong", database="postgres")
    url = wrong.render_as_string(hide_password=False)

    result = run_op([url, url, url])

    assert not result.success and retries(result) == 0
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "password authentication failed" in failure.event_specific_data.error.message
    assert "certainly-wrong" not in failure.event_specific_data.error.message
