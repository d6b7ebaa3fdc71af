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
from maestro_pipelines.formatting import human_bytes
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
backup_app = typer.Typer(
    help="Backups of every Maestro database into the object store (MAESTRO_STORE_URL): run, list, verify, "
    "retention, monthly archive. Needs no Dagster instance.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")
restore_app = typer.Typer(
    help="Restore a backup: into scratch databases (default) or, with --confirm, in place of the live ones. "
    "Needs only MAESTRO_DATABASE_URL (or the embedded default) and MAESTRO_STORE_URL: works when Dagster is down.",
    invoke_without_command=True,
)
app.add_typer(restore_app, name="restore")

# Piped into a file or `less`, rich would draw tables 80 columns wide and crop ids and
# databases: without a terminal (and no COLUMNS) tables get room instead.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
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
        tables.add_column("rows", justify="right")
        tables.add_column("counted", justify="left")
        tables.add_column("size", justify="right")
        tables.add_column("partitions", justify="right")
        for t in status.tables:
            rows = "?" if t.rows is None else f"{t.rows:,}"
            counted = "exact" if t.rows_exact else ("never analyzed" if t.rows is None else "estimate")
            tables.add_row(t.table_name, rows, counted, human_bytes(t.total_bytes), str(t.partitions or ""))
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
    from maestro_pipelines.platform_db.tenants import add_tenant, validate_tenant_name, validate_tenant_settings

    gates = {k: v for k, v in {"accuracy": min_accuracy, "f1": min_f1, "roc_auc": min_roc_auc}.items() if v is not None}
    settings: dict = {"gates": gates} if gates else {}
    if regression_tolerance is not None:
        settings["regression_tolerance"] = regression_tolerance
    validate_tenant_name(name)  # before the database is opened (add_tenant checks again)
    validate_tenant_settings(settings)
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


def _store():
    """The object store from MAESTRO_STORE_URL (default: the `store` folder in MAESTRO_HOME)."""
    from maestro_pipelines.storage import open_store

    settings = load_settings()
    if settings.store_url is None:
        return open_store(settings.effective_store_url, "MAESTRO_STORE_URL (default)", create=True)
    return open_store(settings.store_url, "MAESTRO_STORE_URL")


class _ByteProgress:
    """A rich progress bar per database, fed by the backup library's progress callback."""

    def __init__(self, verb: str):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.verb = verb
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeElapsedColumn(), console=err, transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.started else None

    def __call__(self, label: str, done: int, expected: int | None) -> None:
        # Shown from the first progress on: a command refused before any work draws nothing
        # (an empty bar leaves a blank line above its one error line).
        if not self.started:
            self.bar.__enter__()
            self.started = True
        task = self.tasks.get(label)
        if task is None:
            task = self.tasks[label] = self.bar.add_task(f"{self.verb} {label}", total=expected)
        # The database's size is only an estimate of the dump's: never let the bar pass it.
        total = max(expected or 0, done) or None
        self.bar.update(task, completed=done, total=total)


def _entry_row(entry) -> dict:
    manifest = entry.manifest
    return {
        "id": entry.backup_id,
        "month": entry.month,
        "started_at": manifest.started_at.isoformat() if manifest else None,
        "snapshot_at": manifest.snapshot_at.isoformat() if manifest else None,
        "databases": [d.role for d in manifest.databases] if manifest else [],
        "dump_bytes": manifest.dump_bytes if manifest else None,
        "stored_bytes": entry.stored_bytes if manifest else None,
        "duration_s": round(manifest.duration_s, 3) if manifest else None,
        "verified": entry.verified,
        "verified_at": entry.verification.verified_at.isoformat() if entry.verified else None,
        "bad": entry.bad is not None,
        "problem": entry.bad,
    }


