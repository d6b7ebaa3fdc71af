"""`maestro backup automation on`: start the backup schedules and sensors that start stopped on
the embedded default (`maestro_pipelines.automation`), in the Dagster instance `dagster dev`
uses: DAGSTER_HOME, or the demo's MAESTRO_HOME/dagster when unset.

`dagster schedule start --start-all` starts every schedule and no sensor, and one
`dagster schedule|sensor start NAME` per name loads the code location each time. This loads
it once, under the location name `dagster dev` gives it (`maestro`, pyproject.toml and
workspace.yaml): a schedule's state is stored under that name, so another one would start a
schedule the UI never shows.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from maestro_pipelines.automation import STOPPED_ON_EMBEDDED_SCHEDULES, STOPPED_ON_EMBEDDED_SENSORS
from maestro_pipelines.errors import MaestroError

automation_app = typer.Typer(
    help="The backup schedules and sensors of the Dagster instance (DAGSTER_HOME, or MAESTRO_HOME/dagster).",
    no_args_is_help=True,
)

LOCATION_NAME = "maestro"


def _workspace() -> str:
    """workspace.yaml of the code location as `dagster dev` loads it from the repository (the
    working directory is part of a schedule's origin, which `dagster schedule list` matches on)."""
    import os

    repository = Path(__file__).resolve().parent.parent
    folder = repository if (repository / "pyproject.toml").exists() else Path(os.getcwd())
    return (
        "load_from:\n  - python_module:\n      module_name: maestro_pipelines.definitions\n"
        f"      location_name: {LOCATION_NAME}\n      working_directory: {json.dumps(str(folder))}\n"
    )


@automation_app.command("on")
def automation_on() -> None:
    """Start the backup, archive, retention and drill schedules and the RPO and verify sensors.

    They start stopped on the embedded default; already running ones are left as they are. The
    Dagster daemon (`dagster dev`, or `dagster-daemon run`) runs them from then on.

    Example: maestro backup automation on
    """
    import os

    from maestro_pipelines.demo_run import dagster_home
    from maestro_pipelines.settings import load_settings

    home = dagster_home(load_settings())
    os.environ["DAGSTER_HOME"] = str(home)
    out = Console()
    for name, kind, what in start_backup_automation():
        out.print(f"{kind:<8} {name:<28} {what}", highlight=False, soft_wrap=True)
    out.print(f"Dagster instance: {home}. Its daemon (`dagster dev`, or `dagster-daemon run`) runs them from now on.",
              highlight=False, soft_wrap=True)


def start_backup_automation() -> list[tuple[str, str, str]]:
    """(name, schedule|sensor, started|already running) for each, in the instance of DAGSTER_HOME."""
    import click
    import dagster as dg
    from dagster._cli.workspace.cli_target import get_repository_from_cli_opts
    from dagster_shared.cli import WorkspaceOpts

    # Loaded here first: a setting that stops the definitions from loading (MAESTRO_TIMEZONE)
    # is then its own one-line error, not a code server's traceback.
    import maestro_pipelines.definitions  # noqa: F401

    with tempfile.TemporaryDirectory() as folder, dg.DagsterInstance.get() as instance:
        workspace = Path(folder) / "workspace.yaml"
        workspace.write_text(_workspace())
        opts = WorkspaceOpts(workspace=[str(workspace)])
        try:
            with get_repository_from_cli_opts(instance, dg.__version__, opts, None) as repo:
                wanted = [(name, "schedule", repo.get_schedule) for name in STOPPED_ON_EMBEDDED_SCHEDULES]
                wanted += [(name, "sensor", repo.get_sensor) for name in STOPPED_ON_EMBEDDED_SENSORS]
                return [(name, kind, _start(instance, lookup(name), kind)) for name, kind, lookup in wanted]
        except click.UsageError as exc:  # how Dagster says the code location did not load
            raise MaestroError(f"The code location did not load: {str(exc).splitlines()[0]}",
                               "Run `dagster dev` in this environment to see why") from None


def _start(instance, remote, kind: str) -> str:
    stored = instance.get_instigator_state(remote.get_remote_origin_id(), remote.selector_id)
    if remote.get_current_instigator_state(stored).is_running:
        return "already running"
    if kind == "schedule":
        instance.start_schedule(remote)
    else:
        instance.start_sensor(remote)
    return "started"

