"""The Dagster UI as on-call uses it, in a real browser.

Playwright drives Debian's Chromium (no `playwright install`) against `dagster dev` on a
loopback port, on the embedded default (nothing configured): the webserver, the daemon and
the run workers are separate processes, and each run's steps run in its run worker (the code
location's executor), as they do for a user. Screenshots of every step are saved (and copied to MAESTRO_TEST_UI_SHOTS,
default /tmp/ui-shots) so a person can look at what the test saw.

- Jobs -> restore_database -> Launchpad: the pre-filled config launches a scratch restore of
  the backup on-call typed, with no masked placeholder (`'********'`) standing in for a
  deployment's URL; the Launchpad shows `backup`, `target`, `confirm` and `before` with their
  descriptions.
- Lineage -> the `ml` group -> Materialize all -> one tenant's partition -> the run succeeds.
- Catalog -> deployment -> Partitions -> the tenant: the production version and the MLflow run
  id MLflow serves for it, with a link to the MLflow UI; its check result under the partition.
- The backup `maestro backup run` took before `dagster dev` started is in database_backup's
  history (the daemon's store_catalog_sensor records it), with its check `verified`.
- `maestro drill` in a terminal before `dagster dev` started: the sensor makes it a
  materialization of dr_drill (a point of its RTO plot); then dr_drill -> Materialize: the run
  succeeds and the asset's drill history (metadata) lists the CLI drill beside the Dagster
  one; the RTO chart is there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from maestro_pipelines.formatting import human_duration

from .services import REPO_ROOT, free_port, missing_service

# One worker runs both tests (scripts/test: -n 2 --dist loadgroup), so one `dagster dev` serves them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.xdist_group("ui_browser")]

CHROMIUM = Path("/usr/bin/chromium")
BIN = Path(sys.executable).parent
TENANT = "acme"
STARTUP_DEADLINE_S = 240
RESTORE_DEADLINE_S = 400
DRILL_DEADLINE_S = 400
ML_DEADLINE_S = 900  # 7 assets and their checks in one run worker, on 2 busy cores
UI_STEP_TIMEOUT_MS = 90_000  # one click or page under load
MASK = "********"

RUN_QUERY = """
query ($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status runConfigYaml } }
  logsForRun(runId: $runId) {
    __typename ... on EventConnection {
      events { __typename ... on MessageEvent { message level } ... on ExecutionStepFailureEvent { error { message } } }
    }
  }
}
"""
MATERIALIZATIONS_QUERY = """
query ($path: [String!]!, $partition: String!) {
  assetOrError(assetKey: {path: $path}) {
    __typename ... on Asset { assetMaterializations(partitions: [$partition]) { partition runId } }
  }
}
"""
TENANT_RUNS_QUERY = """
query ($partition: String!) {
  runsOrError(filter: {tags: [{key: "dagster/partition", value: $partition}]}) {
    __typename ... on Runs { results { runId } }
  }
}
"""
DRILL_RUNS_QUERY = """
{ runsOrError(limit: 20) { __typename ... on Runs { results { runId assetSelection { path } } } } }
"""
LOCATION_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("Playwright", "pip install playwright (in the dev extra; no `playwright install` needed)")
    if not CHROMIUM.exists():
        missing_service("Chromium", "apt-get install chromium (scripts/test installs it)")
    return sync_playwright


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{base}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


def _user_env(tmp: Path) -> dict[str, str]:
    """A user's shell on the embedded default: none of the other tests' MAESTRO_*/MLFLOW_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}
    dagster_home = tmp / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (tmp / "tmp").mkdir()
    return {**env, "TMPDIR": str(tmp / "tmp"), "DAGSTER_HOME": str(dagster_home), "MAESTRO_HOME": str(tmp / "maestro"),
            "MAESTRO_MLFLOW_UI_URL": "http://127.0.0.1:5000"}  # what `maestro mlflow ui` prints


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _prepare(env: dict[str, str]) -> tuple[str, dict]:
    """A demo tenant with its rows and its partition, then a backup of it and a drill of that
    backup, from the CLI before Dagster runs (on-call's terminal while the orchestrator is
    down): the backup's id and the drill's `--json` report. The daemon's store_catalog_sensor
    records both on its first tick, so no test waits a sensor interval for them."""
    seed = (
        "import dagster as dg\n"
        "from rich.console import Console\n"
        "from maestro_pipelines.demo_run import prepare_tenants\n"
        "from maestro_pipelines.settings import load_settings\n"
        f"prepare_tenants(load_settings(), [{TENANT!r}], Console(stderr=True))\n"
        "with dg.DagsterInstance.get() as instance:\n"
        f"    instance.add_dynamic_partitions('tenants', [{TENANT!r}])\n"
    )
    _run([sys.executable, "-c", seed], env)
    backup_id = json.loads(_run([str(BIN / "maestro"), "backup", "run", "--json"], env).stdout)["id"]
    return backup_id, json.loads(_run([str(BIN / "maestro"), "drill", "--json"], env).stdout)


