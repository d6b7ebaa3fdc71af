"""The code location loads in a real Dagster webserver, and the UI shows no secret."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).parent.parent
SECRET = "webserver-secret-9f3a"
STARTUP_DEADLINE_SECONDS = 180

LOCATION_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories { name assetNodes { assetKey { path } isPartitioned hasAssetChecks } }
          }
        }
      }
    }
  }
}
"""

RESOURCES_QUERY = """
query ($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList {
      results { name description configFields { name description } configuredValues { key value type } }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    assert SECRET not in raw, "a secret reached the UI"
    return json.loads(raw)["data"]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """`dagster-webserver -w workspace.yaml`, configured like production (URL from env)."""
    home = tmp_path_factory.mktemp("dagster_home")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MAESTRO_HOME": str(home / "maestro"),
        # Loading definitions never connects, so an unreachable server is fine here.
        "MAESTRO_DATABASE_URL": f"postgresql://maestro:{SECRET}@127.0.0.1:9/maestro",
        "MAESTRO_SOURCE_URL": f"postgresql://reader:{SECRET}@127.0.0.1:9/shop",
        "MLFLOW_TRACKING_URI": f"postgresql://mlflow:{SECRET}@127.0.0.1:9/mlflow",
        "MAESTRO_STORE_URL": "az://backups/maestro",
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=maestro;AccountKey={SECRET}",
    }
    log = (home / "webserver.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-webserver")), "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    try:
        while True:  # poll readiness: the server answers /server_info once it is up
            if process.poll() is not None:
                pytest.fail(f"webserver exited with {process.returncode}: {(home / 'webserver.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail("webserver did not answer within the deadline")
                time.sleep(0.25)
        yield port
    finally:
        # The webserver and the code server it started: its process group. An idle webserver
        # stops at once on SIGTERM; one still answering took over 30 s (seen under load), and
        # nothing after the module reads its instance.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a code server that outlived the webserver
        except ProcessLookupError:
            pass
        process.wait()
        log.close()


def test_code_location_loads_without_errors(webserver):
    data = _graphql(webserver, LOCATION_QUERY)
    assert data["workspaceOrError"]["__typename"] == "Workspace"
    entries = {e["name"]: e for e in data["workspaceOrError"]["locationEntries"]}
    location = entries["maestro"]
    assert location["loadStatus"] == "LOADED"
    loaded = location["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", loaded
    nodes = {n["assetKey"]["path"][0]: n for r in loaded["repositories"] for n in r["assetNodes"]}
    assert {"platform_schema", "training_data", "model_evaluation", "deployment", "batch_predictions"} <= nodes.keys()
    assert nodes["training_data"]["isPartitioned"] and not nodes["platform_schema"]["isPartitioned"]
    assert nodes["model_evaluation"]["hasAssetChecks"]


def test_resources_are_described_and_show_env_var_names_not_values(webserver):
    selector = {"repositoryLocationName": "maestro", "repositoryName": "__repository__"}
    data = _graphql(webserver, RESOURCES_QUERY, {"selector": selector})
    result = data["allTopLevelResourceDetailsOrError"]
    assert result["__typename"] == "ResourceDetailsList"
    resources = {r["name"]: r for r in result["results"]}
    platform_db = resources["platform_db"]
    assert platform_db["description"]
    assert all(f["description"] for f in platform_db["configFields"])
    values = {v["key"]: v for v in platform_db["configuredValues"]}
    assert values["database_url"] == {"key": "database_url", "value": "MAESTRO_DATABASE_URL", "type": "ENV_VAR"}
    for name, field, variable in (("source", "url", "MAESTRO_SOURCE_URL"), ("mlflow", "tracking_uri", "MLFLOW_TRACKING_URI")):
        configured = {v["key"]: v for v in resources[name]["configuredValues"]}
        assert configured[field] == {"key": field, "value": variable, "type": "ENV_VAR"}
        assert all(f["description"] for f in resources[name]["configFields"])


LAUNCHPAD_QUERY = """
query ($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) {
    __typename ... on RunConfigSchema { rootDefaultYaml }
  }
}
"""


@pytest.mark.parametrize("job", [
    "restore_database", "restore_cleanup_job", "dr_drill_job", "nightly_backup", "rollback_deployment",
    "verify_backup_job", "train_and_deploy",
])
def test_launchpad_prefills_env_var_names_never_a_masked_placeholder(webserver, job):
    """What the Launchpad pre-fills is launched as it is: a deployment's URL must come in as
    `{env: NAME}` (read by the run), never as the literal '********' Dagster puts in place of a
    secret field's default, which the run then took for the URL."""
    selector = {"repositoryLocationName": "maestro", "repositoryName": "__repository__", "pipelineName": job}
    result = _graphql(webserver, LAUNCHPAD_QUERY, {"selector": selector})["runConfigSchemaOrError"]
    assert result["__typename"] == "RunConfigSchema", result
    prefilled = result["rootDefaultYaml"]
    assert "********" not in prefilled, prefilled
    bound = {"platform_db:": "env: MAESTRO_DATABASE_URL", "store:": "env: AZURE_STORAGE_CONNECTION_STRING"}
    used = [resource for resource in bound if f"  {resource}" in prefilled]
    assert used, prefilled
    for resource in used:
        assert bound[resource] in prefilled, prefilled


def test_a_plain_credential_in_a_resource_is_refused_before_the_ui_could_show_it():
    """Credential fields are not marked for Dagster's masking (it breaks the Launchpad), so a
    plain value would be shown as it is: the deployment's resources accept only dg.EnvVar."""
    import dagster as dg

    from maestro_pipelines.errors import MaestroError
    from maestro_pipelines.resources import PlatformDatabase
    from maestro_pipelines.resources.secret_fields import check_secrets_by_name

    check_secrets_by_name("platform_db", PlatformDatabase(database_url=dg.EnvVar("MAESTRO_DATABASE_URL")))
    check_secrets_by_name("platform_db", PlatformDatabase())
    with pytest.raises(MaestroError, match="platform_db: database_url holds a plain value") as refused:
        check_secrets_by_name("platform_db", PlatformDatabase(database_url=f"postgresql://u:{SECRET}@h/db"))
    assert SECRET not in str(refused.value)
