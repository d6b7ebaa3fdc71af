"""`maestro backup automation on|off|status`: start, stop or show the backup schedules and sensors
that start stopped on the embedded default (`maestro_pipelines.automation`), in the Dagster instance `dagster dev`
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

from maestro_pipelines.automation import (
    AUTOMATION_ON_COMMAND,
    STOPPED_ON_EMBEDDED_SCHEDULES,
    STOPPED_ON_EMBEDDED_SENSORS,
)
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
    Dagster daemon (`dagster dev` in the repository, or `dagster-daemon run -w workspace.yaml`)
    runs them from then on.

    Example: maestro backup automation on
    """
    _print_changes(_start, "Its daemon (`dagster dev`, or `dagster-daemon run -w workspace.yaml`) runs them from now on.")


@automation_app.command("off")
def automation_off() -> None:
    """Stop the backup schedules and sensors: nothing backs up, archives, deletes or drills by itself.

    A stopped schedule stays stopped (in the Dagster instance) until `maestro backup automation
    on` or the UI starts it again; `maestro backup run` and `maestro drill` still work by hand.

    Example: maestro backup automation off
    """
    _print_changes(_stop, "Backups, archives, retention and drills now run only when asked (UI, CLI).")


@automation_app.command("status")
def automation_status(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Each backup schedule and sensor, RUNNING or STOPPED, in the Dagster instance of DAGSTER_HOME.

    What the daemon of that instance does with them, read from the code location as `dagster
    dev` loads it. `default` means nobody set it yet: the embedded default starts them stopped,
    production running.

    --json keys: dagster_home, location, automation [{name, kind, status, set_by}], where
    status is RUNNING or STOPPED and set_by is `default` or `instance` (started or stopped by
    the UI or this command).

    Examples:

        maestro backup automation status
        maestro backup automation status --json
    """
    home = _use_dagster_home()
    found = visit_backup_automation(_status)
    if as_json:
        rows = [{"name": name, "kind": kind, "status": status, "set_by": set_by} for name, kind, (status, set_by) in found]
        Console().print_json(json.dumps({"dagster_home": str(home), "location": LOCATION_NAME, "automation": rows}))
        return
    out = Console()
    for name, kind, (status, set_by) in found:
        out.print(f"{kind:<8} {name:<28} {status:<8} ({'the default' if set_by == 'default' else 'set in the instance'})",
                  highlight=False, soft_wrap=True)
    stopped = sum(status == "STOPPED" for _name, _kind, (status, _set_by) in found)
    hint = f"; `{AUTOMATION_ON_COMMAND}` starts them" if stopped else ""
    out.print(f"Dagster instance: {home} ({stopped} of {len(found)} stopped{hint})", highlight=False)


def _use_dagster_home() -> Path:
    """DAGSTER_HOME for what follows: the environment's, or the demo's MAESTRO_HOME/dagster."""
    import os

    from maestro_pipelines.demo_run import dagster_home
    from maestro_pipelines.settings import load_settings

    home = dagster_home(load_settings())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _print_changes(change, closing: str) -> None:
    home = _use_dagster_home()
    out = Console()
    for name, kind, what in visit_backup_automation(change):
        out.print(f"{kind:<8} {name:<28} {what}", highlight=False, soft_wrap=True)
    out.print(f"Dagster instance: {home}. {closing}", highlight=False)


def visit_backup_automation(visit) -> list[tuple[str, str, object]]:
    """(name, schedule|sensor, visit(instance, remote, kind, stored state)) for each of the backup
    schedules and sensors, loaded once from the code location as `dagster dev` loads it."""
    import click
    import dagster as dg
    from dagster._cli.workspace.cli_target import (
        get_code_location_from_workspace,
        get_remote_repository_from_code_location,
        get_workspace_from_cli_opts,
    )
    from dagster_shared.cli import WorkspaceOpts

    # Loaded here first: a setting that stops the definitions from loading (MAESTRO_TIMEZONE)
    # is then its own one-line error, not a code server's traceback.
    import maestro_pipelines.definitions  # noqa: F401

    with tempfile.TemporaryDirectory() as folder, dg.DagsterInstance.get() as instance:
        workspace = Path(folder) / "workspace.yaml"
        workspace.write_text(_workspace())
        opts = WorkspaceOpts(workspace=[str(workspace)])
        try:
            # The code server's INFO lines (started, stopping: colour codes even into a pipe)
            # are not this command's output; its warnings and errors still come through.
            with get_workspace_from_cli_opts(instance, dg.__version__, opts, log_level="WARNING") as workspace_context:
                repo = get_remote_repository_from_code_location(
                    get_code_location_from_workspace(workspace_context, LOCATION_NAME), None)
                wanted = [(name, "schedule", repo.get_schedule) for name in STOPPED_ON_EMBEDDED_SCHEDULES]
                wanted += [(name, "sensor", repo.get_sensor) for name in STOPPED_ON_EMBEDDED_SENSORS]
                return [(name, kind, visit(instance, lookup(name), kind, _stored(instance, lookup(name))))
                        for name, kind, lookup in wanted]
        except click.UsageError as exc:  # how Dagster says the code location did not load
            raise MaestroError(f"The code location did not load: {str(exc).splitlines()[0]}",
                               "Run `dagster dev` in this environment to see why") from None


def _stored(instance, remote):
    return instance.get_instigator_state(remote.get_remote_origin_id(), remote.selector_id)


def _status(instance, remote, kind: str, stored) -> tuple[str, str]:
    running = remote.get_current_instigator_state(stored).is_running
    return ("RUNNING" if running else "STOPPED"), ("default" if stored is None else "instance")


def _start(instance, remote, kind: str, stored) -> str:
    if remote.get_current_instigator_state(stored).is_running:
        return "already running"
    if kind == "schedule":
        instance.start_schedule(remote)
    else:
        instance.start_sensor(remote)
    return "started"


def _stop(instance, remote, kind: str, stored) -> str:
    if not remote.get_current_instigator_state(stored).is_running:
        return "already stopped"
    if kind == "schedule":
        instance.stop_schedule(remote.get_remote_origin_id(), remote.selector_id, remote)
    else:
        instance.stop_sensor(remote.get_remote_origin_id(), remote.selector_id, remote)
    return "stopped"