def _wait_for_location(base: str, process: subprocess.Popen, log: Path) -> None:
    """Poll until the webserver answers and the code location is loaded."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            entries = _graphql(base, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
            if any(e["name"] == "maestro" and e["loadStatus"] == "LOADED" for e in entries):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dagster dev did not load the code location in {STARTUP_DEADLINE_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """dagster dev and its children (webserver, daemon, code server, runs): its process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # dagster dev's graceful stop took 30 s and more under load; nothing needs it after the module
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived the parent
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    """`dagster dev -h 127.0.0.1 -p PORT` from the repository, after a demo tenant and a backup."""
    sync_playwright = _sync_playwright()
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

    tmp = tmp_path_factory.mktemp("ui")
    env = _user_env(tmp)
    shots = tmp / "shots"
    shots.mkdir()
    log = tmp / "dagster-dev.log"
    base = f"http://127.0.0.1:{free_port()}"
    process = None
    try:
        backup_id, cli_drill = _prepare(env)
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", base.rsplit(":", 1)[1]],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait_for_location(base, process, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            try:
                yield {"base": base, "browser": browser, "backup_id": backup_id, "cli_drill": cli_drill, "shots": shots,
                       "log": log, "env": env}
            finally:
                browser.close()
    finally:
        if process is not None:
            _stop(process)
        EmbeddedPostgres(Path(env["MAESTRO_HOME"])).stop()  # started by the first Maestro process
        copy_to = Path(os.environ.get("MAESTRO_TEST_UI_SHOTS", "/tmp/ui-shots"))
        copy_to.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, copy_to / shot.name)
        for kept in (log, Path(env["MAESTRO_HOME"]) / "pgdata" / "log"):  # the logs, to read a failure afterwards
            if kept.is_file():
                shutil.copy(kept, copy_to / kept.name)


@pytest.fixture
def page(dagster_ui):
    context = dagster_ui["browser"].new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_STEP_TIMEOUT_MS)
    # Dagit's first visit shows a "Join the Dagster community" modal, whenever it likes.
    page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())
    yield page
    context.close()


def _shot(page, dagster_ui, name: str, ready=None) -> None:
    if ready is not None:  # a page that renders after the network went quiet
        ready.wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(dagster_ui["shots"] / f"{name}.png"))


def _nav(page, label: str):
    # Navigation links are named "<icon name> <label>" (e.g. "column_lineage Jobs").
    return page.get_by_role("navigation").get_by_role("link", name=re.compile(rf"(^|\s){label}$"))


def _run_events(page):
    return page.get_by_role("button", name=re.compile(r"Events$"))


def _wait_for_run_outcome(page, dagster_ui, run_id: str, deadline_s: float, name: str) -> str:
    """The run page's status tag once the run has ended; the run's errors when it did not succeed."""
    from playwright.sync_api import expect

    outcome = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(outcome).to_be_visible(timeout=deadline_s * 1000)
    _shot(page, dagster_ui, name)
    status = outcome.inner_text()
    if status != "Success":
        data = _graphql(dagster_ui["base"], RUN_QUERY, {"runId": run_id})
        events = data["logsForRun"].get("events", [])
        errors = [e["message"] for e in events if e.get("level") == "ERROR"]
        errors += [e["error"]["message"] for e in events if e.get("error")]
        pytest.fail(f"run {run_id} ended {status}:\n" + "\n".join(errors)[-3000:])
    return status


