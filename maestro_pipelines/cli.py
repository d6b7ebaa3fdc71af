"""`maestro`: the command line for engineers and on-call.

It works without a Dagster instance: everything it does goes through the Dagster-free
libraries, configured only by environment variables (see `settings.py`). Problems the user
can fix come out as one line on stderr and exit code 1, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.settings import load_settings

app = typer.Typer(
    help="Maestro: one Dagster graph for an ML platform (training, registry, deployment, backups, DR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="The platform database: migrations, status, the embedded server.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
tenants_app = typer.Typer(help="Tenants: each one a partition of the ML graph.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")

out = Console()
err = Console(stderr=True)


def _location():
    from maestro_pipelines.platform_db import locate_platform_database

    return locate_platform_database(load_settings())


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Option("head", help="Alembic revision to upgrade to."),
) -> None:
    """Create the platform database if needed and run its migrations up to REVISION."""
    from maestro_pipelines.platform_db.migrate import upgrade

    location = _location()
    result = upgrade(location, revision)
    _print_warnings(result.warnings)
    if result.created_database:
        out.print(f"created database {location.database} ({location.where})", highlight=False)
    if result.changed:
        out.print(f"upgraded {location.database}: {result.before or 'base'} -> {result.after}", highlight=False)
    else:
        out.print(f"{location.database} is already at {result.after}", highlight=False)


@db_app.command("downgrade")
def db_downgrade(
    revision: str = typer.Argument(..., help="Alembic revision to go back to; `base` removes every Maestro table."),
    confirm: str = typer.Option(
        "", "--confirm", help="The database's name, to confirm: a downgrade drops tables and their data."
    ),
) -> None:
    """Take the platform database back to REVISION (drops the tables of later revisions)."""
    from maestro_pipelines.platform_db.migrate import downgrade

    location = _location()
    if confirm != location.database:
        raise MaestroError(
            f"a downgrade drops tables and their data in '{location.database}'",
            f"Repeat with --confirm {location.database} if that is what you want",
        )
    result = downgrade(location, revision)
    out.print(f"downgraded {location.database}: {result.before or 'base'} -> {result.after or 'base'}", highlight=False)


@db_app.command("status")
def db_status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for scripts)."),
) -> None:
    """Server version, where the data lives, current migration and table sizes."""
    from maestro_pipelines.platform_db.status import database_status

    status = database_status(_location())
    if as_json:
        out.print_json(json.dumps(status.as_dict()))
        return
    revision = status.current_revision or "none (empty database)"
    state = "up to date" if status.up_to_date else f"behind head {status.head_revision}: run `maestro db upgrade`"
    for key, value in (
        ("database", status.database),
        ("where", status.where),
        ("server", f"PostgreSQL {status.server_version}"),
        ("migration", f"{revision} ({state})"),
        ("pg_stat_statements", status.pg_stat_statements),
    ):
        out.print(f"{key:<20}{value}", highlight=False, soft_wrap=True)
    if status.tables:
        tables = Table(title="tables", title_justify="left")
        tables.add_column("table")
        tables.add_column("rows (estimate)", justify="right")
        tables.add_column("size", justify="right")
        tables.add_column("partitions", justify="right")
        for t in status.tables:
            tables.add_row(t.table_name, f"{t.estimated_rows:,}", _human_bytes(t.total_bytes), str(t.partitions or ""))
        out.print(tables)


@db_app.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL and keep it running until `maestro db stop`."""
    settings = load_settings()
    if not settings.uses_embedded_database:
        raise MaestroError(
            "MAESTRO_DATABASE_URL is set, so there is no embedded server to start",
            "Unset MAESTRO_DATABASE_URL to use the embedded PostgreSQL",
        )
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres
    from maestro_pipelines.platform_db.urls import redact

    url = EmbeddedPostgres(settings.home).start(keep_running=True)
    out.print(f"embedded PostgreSQL running, data in {settings.home / 'pgdata'}", highlight=False)
    out.print(f"connect with: {redact(url.set(drivername='postgresql', database='maestro'))}", highlight=False)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL."""
    from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

    settings = load_settings()
    stopped = EmbeddedPostgres(settings.home).stop()
    out.print("stopped" if stopped else "the embedded PostgreSQL was not running", highlight=False)


def _platform_connection():
    """A transaction on the platform database, migrated to head first."""
    from maestro_pipelines.platform_db.connection import connect
    from maestro_pipelines.platform_db.migrate import upgrade

    location = _location()
    result = upgrade(location)
    _print_warnings(result.warnings)
    return connect(location.platform_url, location.source)


@tenants_app.command("add")
def tenants_add(
    name: str = typer.Argument(..., help="Lowercase letters, digits, - and _; starts with a letter."),
    display_name: str = typer.Option("", help="Human-readable name."),
    min_accuracy: float = typer.Option(None, help="Quality gate: accuracy floor (default 0.70)."),
    min_f1: float = typer.Option(None, help="Quality gate: F1 floor (default 0.65)."),
    min_roc_auc: float = typer.Option(None, help="Quality gate: ROC AUC floor (default 0.70)."),
    regression_tolerance: float = typer.Option(None, help="Allowed drop against production (default 0.02)."),
) -> None:
    """Add a tenant; the tenant sensor gives it a partition and requests its first training."""
    from maestro_pipelines.platform_db.tenants import add_tenant

    gates = {k: v for k, v in {"accuracy": min_accuracy, "f1": min_f1, "roc_auc": min_roc_auc}.items() if v is not None}
    settings: dict = {"gates": gates} if gates else {}
    if regression_tolerance is not None:
        settings["regression_tolerance"] = regression_tolerance
    with _platform_connection() as conn:
        tenant = add_tenant(conn, name, display_name, settings)
        conn.commit()
    out.print(f"added tenant {tenant.name} (id {tenant.id}); gates {tenant.gates}", highlight=False)


@tenants_app.command("list")
def tenants_list(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Tenants with their status and quality gates."""
    from maestro_pipelines.platform_db.tenants import list_tenants

    with _platform_connection() as conn:
        tenants = list_tenants(conn, include_inactive=True)
    if as_json:
        out.print_json(json.dumps([
            {"id": t.id, "name": t.name, "display_name": t.display_name, "status": t.status, "gates": t.gates,
             "regression_tolerance": t.regression_tolerance} for t in tenants
        ]))
        return
    table = Table(title=f"{len(tenants)} tenants", title_justify="left")
    for column in ("name", "display name", "status", "gates", "created"):
        table.add_column(column)
    for t in tenants:
        gates = ", ".join(f"{k} >= {v:g}" for k, v in t.gates.items())
        table.add_row(t.name, t.display_name, t.status, gates, f"{t.created_at:%Y-%m-%d %H:%M}" if t.created_at else "")
    out.print(table)


@app.command("demo")
def demo(
    tenants: str = typer.Option("acme,globex,initech", help="Comma-separated demo tenants to seed and train."),
) -> None:
    """Seed demo tenants (scikit-learn datasets) and materialize the whole ML graph for each."""
    from maestro_pipelines.demo_run import run_demo

    run_demo([t.strip() for t in tenants.split(",") if t.strip()], out, err)


def _human_bytes(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size} TB"


def main() -> None:
    try:
        app()
    except MaestroError as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: say so in one line
        if os.environ.get("MAESTRO_DEBUG"):
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0]
        err.print(
            f"error: unexpected {type(exc).__name__}: {first_line} "
            "(run again with MAESTRO_DEBUG=1 for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