def _print_report(report) -> None:
    if report.ok:
        out.print(
            f"backup {report.backup_id} verified: {report.objects} objects, "
            f"{human_bytes(report.bytes_read)} read, in {report.duration_s:.1f} s",
            highlight=False,
        )
    else:
        err.print(f"backup {report.backup_id} FAILED verification:", highlight=False)
        for problem in report.problems:
            err.print(f"  - {problem}", highlight=False, soft_wrap=True)


@backup_app.command("run")
def backup_run(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the backup once it is written."),
    level: int = typer.Option(None, help="zstd compression level (default: the library's measured choice)."),
    checksums: bool = typer.Option(
        True, "--checksums/--no-checksums", help="Per-table content checksums in the dump's snapshot."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON (for scripts)."),
) -> None:
    """Back up every Maestro database (platform, MLflow, Dagster's when on PostgreSQL) into the store."""
    from maestro_pipelines.backup import BackupOptions, backup_targets, create_backup, verify_backup

    options = BackupOptions(content_checksums=checksums)  # refuses a bad --level before anything is opened
    if level is not None:
        options = BackupOptions(compression_level=level, content_checksums=checksums)
    settings = load_settings()
    store = _store()
    targets, notes = backup_targets(settings)
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    with _ByteProgress("dump") as progress:
        manifest = create_backup(store, targets, options, progress=progress, notes=notes)
    report = None
    if verify:
        with _ByteProgress("verify") as progress:
            report = verify_backup(store, manifest.backup_id, progress=progress)
    if as_json:
        summary = {
            "id": manifest.backup_id,
            "store": store.url,
            "databases": {d.role: {"database": d.database, "dump_bytes": d.dump_bytes, "stored_bytes": d.compressed_bytes,
                                   "rows": d.rows, "tables": len(d.tables)} for d in manifest.databases},
            "duration_s": round(manifest.duration_s, 3),
            "verified": report.ok if report else None,
            "problems": report.problems if report else [],
        }
        out.print_json(json.dumps(summary))
    else:
        table = Table(title=f"backup {manifest.backup_id} in {store.url}", title_justify="left")
        for column, justify in (("database", "left"), ("role", "left"), ("tables", "right"), ("rows", "right"),
                                ("dump", "right"), ("stored", "right"), ("time", "right")):
            table.add_column(column, justify=justify)
        for d in manifest.databases:
            table.add_row(d.database, d.role, str(len(d.tables)), f"{d.rows:,}", human_bytes(d.dump_bytes),
                          human_bytes(d.compressed_bytes), f"{d.duration_s:.1f} s")
        out.print(table)
        if report is not None:
            _print_report(report)
    if report is not None and not report.ok:
        raise typer.Exit(1)


@backup_app.command("list")
def backup_list(
    monthly: bool = typer.Option(False, "--monthly", help="List the monthly archives instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Committed backups, oldest first: id, time, size, verified (yes; no; BAD: its verification
    failed, or an object is missing or changed since, found by one cheap head per object)."""
    from maestro_pipelines.backup import check_objects, list_backups

    store = _store()
    entries = list_backups(store, monthly=monthly)
    for entry in entries:
        if entry.verified:
            check_objects(store, entry)  # one head per object: what is listed as good still is
    if as_json:
        out.print_json(json.dumps([_entry_row(e) for e in entries]))
        _print_interrupted_swaps(store)  # on stderr: the JSON on stdout stays the list
        return
    kind = ("monthly archive" if monthly else "backup") + ("" if len(entries) == 1 else "s")
    table = Table(title=f"{len(entries)} {kind} in {store.url}", title_justify="left")
    for column, justify in (("id", "left"), ("month", "left"), ("time (UTC)", "left"), ("databases", "left"),
                            ("size", "right"), ("verified", "left")):
        # an 80-column terminal fits five columns: archives show their month instead of databases
        if (column == "month" and not monthly) or (column == "databases" and monthly):
            continue
        # Ids and times are copied into other commands: never wrapped or cut.
        table.add_column(column, justify=justify, no_wrap=column != "databases", min_width=8 if column == "databases" else None)
    for entry in entries:
        row = _entry_row(entry)
        verified = "yes" if entry.verified else ("[red]BAD[/red]" if entry.bad else "no")
        cells = [entry.backup_id] + ([entry.month or ""] if monthly else []) + [
            f"{entry.started_at:%Y-%m-%d %H:%M:%S}" if entry.started_at else "?",
        ] + ([] if monthly else [",".join(row["databases"])]) + [
            human_bytes(entry.stored_bytes) if entry.manifest else "?",
            verified,
        ]
        table.add_row(*cells)
    out.print(table)
    for entry in entries:
        if entry.bad:
            err.print(f"{entry.backup_id}: {entry.bad}", highlight=False, soft_wrap=True)
    _print_interrupted_swaps(store)


def _print_interrupted_swaps(store) -> None:
    """What the store's swap journals say (no server is read: `maestro restore status` does)."""
    from maestro_pipelines.backup.journal import interrupted_swaps

    for journal in interrupted_swaps(store):
        err.print(f"[red]HALF-DONE RESTORE:[/red] {journal.summary()}. Run `maestro restore status`, then "
                  "`maestro restore finish` or `maestro restore undo`", highlight=False, soft_wrap=True)


@backup_app.command("verify")
def backup_verify(
    backup_id: str = typer.Argument(..., help="A backup id from `maestro backup list`, or `newest`."),
    month: str = typer.Option(None, help="Verify the monthly archive of this month (YYYY-MM) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Re-read every object of a backup, check sizes and sha256, read each dump with pg_restore --list.
    Exits non-zero when anything is wrong."""
    from maestro_pipelines.backup import BackupNotFound, list_backups, verify_backup

    store = _store()
    if backup_id == "newest":
        entries = list_backups(store, monthly=month is not None)
        entries = [e for e in entries if month is None or e.month == month]
        if not entries:
            raise BackupNotFound(f"There is no backup in the store at {store.url}", "Run `maestro backup run` first")
        backup_id = entries[-1].backup_id
    with _ByteProgress("verify") as progress:
        report = verify_backup(store, backup_id, month=month, progress=progress)
    if as_json:
        out.print_json(json.dumps({"id": report.backup_id, "ok": report.ok, "problems": report.problems,
                                   "objects": report.objects, "bytes_read": report.bytes_read,
                                   "duration_s": report.duration_s}))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


@backup_app.command("retention")
def backup_retention(
    daily: int = typer.Option(7, help="Days (with backups) whose newest backup is kept."),
    monthly: int = typer.Option(12, help="Monthly archives kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted, delete nothing."),
) -> None:
    """Delete backups beyond the retention policy (never the newest verified one, never while a
    backup or restore runs) and leftovers of backups that never finished."""
    from maestro_pipelines.backup import RetentionPolicy, apply_retention

    try:
        policy = RetentionPolicy(daily=daily, monthly=monthly)
    except ValueError as exc:
        raise MaestroError(f"retention policy refused: {exc}", "Use --daily 1 or more and --monthly 0 or more") from None
    plan = apply_retention(_store(), policy, dry_run=dry_run)
    if plan.skipped:
        err.print(f"retention skipped: {plan.skipped}", highlight=False, soft_wrap=True)
        return
    verb = "would delete" if dry_run else "deleted"
    for entry, why in plan.delete:
        out.print(f"{verb} {entry.root}: {why}", highlight=False)
    for root in plan.delete_incomplete:
        out.print(f"{verb} {root}: never finished (no manifest)", highlight=False)
    for leftover in plan.discarded:
        out.print(f"removed {leftover}: left by a write that never finished", highlight=False, soft_wrap=True)
    out.print(f"kept {len(plan.keep)}, {verb} {len(plan.delete) + len(plan.delete_incomplete)}", highlight=False)


@backup_app.command("archive")
def backup_archive(
    month: str = typer.Option(None, help="Month to archive, YYYY-MM (default: the previous month)."),
) -> None:
    """Copy (server-side) the newest verified backup of MONTH to the monthly/ prefix."""
    from datetime import timedelta

    from maestro_pipelines.backup import archive_month
    from maestro_pipelines.backup.archive import check_archive_month
    from maestro_pipelines.backup.manifest import utcnow

    if month is None:
        month = (utcnow().replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    check_archive_month(month)  # before the store is opened
    entry, copied = archive_month(_store(), month)
    state = "archived" if copied else "already archived"
    out.print(f"{state}: backup {entry.backup_id} as {entry.root}", highlight=False)


def _destinations():
    from maestro_pipelines.backup import database_targets

    targets, notes = database_targets(load_settings())
    return targets, notes


def _steps_table(title: str, steps) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("detail", overflow="fold")
    for step in steps:
        table.add_row(step.name, f"{step.seconds:.2f}", step.detail)
    return table


@restore_app.callback()
def restore(
    ctx: typer.Context,
    backup: str = typer.Option("latest", help="Backup id, or `latest` (the newest verified backup)."),
    before: str = typer.Option(None, help="Instead: the newest verified backup taken before this time (ISO 8601, UTC if no zone)."),
    target: str = typer.Option("scratch", help="`scratch`: next to the live databases; `live`: in their place."),
    confirm: str = typer.Option(
        None, "--confirm",
        help="Required with --target live: the platform database's name (or, when --databases leaves the platform "
             "database out, the first database restored, e.g. Dagster's).",
    ),
    databases: str = typer.Option(None, help="Comma-separated roles to restore (platform,mlflow,dagster); default all."),
    jobs: int = typer.Option(2, help="pg_restore parallel jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
) -> None:
    """Restore a backup: every object is checked before any database is touched; a live restore
    swaps the verified copy into place and keeps the old database until `maestro restore cleanup`."""
    if ctx.invoked_subcommand is not None:
        return
    from datetime import datetime, timezone

    from maestro_pipelines.backup import resolve_restore_point, restore_backup
    from maestro_pipelines.backup.restore import check_restore_request

    roles = [r.strip() for r in databases.split(",")] if databases is not None else None
    check_restore_request(target, roles, jobs)  # before the store or a server is touched
    moment = None
    if before:
        try:
            moment = datetime.fromisoformat(before.replace("Z", "+00:00"))
        except ValueError:
            raise MaestroError(f"--before '{before}' is not a time", "Write it as ISO 8601, e.g. 2026-11-26T14:00:00Z") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    store = _store()
    entry = resolve_restore_point(store, backup, before=moment, log=lambda message: err.print(message, highlight=False, soft_wrap=True))
    destinations, _notes = _destinations()
    # restore_backup says "restoring ... into ..." itself, once its refusals are behind it.
    with _ByteProgress("download") as progress:
        report = restore_backup(
            store, entry, destinations, target=target, confirm=confirm, roles=roles, jobs=jobs, progress=progress,
            log=lambda message: err.print(message, highlight=False),
        )
    if as_json:
        out.print_json(json.dumps({
            "backup_id": report.backup_id,
            "snapshot_at": report.snapshot_at.isoformat(),
            "target": report.target,
            "ok": report.ok,
            "duration_s": round(report.duration_s, 3),
            "steps": report.step_seconds(),
            "databases": [{"role": d.role, "live": d.live, "restored_as": d.restored_as, "kept_as": d.kept_as,
                           "tables": d.tables, "rows": d.rows} for d in report.databases],
            "missing_artifacts": report.missing_artifacts,
            "notes": report.notes,
        }))
        return
    out.print(_steps_table(f"restore of backup {report.backup_id}: {report.duration_s:.1f} s", report.steps))
    for d in report.databases:
        where_now = f"swapped into place as {d.live}" if d.restored_as == d.live and report.target == "live" else f"in {d.restored_as}"
        kept = f"; the old one is kept as {d.kept_as}" if d.kept_as else ""
        out.print(f"{d.role}: {d.tables} tables, {d.rows:,} rows equal to the backup, {where_now}{kept}", highlight=False)
    if report.missing_artifacts:
        err.print(f"[yellow]warning:[/yellow] {len(report.missing_artifacts)} model artifacts listed in the backup are "
                  f"missing from the store: {', '.join(report.missing_artifacts[:10])}", highlight=False)
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    out.print("when you no longer need them: `maestro restore cleanup` drops the scratch databases, with "
              "--confirm <platform database> also the old live ones", highlight=False)


@restore_app.command("cleanup")
def restore_cleanup_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be dropped, drop nothing."),
    confirm: str = typer.Option(
        None, "--confirm",
        help="The platform database's name: also drop the old live databases (<db>_pre_restore_<time>), "
             "the only way back from a wrong restore.",
    ),
) -> None:
    """List every database restores left on the servers, with size and age, and drop the scratch
    restores (`<db>_restore_<time>`); the old live databases kept aside (`<db>_pre_restore_<time>`)
    only with --confirm. Never those of a running or half-done restore."""
    from maestro_pipelines.backup import restore_cleanup
    from maestro_pipelines.backup.recovery import half_done_swaps
    from maestro_pipelines.backup.restore import raise_for_in_use

    destinations, _notes = _destinations()
    store = _store()
    _print_half_done(half_done_swaps(store, destinations))
    items = restore_cleanup(destinations, dry_run=dry_run, store=store, confirm=confirm)
    for item in items:
        out.print(item.describe(), highlight=False, soft_wrap=True)
    verb = "would drop" if dry_run else "dropped"
    kept = sum(not item.dropped for item in items)
    out.print(f"{verb} {sum(item.dropped for item in items)} database(s), kept {kept}", highlight=False)
    raise_for_in_use(items)


def _print_half_done(found) -> None:
    for half in found:
        err.print(f"[red]HALF-DONE RESTORE:[/red] {half.describe()}", highlight=False, soft_wrap=True)
        err.print(half.hint(), highlight=False, soft_wrap=True)


@restore_app.command("status")
def restore_status(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Live restores that stopped half way (killed between two swaps): which database is from
    which backup, read from the servers. Exits 1 when there is one."""
    from maestro_pipelines.backup.recovery import half_done_swaps

    destinations, _notes = _destinations()
    found = half_done_swaps(_store(), destinations)
    if as_json:
        out.print_json(json.dumps([
            {"backup_id": h.journal.backup_id, "stamp": h.journal.stamp, "started_at": h.journal.started_at.isoformat(),
             "host": h.journal.host, "pid": h.journal.pid,
             "databases": [{"role": step.role, "live": step.live, "state": state, "restored": step.restored,
                            "kept": step.kept} for step, state in h.states]}
            for h in found
        ]))
    else:
        _print_half_done(found)
        if not found:
            out.print("no half-done live restore", highlight=False)
    if found:
        raise typer.Exit(1)


def _recover(undo: bool, confirm: str | None) -> None:
    from maestro_pipelines.backup.recovery import finish_swap, undo_swap

    destinations, _notes = _destinations()
    recover = undo_swap if undo else finish_swap
    done = recover(_store(), destinations, confirm, log=lambda message: err.print(message, highlight=False))
    for line in done.lines():
        out.print(line, highlight=False, soft_wrap=True)
    out.print("when you no longer need them: `maestro restore cleanup` drops the scratch databases, with "
              "--confirm <platform database> also the old live ones", highlight=False)


_RECOVER_CONFIRM = "The platform database's name (what the interrupted restore was confirmed with)."


@restore_app.command("finish")
def restore_finish(confirm: str = typer.Option(None, "--confirm", help=_RECOVER_CONFIRM)) -> None:
    """Finish a live restore that stopped half way: swap into place the databases it had not
    swapped yet, so every live database is from the backup (the old ones are kept aside)."""
    _recover(undo=False, confirm=confirm)


@restore_app.command("undo")
def restore_undo(confirm: str = typer.Option(None, "--confirm", help=_RECOVER_CONFIRM)) -> None:
    """Undo a live restore that stopped half way: put back the old live databases it had
    already swapped, so every live database is as before the restore (the restored copies are kept)."""
    _recover(undo=True, confirm=confirm)


@app.command("drill")
def drill(
    rto_minutes: float = typer.Option(15, help="RTO target: restore to verified within this many minutes."),
    rpo_hours: float = typer.Option(26, help="RPO target: the newest verified backup at most this old."),
    backup: str = typer.Option("latest", help="Backup to drill with (default: the newest verified)."),
    jobs: int = typer.Option(2, help="pg_restore parallel jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
) -> None:
    """Disaster-recovery drill without Dagster: restore into scratch databases, verify counts,
    checksums and indexes (amcheck), resolve MLflow's production aliases, measure RTO and RPO,
    drop the scratch databases. Exits 1 when the drill fails."""
    from maestro_pipelines.backup import run_drill
    from maestro_pipelines.backup.drill import drill_targets
    from maestro_pipelines.backup.restore import SCRATCH, check_restore_request

    rto_target, rpo_target = drill_targets(rto_minutes, rpo_hours)
    check_restore_request(SCRATCH, None, jobs)
    destinations, _notes = _destinations()
    with _ByteProgress("download") as progress:
        report = run_drill(
            _store(), destinations, rto_target, rpo_target, jobs=jobs,
            progress=progress, log=lambda message: err.print(message, highlight=False, soft_wrap=True), backup=backup,
        )
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        out.print(_steps_table(f"drill with backup {report.backup_id}", report.steps))
        if report.rto_s is not None:
            out.print(f"RTO {report.rto_s:.1f} s (target {report.rto_target_s:.0f} s): {'ok' if report.rto_ok else 'MISSED'}", highlight=False)
        if report.rpo_s is not None and not report.restored:
            out.print("RPO not judged: the drill's restore failed (below), so this backup is no proven restore point",
                      highlight=False)
        elif report.rpo_s is not None:
            out.print(f"RPO {report.rpo_s / 3600:.2f} h (target {report.rpo_target_s / 3600:.1f} h): {'ok' if report.rpo_ok else 'MISSED'}", highlight=False)
        if report.restored:
            out.print(f"{report.indexes_checked} btree indexes checked, {report.aliases_resolved} production aliases resolved", highlight=False)
        for note in report.notes:
            err.print(f"note: {note}", highlight=False)
        for failure in report.failures():
            err.print(f"drill FAILED: {failure}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    tenants: str = typer.Option("acme,globex,initech", help="Comma-separated demo tenants to seed and train."),
) -> None:
    """Seed demo tenants (scikit-learn datasets) and materialize the whole ML graph for each."""
    from maestro_pipelines.demo_run import run_demo

    run_demo([t.strip() for t in tenants.split(",") if t.strip()], out, err)


class _Terminated(BaseException):
    """SIGTERM (a service manager, `kill`) raised in the main thread, so that what a command
    was writing is removed on the way out (a failed backup's objects, uploads and marker;
    a restore's databases) instead of the process vanishing mid-write. Not an Exception:
    nothing that handles errors swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main() -> None:
    import signal

    # Typer 0.2x carries its own copy of click: its UsageError (the base of BadParameter,
    # NoSuchOption, MissingParameter) is reached through the public BadParameter.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        # Not standalone: a usage error (a word where a number goes, an unknown option) comes
        # here and gets one line like every other bad input, not click's framed box.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except usage_error as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "maestro"
        err.print(f"error: {exc.format_message().rstrip('.')}. See `{command} --help`", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except _Terminated:
        err.print("terminated (SIGTERM)", highlight=False)
        sys.exit(128 + signal.SIGTERM)
    except MaestroError as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: say so in one line
        if os.environ.get("MAESTRO_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off"):
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