def _tenant_run_id(base: str) -> str:
    """The run launched for the tenant's partition (the only one of this instance)."""
    deadline = time.monotonic() + 60
    while True:
        data = _graphql(base, TENANT_RUNS_QUERY, {"partition": TENANT})
        runs = data["runsOrError"].get("results") or []
        if runs:
            assert len(runs) == 1, f"more than one run for {TENANT}: {runs}"
            return runs[0]["runId"]
        assert time.monotonic() < deadline, f"no run for the partition {TENANT} was launched"
        time.sleep(0.5)


def test_restore_database_launches_from_the_launchpad_into_scratch(page, dagster_ui):
    """On-call opens the Launchpad of restore_database, types the backup id over `latest`,
    launches, and the scratch restore succeeds; the pre-filled config names no secret."""
    from playwright.sync_api import expect

    from maestro_pipelines.jobs.restore import RestoreConfig

    backup_id = dagster_ui["backup_id"]
    page.goto(dagster_ui["base"] + "/")
    _shot(page, dagster_ui, "restore-01-overview")
    _nav(page, "Jobs").click()
    page.get_by_role("link", name=re.compile(r"\brestore_database\b")).click()
    page.get_by_role("tab", name="Launchpad").click()
    editor = page.locator(".CodeMirror", has_text="restore_from_backup")
    expect(editor).to_be_visible()
    prefilled = editor.evaluate("element => element.CodeMirror.getValue()")
    _shot(page, dagster_ui, "restore-02-launchpad-prefilled")

    # The help panel beside the editor documents the restore's fields where the cursor is.
    editor.get_by_text("backup", exact=True).click()
    help_panel = page.locator("code", has_text="confirm")
    expect(help_panel).to_be_visible()
    help_text = " ".join(help_panel.inner_text().split())
    _shot(page, dagster_ui, "restore-03-field-descriptions")
    for field in ("backup", "target", "confirm", "before"):
        description = " ".join(RestoreConfig.model_fields[field].description.split())
        assert description in help_text, f"the Launchpad does not describe `{field}`: {help_text[:2000]}"

    # What on-call types: which backup. Scratch is the default target; no confirmation needed.
    editor.get_by_text("latest", exact=True).dblclick()
    page.keyboard.type(backup_id)
    assert f"backup: {backup_id}" in editor.evaluate("element => element.CodeMirror.getValue()")
    _shot(page, dagster_ui, "restore-04-backup-typed")
    launch = page.get_by_role("button", name="Launch Run")
    expect(launch).to_be_enabled()
    launch.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = page.url.split("/runs/")[1].split("?")[0]
    _shot(page, dagster_ui, "restore-05-run-started", ready=_run_events(page))
    _wait_for_run_outcome(page, dagster_ui, run_id, RESTORE_DEADLINE_S, "restore-06-run-ended")

    run = _graphql(dagster_ui["base"], RUN_QUERY, {"runId": run_id})
    messages = [e.get("message") or "" for e in run["logsForRun"]["events"]]
    assert any(f"Restore of backup {backup_id} done" in m for m in messages), messages[-20:]
    assert any("restored into" in m and "_restore_" in m for m in messages), "not restored into scratch databases"
    # The pre-filled config: every choice of a restore, no placeholder for a deployment's value.
    for line in ("backup: latest", "target: scratch", "confirm:", "before:"):
        assert re.search(rf"^\s+{re.escape(line)}", prefilled, re.M), f"`{line}` not pre-filled:\n{prefilled}"
    assert MASK not in prefilled and MASK not in run["runOrError"]["runConfigYaml"]


BACKUP_HISTORY_QUERY = """
{ assetOrError(assetKey: {path: ["database_backup"]}) { __typename ... on Asset {
    assetMaterializations { runId metadataEntries { label ... on TextMetadataEntry { text } } } } } }
"""
BACKUP_DEADLINE_S = 300  # one step: pg_dump and verify of a small database, in a subprocess
CATALOG_DEADLINE_S = 240  # store_catalog_sensor ticks every 60 s once the daemon is up, on 2 busy cores
ASSET_HISTORY_QUERY = """
query ($path: [String!]!) { assetOrError(assetKey: {path: $path}) { __typename ... on Asset {
    assetMaterializations { runId metadataEntries { label
      ... on TextMetadataEntry { text } ... on FloatMetadataEntry { floatValue } } } } } }
"""


def _recorded_by_the_catalog_sensor(base: str, asset: str, key: str, value: str) -> dict:
    """{label: value} of `asset`'s materialization whose metadata `key` is `value`, once the
    daemon's store_catalog_sensor has recorded it (a materialization outside any run)."""
    deadline = time.monotonic() + CATALOG_DEADLINE_S
    while True:
        history = _graphql(base, ASSET_HISTORY_QUERY, {"path": [asset]})["assetOrError"]["assetMaterializations"]
        for materialization in history:
            entries = {e["label"]: e.get("text", e.get("floatValue")) for e in materialization["metadataEntries"]}
            if entries.get(key) == value:
                assert materialization["runId"] == "", "recorded by the sensor, outside any run"
                return entries
        assert time.monotonic() < deadline, f"store_catalog_sensor did not record {asset} {key}={value}"
        time.sleep(1)


def test_a_backup_taken_by_the_cli_is_in_the_backup_assets_history(page, dagster_ui):
    """The fixture's `maestro backup run` (no Dagster involved): the daemon's
    store_catalog_sensor records it, so database_backup's page lists it, taken outside Dagster,
    with its check `verified` passed."""
    from playwright.sync_api import expect

    base, backup_id = dagster_ui["base"], dagster_ui["backup_id"]
    metadata = _recorded_by_the_catalog_sensor(base, "database_backup", "backup_id", backup_id)
    assert metadata["taken_by"].startswith("outside Dagster") and metadata["stored_mib"] > 0
    page.goto(base + "/assets/database_backup?view=events")
    page.get_by_text(backup_id).first.hover()  # an action: the community modal, if it came, is skipped
    _shot(page, dagster_ui, "backup-00-cli-backup-in-history")
    page.goto(base + "/assets/database_backup?view=checks")
    expect(page.get_by_text(f"Backup {backup_id} verified").first).to_be_visible()
    _shot(page, dagster_ui, "backup-00-cli-backup-check")
ASSET_RUNS_QUERY = "{ runsOrError(limit: 50) { __typename ... on Runs { results { runId assetSelection { path } } } } }"


def _asset_run_id(base: str, asset: str) -> str:
    """The run launched to materialize `asset` (the first one of this instance)."""
    deadline = time.monotonic() + 60
    while True:
        runs = _graphql(base, ASSET_RUNS_QUERY)["runsOrError"].get("results") or []
        found = [r["runId"] for r in runs if {"path": [asset]} in (r.get("assetSelection") or [])]
        if found:
            assert len(found) == 1, f"more than one run of {asset}: {found}"
            return found[0]
        assert time.monotonic() < deadline, f"no run materializing {asset} was launched"
        time.sleep(0.5)


def test_the_backup_asset_page_is_the_backup_history_and_materialize_takes_one(page, dagster_ui):
    """On-call opens database_backup: no partitions, so nothing "missing"; one click on
    Materialize takes a backup now, the run succeeds, the backup is in the asset's history and
    its check `verified` passed."""
    from playwright.sync_api import expect

    base = dagster_ui["base"]
    page.goto(base + "/assets/database_backup")
    materialize = page.get_by_role("button", name=re.compile(r"(^|\s)Materialize$"))
    expect(materialize).to_be_visible()
    expect(page.get_by_role("tab", name="Checks")).to_be_visible()
    expect(page.get_by_role("tab", name="Partitions")).to_have_count(0)
    expect(page.get_by_text(re.compile(r"missing", re.I))).to_have_count(0)

    materialize.click()  # no dialog: the run starts ("Launched run ...")
    run_id = _asset_run_id(base, "database_backup")
    _shot(page, dagster_ui, "backup-01-materialize-clicked")
    page.goto(f"{base}/runs/{run_id}")
    _wait_for_run_outcome(page, dagster_ui, run_id, BACKUP_DEADLINE_S, "backup-02-run-ended")

    history = _graphql(base, BACKUP_HISTORY_QUERY)["assetOrError"]["assetMaterializations"]
    (taken,) = [m for m in history if m["runId"] == run_id]
    backup_id = next(e["text"] for e in taken["metadataEntries"] if e["label"] == "backup_id")
    assert backup_id != dagster_ui["backup_id"], "a new backup, not the one the CLI took"
    page.goto(base + "/assets/database_backup?view=events")
    expect(page.get_by_text(backup_id).first).to_be_visible()
    _shot(page, dagster_ui, "backup-03-history")
    page.get_by_role("tab", name="Checks").click()
    expect(page.get_by_text(f"Backup {backup_id} verified")).to_be_visible()
    expect(page.get_by_text("Succeeded").first).to_be_visible()
    _shot(page, dagster_ui, "backup-04-check-verified")
    _plots(page, dagster_ui, "database_backup", "stored_mib", "backup-05-plots")  # a point per backup, the CLI's too


def _plots(page, dagster_ui, asset: str, plotted: str, name: str) -> None:
    """The asset page's metadata as Plots (one point per materialization) for review."""
    from playwright.sync_api import expect

    page.goto(f"{dagster_ui['base']}/assets/{asset}")
    page.get_by_role("button", name=re.compile(r"Plots$")).click()
    expect(page.get_by_text(plotted, exact=True).first).to_be_visible()
    _shot(page, dagster_ui, name)


def test_one_tenants_ml_graph_materializes_from_the_asset_graph(page, dagster_ui):
    """Lineage -> the `ml` group -> Materialize all -> the tenant's partition -> Launch: the
    run of the whole graph (training to batch predictions) succeeds."""
    from playwright.sync_api import expect

    page.goto(dagster_ui["base"] + "/")
    _nav(page, "Lineage").click()
    group = page.get_by_role("button", name="asset_group ml ml")
    group.hover()
    group.locator("xpath=..").get_by_role("button").last.click()  # the group's "..." menu
    page.get_by_role("menuitem", name=re.compile("Filter to this group")).click()
    _shot(page, dagster_ui, "ml-01-group")
    page.get_by_role("button", name=re.compile("Materialize all")).click()
    dialog = page.get_by_role("dialog").first
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem", name=f"{TENANT} {TENANT}").click()
    dialog.get_by_text("Launch runs to materialize").click()  # closes the partition list
    expect(page.get_by_role("textbox", name="Filter partitions")).to_be_hidden()
    launch = dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    _shot(page, dagster_ui, "ml-02-partition-picked")
    launch.click()
    expect(dialog).to_be_hidden()
    # The toast "Launched run ... View" goes away after a few seconds: open the run from Runs.
    run_id = _tenant_run_id(dagster_ui["base"])
    _nav(page, "Runs").click()
    page.get_by_role("link", name=f"run {run_id[:8]}").click()
    page.wait_for_url(re.compile(rf"/runs/{run_id}"))
    _shot(page, dagster_ui, "ml-03-run-started", ready=_run_events(page))
    _wait_for_run_outcome(page, dagster_ui, run_id, ML_DEADLINE_S, "ml-04-run-ended")

    for asset in ("training_data", "deployment", "batch_predictions"):
        data = _graphql(dagster_ui["base"], MATERIALIZATIONS_QUERY, {"path": [asset], "partition": TENANT})
        runs = {m["runId"] for m in data["assetOrError"]["assetMaterializations"]}
        assert run_id in runs, f"{asset} has no materialization of {TENANT} from run {run_id}"


# What MLflow serves as the tenant's production model, and the run the platform database
# recorded for its active deployment: read in a process of the user's environment.
LIVE_MODEL = f"""
import json
from sqlalchemy import text
from maestro_pipelines.ml.registry import ModelRegistry
from maestro_pipelines.platform_db import locate_platform_database
from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.resources.mlflow import embedded_tracking_uri
from maestro_pipelines.settings import load_settings
settings = load_settings()
registry = ModelRegistry(embedded_tracking_uri(settings))
# The client's own call, not production_version (which reads any MLflow error as "none"): a
# failure here says what MLflow answered and which models and databases there are.
try:
    live = registry.client.get_model_version_by_alias("maestro-" + {TENANT!r}, "production")
except Exception as exc:
    models = [m.name for m in registry.client.search_registered_models()]
    with engine_for(locate_platform_database(settings).admin_url).connect() as conn:
        databases = conn.execute(text("SELECT datname FROM pg_database ORDER BY 1")).scalars().all()
        server = conn.execute(text("SELECT current_setting('data_directory') || ' since ' || pg_postmaster_start_time()")).scalar()
    pid_file = (settings.home / "pgdata" / "postmaster.pid").read_text().split()
    raise SystemExit(f"no production version: {{exc}}; registered models {{models}}; databases {{databases}}; "
                     f"server {{server}}; tracking {{registry.tracking_uri}}; home {{settings.home}}; postmaster.pid {{pid_file}}")
with engine_for(locate_platform_database(settings).platform_url).connect() as conn:
    recorded = conn.execute(text(
        "SELECT e.mlflow_run_id FROM deployments d JOIN model_versions v ON v.id = d.model_version_id "
        "JOIN experiments e ON e.id = v.experiment_id JOIN tenants t ON t.id = d.tenant_id "
        "WHERE t.name = :t AND d.status = 'active'"), {{"t": {TENANT!r}}}).scalar()
print(json.dumps({{"version": live.version, "run_id": live.run_id, "recorded_run_id": recorded}}))
"""


DEPLOYMENT_METADATA_QUERY = """
query ($partition: String!) { assetOrError(assetKey: {path: ["deployment"]}) { __typename ... on Asset {
    assetMaterializations(partitions: [$partition]) { runId timestamp metadataEntries { label
      ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } ... on UrlMetadataEntry { url } } } } } }
"""


def _metadata_row(page, key: str):
    """A row of the metadata table whose key cell is exactly `key`."""
    return page.locator("tr").filter(has=page.locator("td").get_by_text(key, exact=True))


def test_a_tenants_deployment_page_shows_its_production_version_and_mlflow_run(page, dagster_ui):
    """After the tenant's graph ran (the test above): Catalog -> deployment -> Partitions ->
    the tenant, as an ML engineer asks which model is live: the page shows the production
    version and the MLflow run id of the model MLflow serves, a link to that run in the MLflow
    UI (MAESTRO_MLFLOW_UI_URL), and the quality check's result under the tenant's partition."""
    from playwright.sync_api import expect

    checked = subprocess.run([sys.executable, "-c", LIVE_MODEL], env=dagster_ui["env"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    if checked.returncode != 0:
        recorded = _graphql(dagster_ui["base"], DEPLOYMENT_METADATA_QUERY, {"partition": TENANT})
        pytest.fail(f"{checked.stderr[-3000:]}\nwhat Dagster recorded: {json.dumps(recorded)[:3000]}")
    live = json.loads(checked.stdout)
    assert live["run_id"] and live["recorded_run_id"] == live["run_id"], live
    page.goto(dagster_ui["base"] + "/")
    _nav(page, "Catalog").click()
    # Named "<asset> <asset>"; the navigation's "deployment Deployment" is its icon and label.
    page.get_by_role("link", name=re.compile(r"^deployment\s+deployment$")).click()
    page.wait_for_url(re.compile(r"/assets/deployment"))
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_placeholder(re.compile("Filter by name")).fill(TENANT)
    page.get_by_text(TENANT, exact=True).first.click()
    page.wait_for_url(re.compile(rf"partition={TENANT}"))
    version, run = _metadata_row(page, "production_version"), _metadata_row(page, "mlflow_run_id")
    expect(version.locator("td").nth(1)).to_have_text(str(live["version"]))
    expect(run.locator("td").nth(1)).to_have_text(live["run_id"])
    link = _metadata_row(page, "mlflow_run").get_by_role("link").first
    assert link.get_attribute("href").endswith(f"/runs/{live['run_id']}"), link.get_attribute("href")
    _shot(page, dagster_ui, "ml-05-deployment-partition")

    page.goto(dagster_ui["base"] + "/assets/model_evaluation?view=checks&checkDetail=metric_floors")
    partition = page.get_by_text("Partition", exact=True).locator("xpath=..")
    expect(partition).to_contain_text(TENANT)
    _shot(page, dagster_ui, "ml-06-check-under-partition")


def _drill_run_id(base: str) -> str:
    """The run launched to materialize dr_drill (the only one of this instance)."""
    deadline = time.monotonic() + 60
    while True:
        runs = _graphql(base, DRILL_RUNS_QUERY)["runsOrError"].get("results") or []
        drills = [r["runId"] for r in runs if {"path": ["dr_drill"]} in (r.get("assetSelection") or [])]
        if drills:
            assert len(drills) == 1, f"more than one dr_drill run: {drills}"
            return drills[0]
        assert time.monotonic() < deadline, "no run materializing dr_drill was launched"
        time.sleep(0.5)


def test_a_drill_from_the_ui_shows_the_cli_drill_in_its_history(page, dagster_ui):
    """On-call ran `maestro drill` in a terminal while Dagster was down (the fixture): it
    becomes a point of dr_drill's RTO plot. Then on-call materializes dr_drill from its asset
    page: the run succeeds, and its materialization's drill history lists the CLI drill (with
    its RTO) beside the Dagster one, with the RTO chart."""
    cli = dagster_ui["cli_drill"]
    assert cli["ok"] and cli["record_key"], cli
    # The daemon's store_catalog_sensor makes the CLI drill a point of dr_drill's RTO plot;
    # waited for here, so the Dagster drill below is the latest materialization.
    drill_id = cli["record_key"].removeprefix("drills/").removesuffix(".json")
    recorded = _recorded_by_the_catalog_sensor(dagster_ui["base"], "dr_drill", "drill_id", drill_id)
    assert recorded["rto_s"] == round(cli["rto_s"], 3) and recorded["ran_from"] == "cli", recorded
    page.goto(dagster_ui["base"] + "/assets/dr_drill?view=events")
    page.get_by_text(drill_id).first.hover()
    _shot(page, dagster_ui, "drill-00-cli-drill-recorded")
    page.goto(dagster_ui["base"] + "/assets/dr_drill")
    _shot(page, dagster_ui, "drill-01-asset")
    page.get_by_role("button", name=re.compile(r"(^|\s)Materialize$")).click()
    run_id = _drill_run_id(dagster_ui["base"])
    _shot(page, dagster_ui, "drill-02-launched")
    page.goto(f"{dagster_ui['base']}/runs/{run_id}")
    _wait_for_run_outcome(page, dagster_ui, run_id, DRILL_DEADLINE_S, "drill-03-run-ended")

    # The asset's page shows its latest materialization's metadata: the history and the chart.
    page.goto(dagster_ui["base"] + "/assets/dr_drill")
    history = page.get_by_role("row").filter(has=page.get_by_text("drill_history", exact=True))
    history.scroll_into_view_if_needed()
    _shot(page, dagster_ui, "drill-04-history", ready=history)
    drills = [[cell.inner_text().strip() for cell in row.locator("td").all()]
              for row in history.locator("table tr").all()[1:]]
    started = datetime.fromisoformat(cli["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
    assert drills[0][1:3] == [f"dagster run {run_id[:8]}", "ok"], drills
    assert drills[1][:4] == [started, "cli", "ok", human_duration(cli["rto_s"])] and drills[1][5] == cli["backup_id"], drills
    # The chart is big for a table cell: Dagster shows it behind "[Show Markdown]".
    page.get_by_role("row").filter(has=page.get_by_text("rto_history", exact=True)).get_by_text("Show Markdown").click()
    chart = page.get_by_role("dialog").locator("img")
    chart.wait_for()
    page.wait_for_load_state("networkidle")
    # Without the dialog's fade-in, which would still be half transparent.
    page.screenshot(path=str(dagster_ui["shots"] / "drill-05-rto-chart.png"), animations="disabled")
    source = chart.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    (dagster_ui["shots"] / "drill-rto-chart-image.png").write_bytes(base64.b64decode(source.split(",", 1)[1]))
    page.keyboard.press("Escape")
    _plots(page, dagster_ui, "dr_drill", "rto_s", "drill-06-rto-plot")  # the CLI drill's point and the Dagster one
