"""`maestro`: the command line for engineers and on-call.

It works without a Dagster instance: everything it does goes through the Dagster-free
libraries, configured only by environment variables (see `settings.py`). Problems the user
can fix come out as one line on stderr and exit code 1, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maestro_pipelines.automation_cli import automation_app
from maestro_pipelines.objectives import DAILY_BACKUPS_KEPT, DEFAULT_GATES, DEFAULT_REGRESSION_TOLERANCE, MONTHLY_ARCHIVES_KEPT, RPO_TARGET_HOURS
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.formatting import counted, human_bytes, human_duration
from maestro_pipelines.settings import load_settings

app = typer.Typer(
    help="Maestro: one Dagster graph for an ML platform: training, registry, deployment, backups and recovery.\n\n"
    "Every command works without Dagster, configured by environment variables (MAESTRO_HOME, "
    "MAESTRO_DATABASE_URL, MAESTRO_STORE_URL; none needed for the embedded default). Start with `maestro demo`; "
    "`maestro COMMAND --help` says more.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="The platform database: where it is, its migrations, the embedded server.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
tenants_app = typer.Typer(help="Tenants: each one a partition of the ML graph.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
backup_app = typer.Typer(
    help="Back up every Maestro database into the object store, and check what is there.\n\n"
    "The store is MAESTRO_STORE_URL (default: the store folder in MAESTRO_HOME). Needs no Dagster instance.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")
backup_app.add_typer(automation_app, name="automation")
restore_app = typer.Typer(invoke_without_command=True)  # its help: the callback's docstring
app.add_typer(restore_app, name="restore")

# Piped into a file or `less`, rich would draw tables 80 columns wide and crop ids and
# databases: without a terminal (and no COLUMNS) tables get room instead.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True)


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        out.print(f"maestro {version('maestro-pipelines')}", highlight=False)
    except PackageNotFoundError:  # run from a source tree that was never installed
        out.print("maestro (version unknown: the maestro-pipelines package is not installed)", highlight=False)
    raise typer.Exit()


@app.callback()
def _maestro(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the version of maestro-pipelines and exit."),
) -> None:
    pass


def _location():
    from maestro_pipelines.platform_db import locate_platform_database

    return locate_platform_database(load_settings())


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Option("head", metavar="REVISION", help="Alembic revision to upgrade to."),
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
        "", "--confirm", metavar="DATABASE", help="The database's name, to confirm: a downgrade drops tables and their data."
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
    """Server version, where the data lives, current migration and table sizes.

    Examples:

        maestro db status
        maestro db status --json"""
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

    url = EmbeddedPostgres(settings.home, wal_archiving=settings.wal_archiving,
                           backup_keys=settings.backup_keys_identity).start(keep_running=True)
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
    min_accuracy: float = typer.Option(None, help=f"Quality gate: accuracy floor (default {DEFAULT_GATES['accuracy']:.2f})."),
    min_f1: float = typer.Option(None, help=f"Quality gate: F1 floor (default {DEFAULT_GATES['f1']:.2f})."),
    min_roc_auc: float = typer.Option(None, help=f"Quality gate: ROC AUC floor (default {DEFAULT_GATES['roc_auc']:.2f})."),
    regression_tolerance: float = typer.Option(None, help=f"Allowed drop against production (default {DEFAULT_REGRESSION_TOLERANCE:.2f})."),
    as_json: bool = typer.Option(False, "--json", help="Print the tenant as JSON (for scripts)."),
) -> None:
    """Add a tenant; the tenant sensor gives it a partition, and requests its first training
    once its training rows are loaded (`maestro tenants load NAME FILE`)."""
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
    if as_json:
        out.print_json(json.dumps(_tenant_json(tenant)))
        return
    gates = ", ".join(f"{metric} >= {floor:g}" for metric, floor in tenant.gates.items())
    out.print(f"added tenant {tenant.name} (id {tenant.id}): quality gates {gates}, "
              f"regression tolerance {tenant.regression_tolerance:g}", highlight=False, soft_wrap=True)
    if load_settings().source_url is None:
        out.print(f"next: load its training rows with `maestro tenants load {tenant.name} FILE` (CSV or Parquet: "
                  "one numeric column per feature and a `label` column); the tenant sensor then requests its "
                  "first training", highlight=False, soft_wrap=True)
    else:
        out.print(f"next: the tenant sensor requests its first training once the table MAESTRO_SOURCE_URL "
                  f"names has rows for {tenant.name}", highlight=False, soft_wrap=True)


def _tenant_json(tenant) -> dict:
    return {"id": tenant.id, "name": tenant.name, "display_name": tenant.display_name, "status": tenant.status,
            "gates": tenant.gates, "regression_tolerance": tenant.regression_tolerance,
            "created_at": tenant.created_at.isoformat() if tenant.created_at else None}


@tenants_app.command("list")
def tenants_list(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Tenants with their status, training rows, production version and last training.

    --json keys per tenant: id, name, display_name, status, gates, regression_tolerance,
    created_at, rows (null when the source could not be counted), production_version (null:
    none deployed), deployed_at, last_training {status (running, failed, succeeded, or not registered: fit but refused by its gates), at, dagster_run_id} (null: none recorded),
    cannot_train (why the tenant's rows cannot train a model yet, or null).

    Trainings are recorded from the moment a model is fit: one that failed before (reading the
    rows, the train/test split) is only in Dagster's runs, so "none recorded" is not "never"."""
    from maestro_pipelines.platform_db.tenants import list_tenants, tenant_models

    with _platform_connection() as conn:
        tenants = list_tenants(conn, include_inactive=True)
        models = tenant_models(conn)
        rows = _tenant_row_counts(conn, [t.name for t in tenants])
        untrainable = _untrainable_tenants(conn, tenants, models, rows)
    listed = [_tenant_listing(t, models.get(t.name), rows.get(t.name), untrainable.get(t.name)) for t in tenants]
    if as_json:
        out.print_json(json.dumps(listed))
        return
    out.print(_tenants_table(listed))
    for t in listed:  # wrapped at the terminal's width, as the table is
        if t["cannot_train"]:
            out.print(f"{t['cannot_train']}; add rows with `maestro tenants load {t['name']} FILE`", highlight=False)
    if any(t["last_training"] is None and t["rows"] for t in listed):
        out.print("none recorded: a training that failed before fitting a model (reading the rows, the split) is "
                  "only in Dagster: Runs, filtered by tag dagster/partition=NAME", highlight=False)


def _untrainable_tenants(conn, tenants, models, rows: dict) -> dict[str, str]:
    """Why the rows of tenants without a model cannot train one yet: known on the embedded
    default (training_rows here), one aggregate per such tenant."""
    from maestro_pipelines.platform_db.training_rows import why_untrainable

    if load_settings().source_url is not None:
        return {}
    reasons = {}
    for tenant in tenants:
        if rows.get(tenant.name) and not getattr(models.get(tenant.name), "model_versions", 0):
            reason = why_untrainable(conn, tenant.name)
            if reason:
                reasons[tenant.name] = reason
    return reasons


def _tenants_table(listed: list[dict]) -> Table:
    """Five columns that fit 80: names never wrapped (they are typed into commands), a tenant's
    status only when it is not active, the display name the one column that wraps."""
    table = Table(title=counted(len(listed), "tenant"), title_justify="left")
    for column, justify in (("name", "left"), ("display name", "left"), ("rows", "right"),
                            ("production", "left"), ("last training (UTC)", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "display name")
    for t in listed:
        training = t["last_training"]
        table.add_row(
            t["name"] if t["status"] == "active" else f"{t['name']} ({t['status']})", t["display_name"],
            "?" if t["rows"] is None else f"{t['rows']:,}",
            f"v{t['production_version']}" if t["production_version"] is not None else "none",
            f"{training['at'][:16].replace('T', ' ')} {training['status']}" if training else "none recorded",
        )
    return table


def _tenant_listing(tenant, models, rows: int | None, cannot_train: str | None = None) -> dict:
    from datetime import timezone

    listing = {**_tenant_json(tenant), "rows": rows, "production_version": None, "deployed_at": None,
               "last_training": None, "cannot_train": cannot_train}
    if models is not None:
        listing["production_version"] = models.production_version
        listing["deployed_at"] = models.deployed_at.isoformat() if models.deployed_at else None
        if models.last_training_status is not None:
            listing["last_training"] = {"status": models.last_training_status,
                                        "at": models.last_training_at.astimezone(timezone.utc).isoformat(),
                                        "dagster_run_id": models.last_training_run_id}
    return listing


def _tenant_row_counts(conn, names: list[str]) -> dict[str, int]:
    """Training rows per tenant: counted in the platform database's training_rows on the
    embedded default, else asked of MAESTRO_SOURCE_URL (one grouped query where the source allows)."""
    from maestro_pipelines.platform_db.training_rows import row_counts

    settings = load_settings()
    if settings.source_url is None:
        counts = row_counts(conn)
        return {name: counts.get(name, 0) for name in names}
    from maestro_pipelines.environment import data_source

    counts: dict[str, int] = {}
    try:
        fingerprints = data_source(settings).tenant_fingerprints(names)
        counts = {name: fingerprints[name].row_count for name in names if name in fingerprints}
    except MaestroError as exc:
        err.print(f"[yellow]warning:[/yellow] rows not counted: {escape(str(exc))}", highlight=False, soft_wrap=True)
    return counts


@tenants_app.command("load")
def tenants_load(
    name: str = typer.Argument(..., help="The tenant (added with `maestro tenants add NAME`)."),
    file: Path = typer.Argument(..., help="A .csv or .parquet file: a header, one numeric column per feature, `label`."),
    key: str = typer.Option(None, "--key", help="The column identifying each row (default: entity_key, key or id if present)."),
    replace: bool = typer.Option(False, "--replace", help="Make the tenant's rows exactly the file's: rows not in it are deleted."),
    as_json: bool = typer.Option(False, "--json", help="Print what was loaded as JSON (for scripts)."),
) -> None:
    """Load a tenant's training rows from a CSV or Parquet file into the embedded default's
    `training_rows` (the tenant sensor then requests its first training).

    The file is the wide layout a spreadsheet or warehouse exports: a header line, one numeric
    column per feature, a `label` column (the class to learn), and optionally a key column
    naming each row (`entity_key`, `key` or `id`, or --key COLUMN). Every row is checked first:
    one bad row and nothing is loaded, and the error names each bad row by its line.

    A row whose key is already loaded is updated if it changed and left alone if not, so
    loading the same file again adds nothing; without a key column a row's content is its
    key. --replace deletes the tenant's rows that are not in the file. All in one transaction.

    Examples:

        maestro tenants add umbrella

        maestro tenants load umbrella umbrella.csv

        maestro tenants load umbrella export.parquet --key customer_id --replace

    Rows that cannot train a model yet (one label class, or too few for the train/test split:
    about 1 row in 5 is held out for testing) are loaded with a warning saying what they lack.

    --json keys: tenant, file, file_format, rows, inserted, updated, unchanged, deleted,
    features, key_column, tenant_rows, seconds, trainable."""
    from maestro_pipelines.platform_db.training_rows import file_format, load_training_rows

    _check_load_request(name, file, key)
    from maestro_pipelines.platform_db.tenants import tenant_models
    from maestro_pipelines.platform_db.training_rows import why_untrainable

    with _platform_connection() as conn, _RowProgress(file_format(file)) as progress:
        result = load_training_rows(conn, name, file, key_column=key, replace=replace, progress=progress)
        untrainable = why_untrainable(conn, name)
        models = tenant_models(conn).get(name)
        conn.commit()
    if untrainable:  # loaded all the same: the next file may bring the rows it lacks
        err.print(f"[yellow]warning:[/yellow] {untrainable}; add rows with `maestro tenants load {name} FILE` "
                  "(without --replace rows are added)", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps({**result.as_dict(), "trainable": untrainable is None}))
        return
    _print_load(result, file, replace, _after_load(result, untrainable, models))


def _check_load_request(name: str, file: Path, key: str | None) -> None:
    """The tenant's name, the file's layout and the settings, checked before any database is opened."""
    from maestro_pipelines.platform_db.tenants import validate_tenant_name
    from maestro_pipelines.platform_db.training_rows import file_layout, open_rows

    validate_tenant_name(name)
    if load_settings().source_url is not None:  # before the file: its columns would not matter
        raise MaestroError(
            "MAESTRO_SOURCE_URL is set: training reads tenants' rows from your database, not from the platform "
            "database this command loads", "Load the rows into the table MAESTRO_SOURCE_URL names (docs/architecture.md, "
            "\"The data source's table\", gives its columns), or unset MAESTRO_SOURCE_URL")
    table = open_rows(file)
    try:
        file_layout(table.columns, file.name, key)
    finally:
        table.close()


def _print_load(result, file: Path, replace: bool, next_step: str) -> None:
    key_text = f"key column {result.key_column}" if result.key_column else "no key column: rows keyed by content"
    deleted = f", {result.deleted:,} deleted" if replace else ""
    out.print(f"loaded {counted(result.rows, 'row')} of {file.name} into tenant {result.tenant} in {result.seconds:.1f} s: "
              f"{result.inserted:,} new, {result.updated:,} updated, {result.unchanged:,} unchanged{deleted} "
              f"({len(result.features)} features, {key_text})", highlight=False, soft_wrap=True)
    out.print(f"tenant {result.tenant} has {counted(result.tenant_rows, 'training row')}; {next_step}",
              highlight=False, soft_wrap=True)


def _after_load(result, untrainable: str | None, models) -> str:
    """What happens next, as the sensors will do it (sensors/tenants.py)."""
    name = result.tenant
    if models is not None and models.model_versions:
        return ("a tenant with a model is retrained by retraining_sensor (stopped by default) when its rows change; "
                f"to train now, launch train_and_deploy for partition {name} in the UI (Jobs > train_and_deploy > "
                "Materialize all)")
    if untrainable:
        return "the tenant sensor requests its first training once they can train a model"
    if not (result.inserted or result.updated or result.deleted):
        return ("none changed: the tenant sensor requests a first training only if none ran on these rows "
                "(`maestro tenants list`)")
    return "the tenant sensor requests its first training within a minute when Dagster runs (`maestro tenants list` shows it)"


class _RowProgress:
    """A progress bar for big files, drawn only when loading lasts (a small file draws none)."""

    SHOW_AFTER_SECONDS = 0.5

    def __init__(self, unit: str):
        import time

        self.unit, self.started_at, self.bar, self.task = unit, time.monotonic(), None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else None

    def __call__(self, done: int, total: int | None) -> None:
        import time

        if self.bar is None:
            if time.monotonic() - self.started_at < self.SHOW_AFTER_SECONDS:
                return
            from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            amount = DownloadColumn() if self.unit == "csv" else MofNCompleteColumn()
            self.bar = Progress(TextColumn("checking and loading rows"), BarColumn(), amount, TimeElapsedColumn(),
                                console=err, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("load", total=total)
        self.bar.update(self.task, completed=done, total=total)


def _store():
    """The object store from MAESTRO_STORE_URL (default: the `store` folder in MAESTRO_HOME),
    opened as ObjectStoreResource opens it."""
    from maestro_pipelines.storage import open_configured_store

    settings = load_settings()
    from maestro_pipelines.crypto import keyring_from_settings

    return open_configured_store(settings.store_url, settings.home, settings.store_environment,
                                 keyring=keyring_from_settings(settings))


def _progress(verb: str, keep: bool = True):
    """Progress on stderr: bars on a terminal, one line per step without (cli_progress.py)."""
    from maestro_pipelines.cli_progress import CommandProgress

    return CommandProgress(err, verb, keep)


def _entry_row(entry, now) -> dict:
    manifest = entry.manifest
    return {
        "id": entry.backup_id,
        "month": entry.month,
        "started_at": manifest.started_at.isoformat() if manifest else None,
        "snapshot_at": manifest.snapshot_at.isoformat() if manifest else None,
        # How old its data is: what restoring it now would lose.
        "age_s": round((now - manifest.snapshot_at).total_seconds(), 1) if manifest else None,
        "databases": [d.role for d in manifest.databases] if manifest else [],
        "dump_bytes": manifest.dump_bytes if manifest else None,
        "stored_bytes": entry.stored_bytes if manifest else None,
        "duration_s": round(manifest.duration_s, 3) if manifest else None,
        "verified": entry.verified,
        "verified_at": entry.verification.verified_at.isoformat() if entry.verified else None,
        "bad": entry.bad is not None,
        "problem": entry.bad,
        "encrypted": entry.encrypted if manifest else None,
        "unchecked": str(entry.key_error) if entry.unchecked else None,
    }


def _print_report(report) -> None:
    if report.ok and report.storage_only:
        out.print(
            f"backup {report.backup_id}: storage checks only: full verification needs the key "
            f"({report.storage_only}). {report.objects} objects read, sizes and sha256 match the manifest",
            highlight=False, soft_wrap=True,
        )
    elif report.ok:
        out.print(
            f"backup {report.backup_id} verified: {report.objects} objects, "
            f"{human_bytes(report.bytes_read)} read from the store (compressed), in {report.duration_s:.1f} s",
            highlight=False,
        )
    else:
        err.print(f"backup {report.backup_id} FAILED verification:", highlight=False)
        for problem in report.problems:
            err.print(f"  - {problem}", highlight=False, soft_wrap=True)


@backup_app.command("run")
def backup_run(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the backup once it is written."),
    level: int = typer.Option(None, metavar="LEVEL", help="zstd compression level (default: the library's measured choice)."),
    checksums: bool = typer.Option(
        True, "--checksums/--no-checksums", help="Per-table content checksums in the dump's snapshot."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON (for scripts)."),
    kind: str = typer.Option("all", "--kind", metavar="KIND",
                             help="dump: the logical dumps only; base: a base backup of each server only; "
                                  "all (default): both, the base backup where WAL archiving is on."),
) -> None:
    """Back up every Maestro database (platform, MLflow, Dagster's when on PostgreSQL) into the store.

    Each database is dumped from one snapshot, compressed, checksummed and uploaded; the
    manifest, written last, is what makes the backup exist. Then every object is read back
    (--no-verify skips it; an unverified backup is no restore point). Where the server
    archives its WAL, a base backup of the whole server follows (pg_basebackup, incremental
    on PostgreSQL 17+): with the archived WAL it restores to any point (`maestro restore
    --to-time`); where archiving is off a note says the RPO is the dumps'.

    Examples:

        maestro backup run
        maestro backup run --kind base
        maestro backup run --json
        MAESTRO_STORE_URL=s3://bucket/maestro maestro backup run"""
    from maestro_pipelines.backup import BackupOptions, backup_targets, create_backup, verify_backup

    if kind not in RUN_KINDS:
        raise MaestroError(f"--kind {kind!r} is not a kind of backup", "Use dump, base or all")

    options = BackupOptions(content_checksums=checksums)  # refuses a bad --level before anything is opened
    if level is not None:
        options = BackupOptions(compression_level=level, content_checksums=checksums)
    settings = load_settings()
    store = _store()
    targets, notes = backup_targets(settings)
    for note in notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    from maestro_pipelines.backup.sealing import unencrypted_warning

    if (warning := unencrypted_warning(store)) is not None:  # also in the manifest's notes
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    if kind == "base":
        _base_backup_run(store, targets, verify, as_json, required=True)
        return
    with _progress("dump") as progress:
        manifest = create_backup(store, targets, options, progress=progress, notes=notes, phases=progress.phase)
    report = None
    if verify:
        with _progress("verify") as progress:
            report = verify_backup(store, manifest.backup_id, progress=progress)
    base_run = _base_backup_run(store, targets, verify, as_json, required=False) if kind == "all" else None
    _print_backup_run(store, manifest, report, base_run, as_json)
    if (report is not None and not report.ok) or (base_run is not None and not base_run.ok):
        raise typer.Exit(1)


def _print_backup_run(store, manifest, report, base_run, as_json: bool) -> None:
    """`backup run`'s output: the dumps (a table, or JSON), their verification, the base backups."""
    if as_json:
        summary = {
            "base_backups": _base_run_summary(base_run) if base_run else None,
            "id": manifest.backup_id,
            "encrypted": manifest.encrypted,
            "store": store.url,
            "databases": {d.role: {"database": d.database, "dump_bytes": d.dump_bytes, "stored_bytes": d.compressed_bytes,
                                   "rows": d.rows, "tables": len(d.tables)} for d in manifest.databases},
            "duration_s": round(manifest.duration_s, 3),
            "verified": report.ok if report else None,
            "problems": report.problems if report else [],
        }
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"backup {manifest.backup_id} in {store.url}", title_justify="left")
    for column, justify in (("database", "left"), ("role", "left"), ("tables", "right"), ("rows", "right"),
                            ("dump", "right"), ("stored", "right"), ("time", "right")):
        table.add_column(column, justify=justify)
    for d in manifest.databases:
        table.add_row(d.database, d.role, str(len(d.tables)), f"{d.rows:,}", human_bytes(d.dump_bytes),
                      human_bytes(d.compressed_bytes), f"{d.duration_s:.1f} s")
    _print_titled(table)
    if report is not None:
        _print_report(report)
    if base_run is not None:
        _print_base_run(base_run)


# ---- backup run: base backups (the physical tier, issue 16) ----

RUN_KINDS = ("dump", "base", "all")


def _base_backup_run(store, targets, verify: bool, as_json: bool, required: bool):
    """A base backup of each server (verified); `required` (--kind base): a server that cannot
    be backed up this way is an error, else a note saying its RPO is the dumps'."""
    from maestro_pipelines.backup.pitr.base import take_base_backups

    with _progress("base backup") as progress:
        run = take_base_backups(store, targets, verify=verify, required=required, progress=progress,
                                log=lambda line: err.print(line, highlight=False, soft_wrap=True))
    for line in run.skipped:
        err.print(f"note: {line}", highlight=False, soft_wrap=True)
    if required:
        if as_json:
            out.print_json(json.dumps(_base_run_summary(run)))
        else:
            _print_base_run(run)
        if not run.ok:
            raise typer.Exit(1)
    return run


def _base_run_summary(run) -> dict:
    return {
        "taken": [{"id": r.base_id, "system_id": r.system_id, "kind": r.kind, "parent": r.parent, "where": r.where,
                   "start_wal": r.start_wal, "stop_wal": r.stop_wal, "tar_bytes": r.tar_bytes,
                   "stored_bytes": r.compressed_bytes, "duration_s": r.duration_s} for r in run.records],
        "verified": {rep.base_id: rep.ok for rep in run.reports},
        "problems": [p for rep in run.reports for p in rep.problems],
        "skipped": run.skipped,
    }


def _print_base_run(run) -> None:
    for record in run.records:
        parent = f" on {record.parent}" if record.parent else ""
        out.print(f"base backup {record.base_id} of {record.where}: {record.kind}{parent}, "
                  f"{human_bytes(record.tar_bytes)} ({human_bytes(record.compressed_bytes)} stored) in "
                  f"{record.duration_s:.1f} s, WAL {record.start_wal} to {record.stop_wal}", highlight=False)
    for report in run.reports:
        if report.ok:
            out.print(f"base backup {report.base_id} verified (pg_verifybackup)", highlight=False)
        else:
            err.print(f"base backup {report.base_id} FAILED verification: {'; '.join(report.problems)}",
                      highlight=False, soft_wrap=True)


@backup_app.command("list")
def backup_list(
    monthly: bool = typer.Option(False, "--monthly", help="List the monthly archives instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """Committed backups, oldest first: id, age, stored size, verified.

    The id is the backup's start time (UTC); the age is its data's. Stored: what the backup takes
    in the store, compressed (its dumps and its list of model artifacts; --json has dump_bytes,
    the dumps unpacked, what a restore writes out). Verified: yes; no; BAD (its
    verification failed, or an object is missing or changed since, found by one cheap head per
    object). Sealed: yes (encrypted, its signature checked with the key); no key (encrypted,
    and the key it needs is not configured: listed unchecked); no (plaintext). `maestro
    backup info` says whether that is enough."""
    from maestro_pipelines.backup import check_objects, list_backups
    from maestro_pipelines.backup.manifest import utcnow
    from maestro_pipelines.formatting import human_duration

    store = _store()
    entries = list_backups(store, monthly=monthly)
    for entry in entries:
        if entry.verified:
            check_objects(store, entry)  # one head per object: what is listed as good still is
    now = utcnow()
    if as_json:
        out.print_json(json.dumps([_entry_row(e, now) for e in entries]))
        _print_interrupted_swaps(store)  # on stderr: the JSON on stdout stays the list
        return
    kind = ("monthly archive" if monthly else "backup") + ("" if len(entries) == 1 else "s")
    table = Table(title=f"{len(entries)} {kind} in {store.url}", title_justify="left")
    # An id is its backup's start time (UTC, to the second), so the table shows the age instead
    # of the time again: an 80-column terminal fits five columns (archives show their month
    # instead of databases).
    for column, justify in (("id", "left"), ("month", "left"), ("age", "right"),
                            ("databases", "left"), ("stored", "right"), ("verified", "left"), ("sealed", "left")):
        if (column == "month" and not monthly) or (column == "databases" and monthly):
            continue
        # Ids and times are copied into other commands: never wrapped or cut.
        table.add_column(column, justify=justify, no_wrap=column != "databases", min_width=8 if column == "databases" else None)
    for entry in entries:
        row = _entry_row(entry, now)
        verified = "yes" if entry.verified else ("[red]BAD[/red]" if entry.bad else "no")
        cells = [entry.backup_id] + ([entry.month or ""] if monthly else []) + [
            human_duration(row["age_s"]) if entry.manifest else "?",
        ] + ([] if monthly else [",".join(row["databases"])]) + [
            human_bytes(entry.stored_bytes) if entry.manifest else "?",
            verified,
            _sealed_cell(entry),
        ]
        table.add_row(*cells)
    _print_titled(table)
    for entry in entries:
        if entry.bad:
            err.print(f"{entry.backup_id}: {entry.bad}", highlight=False, soft_wrap=True)
    unchecked = [e for e in entries if e.unchecked]
    if unchecked:
        err.print(f"{counted(len(unchecked), 'backup is', 'backups are')} encrypted with a key not configured here, "
                  f"listed unchecked (storage checks only): {escape(str(unchecked[-1].key_error))}", highlight=False, soft_wrap=True)
    _print_interrupted_swaps(store)


def _sealed_cell(entry) -> str:
    """`backup list`'s sealed column: encrypted (its MAC checked), encrypted without the key
    here (unchecked), or plaintext."""
    if entry.manifest is None:
        return "?"
    if not entry.encrypted:
        return "no"
    return "no key" if entry.unchecked else "yes"


def _print_interrupted_swaps(store) -> None:
    """What the store's swap journals say (no server is read: `maestro restore status` does)."""
    from maestro_pipelines.backup.journal import interrupted_swaps

    for journal in interrupted_swaps(store):
        err.print(f"[red]HALF-DONE RESTORE:[/red] {journal.summary()}. Run `maestro restore status`, then "
                  "`maestro restore finish` or `maestro restore undo`", highlight=False, soft_wrap=True)


@backup_app.command("info")
def backup_info_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for scripts and monitoring)."),
) -> None:
    """Is the database protected, and since when? Start here on call: status, RPO, what to do.

    Like `pgbackrest info`: a status line (ok, warning or error, and why, with the command that
    helps), the latest and the oldest restorable backup and their age, the RPO now against its target (26 h), the last
    backups' sizes, durations and verification, the monthly archives, the latest drill, and
    anything half done (a backup running, one killed, a live restore stopped half way). Reads
    only the store (one head per object of each verified backup), never a database.

    Exit code: 0 ok, 1 warning, 2 error (a store that cannot be read is an error): the
    monitoring-plugin convention, so a check can run it as it is.

    --json keys: status, reasons [{level, message, hint}], checked_at, store,
    rpo {target_s, age_s, ok}, latest and oldest (a backup or null), restorable, backups,
    recent (the last 5 backups, latest first), monthly, running, killed, unfinished,
    half_done_restores, automation {stopped_by_default, turn_on}, drill. A backup: id, month,
    started_at, snapshot_at, age_s, databases, dump_bytes, stored_bytes, duration_s, verified,
    verified_at, bad, problem. Times are ISO 8601 UTC, *_s seconds, *_bytes bytes."""
    from maestro_pipelines.backup.info import backup_info, store_unreadable
    from maestro_pipelines.storage.urls import printable_store_url

    stopped = False
    url = "the configured store"
    try:
        settings = load_settings()
        url = printable_store_url(settings.store_url) if settings.store_url else "the default store in MAESTRO_HOME"
        stopped = settings.uses_embedded_database
        store = _store()
        url = store.url
        info = backup_info(store, automation_stopped=stopped)
    except MaestroError as exc:
        info = store_unreadable(url, str(exc), automation_stopped=stopped)
    if as_json:
        out.print_json(json.dumps(info.as_dict()))
    else:
        _print_info(info)
    raise typer.Exit(info.exit_code)


def _print_info(info) -> None:
    from maestro_pipelines.formatting import human_duration


    def line(key: str, value: str) -> None:
        _print_keyed(key, value)

    colour = {"ok": "green", "warning": "yellow", "error": "red"}[info.status]
    out.print(f"{'status':<12}[{colour}]{escape(info.status_line())}[/{colour}]", highlight=False, soft_wrap=True)
    for finding in info.findings:
        line("", f"{finding.level}: {finding.message}")
        if finding.hint:
            line("", f"  {finding.hint}")
    line("store", info.store_url)
    if not info.readable:
        _print_automation(info)
        return
    line("restorable", f"{info.restorable} of {len(info.backups) + len(info.archives)} backups (monthly archives included)")
    line("  latest", _info_backup(info, info.latest) if info.latest else "none (what `maestro restore` takes by default)")
    line("  oldest", _info_backup(info, info.oldest) if info.oldest else "none")
    target = human_duration(info.rpo_target.total_seconds())
    if info.rpo is None:
        line("RPO", f"none: nothing to restore from (target {target})")
    else:
        judged = "ok" if info.rpo <= info.rpo_target else "MISSED"
        line("RPO", f"{human_duration(info.rpo.total_seconds())} (target {target}): {judged}")
    for n, archive in enumerate(info.archives):
        state = "verified" if archive.verified else "BAD" if archive.bad else "not verified"
        age = f", data {human_duration(info.age(archive).total_seconds())} old" if archive.manifest else ""
        line("" if n else "monthly", f"{archive.month}  {archive.backup_id}  {state}{age}")
    if not info.archives:
        line("monthly", "none yet (`maestro backup archive`)")
    line("drill", _info_drill(info.drill))
    _print_recovery_windows(info)
    _print_encryption(info.encryption)
    _print_automation(info)
    for activity in info.running:
        line("running", f"{activity.kind} {activity.ident} since {activity.started_at:%Y-%m-%d %H:%M:%S} UTC "
             f"on {activity.host} (pid {activity.pid})")
    if info.backups:
        out.print(_recent_table(info))


def _print_automation(info) -> None:
    """What the backup schedules and sensors start as. Not whether they run now: that is Dagster's
    state, which this command (reading only the store) never sees; the status command reads it."""
    from maestro_pipelines.automation import AUTOMATION_ON_COMMAND, AUTOMATION_STATUS_COMMAND

    if info.automation_stopped:
        said = ("on the embedded default the backup schedules and sensors start stopped; see "
                f"`{AUTOMATION_STATUS_COMMAND}`, turn them on with `{AUTOMATION_ON_COMMAND}`")
    else:
        said = ("the backup schedules and sensors start running (MAESTRO_DATABASE_URL is set) unless "
                f"stopped in the Dagster UI; see `{AUTOMATION_STATUS_COMMAND}`")
    _print_keyed("automation", said)


def _print_encryption(status) -> None:
    """`backup info`'s lines of the keys: ids only, never a key."""
    if status.current:
        required = " (MAESTRO_BACKUP_ENCRYPTION=required)" if status.required else ""
        _print_keyed("encryption", f"new backups are encrypted under backup key {status.current} ({status.source}){required}")
        _print_keyed("", f"  {status.current}: {counted(status.records.get(status.current, 0), 'record')}")
    else:
        _print_keyed("encryption", "none: new backups are not encrypted (`maestro backup keygen` makes a key for "
                     "MAESTRO_BACKUP_KEY)")
    for kek in status.old:
        needed = status.records.get(kek, 0)
        _print_keyed("", f"  old key {kek} can be retired: no record needs it" if not needed else
                     f"  old key {kek} is still needed by {counted(needed, 'record')}: run `maestro backup rekey`")
    for kek, records in status.unconfigured.items():
        _print_keyed("", f"  {kek}: {counted(records, 'record')}, NOT CONFIGURED: those backups cannot be read")
    if status.plain:
        _print_keyed("", f"  not encrypted: {counted(status.plain, 'record')} (backups taken without a key)")


def _rekey_test_pause():
    """Tests only: MAESTRO_TEST_REKEY_PAUSE=`STAGE:N` makes the rekey say so on stderr and wait
    for a line on stdin when the Nth record it rewrites reaches STAGE (`prepared`: rewrapped,
    not put; `writing`: inside the put; `written`: put), so a test can kill it exactly there."""
    value = os.environ.get("MAESTRO_TEST_REKEY_PAUSE")
    if not value:
        return None
    stage, _, count = value.partition(":")

    def checkpoint(at: str, n: int, key: str) -> None:
        if at == stage and n == int(count):
            sys.stderr.write(f"rekey paused {at} {n}: {key}\n")
            sys.stderr.flush()
            sys.stdin.readline()

    return checkpoint


@backup_app.command("keygen")
def backup_keygen() -> None:
    """Print a new backup key (32 random bytes, base64) for MAESTRO_BACKUP_KEY.

    Only the key goes to stdout, so it can go straight into your secret store; keep it there
    and never in the store it protects (a key beside the backups protects nothing) nor in a
    repository. Losing it loses every backup encrypted under it:
    docs/runbooks/lost-or-leaked-backup-key.md.

    Examples:
        maestro backup keygen
        maestro backup keygen > new-key.txt  # then into the secret store, and shred the file
    """
    from maestro_pipelines.crypto import generate_key
    from maestro_pipelines.crypto.keys import parse_local_key

    key = generate_key()
    sys.stdout.write(key + "\n")
    sys.stdout.flush()
    err.print(f"a new backup key, id {parse_local_key(key, 'the new key').id} (what `maestro backup info` shows): "
              "keep it in your secret store as MAESTRO_BACKUP_KEY, never in the backup store or a repository; "
              "without it its backups cannot be read", highlight=False, soft_wrap=True)


@backup_app.command("rekey")
def backup_rekey(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be rewrapped and what needs a key; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
) -> None:
    """Rewrap every backup's data key under the current backup key, after a key rotation.

    Set the new key (MAESTRO_BACKUP_KEY or MAESTRO_BACKUP_KMS_KEY_ID) and the old ones in
    MAESTRO_BACKUP_OLD_KEYS, then run this: every record that holds a data key (manifests,
    verification and base backup records, WAL key records, drill records, monthly archives
    included) wrapped by another key is rewrapped and rewritten, one record at a time, each in
    one atomic write. No data is read or rewritten. Killed at any point, every backup is still
    readable with the old or the new key; run it again to finish. Then `maestro backup info`
    says which old key can be retired.

    Exit code 1 when a record needs a key that is not configured (named), or was not rewritten
    (damaged, forged): the others are done.

    Examples:
        maestro backup rekey --dry-run
        MAESTRO_BACKUP_OLD_KEYS="$OLD_KEY" MAESTRO_BACKUP_KEY="$NEW_KEY" maestro backup rekey"""
    from maestro_pipelines.backup.rekey import rekey_store

    store = _store()
    with _progress("rekey", keep=False) as progress:
        report = rekey_store(store, dry_run=dry_run, phases=progress.phase, checkpoint=_rekey_test_pause())
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        _print_rekey(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_rekey(report) -> None:
    from maestro_pipelines.backup.rekey import needs_key_hint

    verb = "would be rewrapped" if report.dry_run else "rewrapped"
    out.print(f"rekey of {report.store_url} under backup key {report.kek_id}: {counted(len(report.rewrapped), 'record')} "
              f"{verb}, {len(report.current)} already under it, {report.plain} not encrypted (skipped)",
              highlight=False, soft_wrap=True)
    for kek, records in report.needs_key.items():
        shown = ", ".join(records[:5]) + (f" and {len(records) - 5} more (--json lists all)" if len(records) > 5 else "")
        out.print(f"still need backup key {kek}, which is not configured: {counted(len(records), 'record')} ({shown}). "
                  f"{needs_key_hint(kek)}", highlight=False, soft_wrap=True)
    for key, problem in report.problems.items():
        out.print(f"not rewrapped: {key}: {problem}", highlight=False, soft_wrap=True)
    if report.ok and not report.dry_run:
        out.print(f"every encrypted record is under {report.kek_id}: `maestro backup info` says which old key can be "
                  "retired", highlight=False, soft_wrap=True)


def _print_keyed(key: str, value: str) -> None:
    """`key        value`, the value wrapped at the terminal's width under itself (an 80-column
    terminal would otherwise break it under the key). Text, not markup: a store's error may
    hold brackets (`[Errno 2]`, a path)."""
    from rich.text import Text

    indent = len(value) - len(value.lstrip(" "))  # a hint under its finding: kept when wrapped
    grid = Table.grid()
    grid.add_column(width=12 + indent, no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(Text(key), Text(value[indent:]))
    out.print(grid)


def _print_recovery_windows(info) -> None:
    """`backup info`'s lines of the physical tier: the recovery window of each server."""
    if not info.pitr:
        _print_keyed("PITR", "no base backup or archived WAL (`maestro backup run --kind base`)")
    for window in info.pitr:
        if window.recoverable:
            age = human_duration((info.checked_at - window.latest_time).total_seconds())
            shown = (f"{window.earliest_time:%Y-%m-%d %H:%M:%S} to {window.latest_time:%Y-%m-%d %H:%M:%S} UTC "
                     f"(latest {age} ago, WAL {window.latest_wal})")
        else:
            shown = "nothing recoverable"
        _print_keyed("PITR", f"server {window.system_id}: {shown}")
        _print_keyed("", f"  {len(window.usable)} of {len(window.bases)} base backups usable, {window.segments} WAL "
                     f"segments ({human_bytes(window.wal_bytes)}), {len(window.gaps)} gaps")
        for gap in window.gaps:
            _print_keyed("", f"  gap: {gap.describe()}" + (" (after the newest verified base backup)"
                                                           if gap.after_newest_verified else ""))


def _info_backup(info, entry) -> str:
    from maestro_pipelines.formatting import human_age

    where = f" (monthly archive {entry.month})" if entry.month else ""
    return (f"{entry.backup_id}{where}: data as of {entry.manifest.snapshot_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{human_age(info.age(entry).total_seconds())}")


def _info_drill(drill) -> str:
    from maestro_pipelines.formatting import human_duration

    if drill is None:
        return "none recorded (`maestro drill` runs one)"
    rto = f", RTO {human_duration(drill.rto_s)} (target {human_duration(drill.rto_target_s)})" if drill.rto_s is not None else ""
    return f"{drill.started_at:%Y-%m-%d %H:%M} UTC ({drill.where}): {'ok' if drill.ok else 'FAILED'}{rto}"


def _recent_table(info) -> Table:
    from maestro_pipelines.backup.info import RECENT_BACKUPS
    from maestro_pipelines.formatting import human_duration

    shown = list(reversed(info.backups[-RECENT_BACKUPS:]))
    table = Table(title=f"last {len(shown)} of {len(info.backups)} backups, latest first", title_justify="left")
    for column, justify in (("id", "left"), ("age", "right"), ("stored", "right"), ("duration", "right"),
                            ("verified", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for entry in shown:
        manifest = entry.manifest
        verified = "yes" if entry.verified else ("[red]BAD[/red]" if entry.bad else "no")
        table.add_row(entry.backup_id, human_duration(info.age(entry).total_seconds()) if manifest else "?",
                      human_bytes(entry.stored_bytes) if manifest else "?",
                      human_duration(manifest.duration_s) if manifest else "?", verified)
    return table


@backup_app.command("verify")
def backup_verify(
    backup_id: str = typer.Argument(
        "latest", help="A backup id from `maestro backup list`, or `latest`: the latest backup taken, "
                       "verified or not (`newest` is accepted too)."),
    month: str = typer.Option(None, metavar="MONTH", help="Verify the monthly archive of this month (YYYY-MM) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
    kind: str = typer.Option("dump", "--kind", metavar="KIND",
                             help="dump (default): a backup of dumps; base: a base backup (ids in `maestro backup info`); "
                                  "wal: every archived WAL segment a recovery can need."),
) -> None:
    """Re-read every object of a backup: sizes, sha256, each dump readable by pg_restore --list
    (--kind base: a base backup read whole and checked against its manifest by pg_verifybackup;
    --kind wal: every WAL segment from the oldest usable base backup on, read back and checked).

    An encrypted backup without its key gets storage checks only (sizes and sha256 of the
    sealed objects): said so, and not recorded as verified. Exits non-zero when anything is wrong.

    Examples:

        maestro backup verify
        maestro backup verify 20261126T020000Z-3f2a1b --json
        maestro backup verify latest --month 2026-10
        maestro backup verify latest --kind base
        maestro backup verify --kind wal"""
    from maestro_pipelines.backup import BackupNotFound, list_backups, verify_backup
    from maestro_pipelines.backup.catalog import is_latest

    store = _store()
    if kind not in ("dump", "base", "wal"):
        raise MaestroError(f"--kind {kind!r} is not a kind of backup to verify", "Use dump, base or wal")
    if kind == "base":
        _verify_base(store, backup_id, month, as_json)
        return
    if kind == "wal":
        _verify_wal(store, as_json)
        return
    if is_latest(backup_id):
        entries = list_backups(store, monthly=month is not None)
        entries = [e for e in entries if month is None or e.month == month]
        if not entries:
            raise BackupNotFound(f"There is no backup in the store at {store.url}", "Run `maestro backup run` first")
        backup_id = entries[-1].backup_id
    with _progress("verify") as progress:
        report = verify_backup(store, backup_id, month=month, progress=progress)
    if as_json:
        out.print_json(json.dumps({"id": report.backup_id, "ok": report.ok, "problems": report.problems,
                                   "objects": report.objects, "bytes_read": report.bytes_read,
                                   "duration_s": report.duration_s, "storage_only": report.storage_only}))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _verify_base(store, base_id: str, month, as_json: bool) -> None:
    """`maestro backup verify --kind base`: the base backup (or the newest) read and checked."""
    from maestro_pipelines.backup import BackupNotFound
    from maestro_pipelines.backup.catalog import is_latest
    from maestro_pipelines.backup.pitr.base import list_base_backups, verify_base_backup

    if is_latest(base_id):
        entries = sorted(list_base_backups(store, month=month), key=lambda e: e.base_id)
        if not entries:
            raise BackupNotFound(f"There is no base backup in the store at {store.url}",
                                 "Run `maestro backup run --kind base` first")
        base_id = entries[-1].base_id
    with _progress("verify") as progress:
        report = verify_base_backup(store, base_id, month=month, progress=progress)
    if as_json:
        out.print_json(json.dumps({"id": report.base_id, "system_id": report.system_id, "ok": report.ok,
                                   "problems": report.problems, "bytes_read": report.bytes_read,
                                   "duration_s": report.duration_s, "storage_only": report.storage_only}))
    elif report.ok and report.storage_only:
        out.print(f"base backup {report.base_id}: storage checks only: full verification needs the key "
                  f"({report.storage_only}). {human_bytes(report.bytes_read)} read, sizes and sha256 match its record",
                  highlight=False, soft_wrap=True)
    elif report.ok:
        out.print(f"base backup {report.base_id} verified: {human_bytes(report.bytes_read)} read, files match its "
                  f"backup manifest (pg_verifybackup), in {report.duration_s:.1f} s", highlight=False)
    else:
        err.print(f"base backup {report.base_id} FAILED verification: {'; '.join(report.problems)}",
                  highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def _verify_wal(store, as_json: bool) -> None:
    """`maestro backup verify --kind wal`: each server's archived WAL read back."""
    from maestro_pipelines.backup import BackupNotFound
    from maestro_pipelines.backup.pitr.window import servers_in_store, verify_wal

    servers = servers_in_store(store)
    if not servers:
        raise BackupNotFound(f"There is no archived WAL in the store at {store.url}",
                             "Turn WAL archiving on (docs/configuration.md, WAL archiving)")
    with _progress("verify") as progress:
        reports = [verify_wal(store, system_id, progress) for system_id in servers]
    if as_json:
        out.print_json(json.dumps([{"system_id": r.system_id, "ok": r.ok, "first": r.first, "last": r.last,
                                    "segments": r.segments, "bytes_read": r.bytes_read, "problems": r.problems,
                                    "storage_only": r.storage_only, "storage_segments": r.storage_segments}
                                   for r in reports]))
    for report in [] if as_json else reports:
        if report.ok and report.storage_only:
            out.print(f"WAL of server {report.system_id}: {report.segments} segments ({report.first} to {report.last}), "
                      f"{human_bytes(report.bytes_read)} read; storage checks only for {report.storage_segments} of them: "
                      f"full verification needs the key ({report.storage_only}). Sizes and sha256 match, key records there",
                      highlight=False, soft_wrap=True)
        elif report.ok:
            out.print(f"WAL of server {report.system_id}: {report.segments} segments ({report.first} to {report.last}), "
                      f"{human_bytes(report.bytes_read)} read, each the bytes archived", highlight=False)
        for problem in report.problems:
            err.print(f"WAL of server {report.system_id} FAILED: {problem}", highlight=False, soft_wrap=True)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@backup_app.command("retention")
def backup_retention(
    daily: int = typer.Option(DAILY_BACKUPS_KEPT, metavar="DAYS", help="Days (with backups) whose latest backup is kept."),
    monthly: int = typer.Option(MONTHLY_ARCHIVES_KEPT, metavar="MONTHS", help="Monthly archives kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted, delete nothing."),
) -> None:
    """Delete backups beyond the retention policy, and leftovers of backups that never finished.

    Never the latest verified backup, never while a backup or restore runs.

    Examples:

        maestro backup retention --dry-run
        maestro backup retention --daily 14 --monthly 12"""
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
    _print_base_retention(plan.pitr, verb)


def _print_base_retention(plans, verb: str) -> None:
    """The physical tier's part of `backup retention`: base backups and WAL of each server."""
    for plan in plans:
        for base_id, why in plan.delete:
            out.print(f"{verb} base backup {base_id} of server {plan.system_id}: {why}", highlight=False)
        for root in plan.delete_incomplete:
            out.print(f"{verb} {root}: never finished (no base.json)", highlight=False)
        cutoff = f" (before {plan.wal_cutoff}, the oldest kept base backup's start)" if plan.wal_cutoff else ""
        out.print(f"server {plan.system_id}: kept {len(plan.keep)} base backups, {verb} {len(plan.delete)}; "
                  f"{verb} {len(plan.delete_wal)} WAL files{cutoff}", highlight=False)


@backup_app.command("archive")
def backup_archive(
    month: str = typer.Option(None, metavar="MONTH", help="Month to archive, YYYY-MM (default: the previous month in MAESTRO_TIMEZONE)."),
) -> None:
    """Copy (server-side) the latest verified backup of MONTH to the monthly/ prefix."""
    from maestro_pipelines.backup import archive_month
    from maestro_pipelines.backup.archive import check_archive_month
    from maestro_pipelines.clock import checked_timezone, previous_month
    from maestro_pipelines.backup.manifest import utcnow

    if month is None:  # the previous month on the schedules' clock, as the asset's default
        month = previous_month(utcnow(), checked_timezone(load_settings().timezone))
    check_archive_month(month)  # before the store is opened
    store = _store()
    _archive_base_backups(store, month)
    entry, copied = archive_month(store, month)
    state = "archived" if copied else "already archived"
    out.print(f"{state}: backup {entry.backup_id} as {entry.root}", highlight=False)


def _archive_base_backups(store, month: str) -> None:
    """`backup archive`'s physical tier: a base backup (its chain) and the WAL that makes it consistent."""
    from maestro_pipelines.backup.archive import archive_base_backups

    for system_id, base_id, copied in archive_base_backups(store, month):
        state = "archived" if copied else "already archived"
        out.print(f"{state}: base backup {base_id} of server {system_id} with the WAL to make it consistent",
                  highlight=False)


def _destinations():
    from maestro_pipelines.backup import database_targets

    targets, notes = database_targets(load_settings())
    return targets, notes


def _steps_table(title: str, steps) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)  # seconds to the millisecond: --json
    table.add_column("detail", overflow="fold")
    for step in steps:
        table.add_row(step.name, human_duration(step.seconds), step.detail)
    return table


@restore_app.callback()
def restore(
    ctx: typer.Context,
    backup: str = typer.Option("latest", metavar="ID", help="Backup id, or `latest`: the latest verified backup (`newest` is accepted too)."),
    before: str = typer.Option(None, metavar="TIME", help="Instead: the latest verified backup taken before this time (ISO 8601, UTC if no zone)."),
    target: str = typer.Option("scratch", metavar="scratch|live", help="`scratch`: next to the live databases; `live`: in their place."),
    confirm: str = typer.Option(
        None, "--confirm", metavar="DATABASE",
        help="Required with --target live: the platform database's name (or, when --databases leaves the platform "
             "database out, the first database restored, e.g. Dagster's).",
    ),
    databases: str = typer.Option(None, metavar="ROLES", help="Comma-separated roles to restore (platform,mlflow,dagster); default all."),
    jobs: int = typer.Option(2, metavar="N", help="pg_restore parallel jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
    to_time: str = typer.Option(None, "--to-time", metavar="TIME|latest",
                                help="Instead of a backup: the databases as they were at this time (ISO 8601; no zone: "
                                     "MAESTRO_TIMEZONE, else UTC), or `latest`: the newest recoverable point (base backup + WAL)."),
    to_lsn: str = typer.Option(None, "--to-lsn", metavar="LSN", help="Instead of a backup: as they were at this WAL position: everything written before it (e.g. 0/3000060, a point reached)."),
    system_id: str = typer.Option(None, "--system-id", metavar="ID", help="With --to-time/--to-lsn: the server to recover, when the store holds several."),
) -> None:
    """Restore a backup into scratch databases (default), or in place of the live ones.

    Every object of the backup is checked before any database is touched; each database is
    restored next to the live one and compared with the backup (row counts, checksums). A live
    restore (--target live --confirm DATABASE) then swaps the verified copies into place in one
    step and keeps the old databases until `maestro restore cleanup`. Needs only the databases
    and MAESTRO_STORE_URL: works when Dagster is down.

    Examples:

        maestro restore
        maestro restore --before 2026-11-26T14:00:00Z
        maestro restore --backup 20261126T020000Z-3f2a1b --databases platform
        maestro restore --target live --confirm maestro
        maestro restore --to-time 2026-11-26T14:04:00Z
        maestro restore --to-time latest --target live --confirm maestro
        maestro restore cleanup --dry-run

    With --to-time or --to-lsn: a temporary server is recovered from the newest base backup
    before that point plus the archived WAL (`maestro backup info` shows the recovery window),
    and the databases are delivered from it the same way."""
    if ctx.invoked_subcommand is not None:
        return
    if to_time is not None or to_lsn is not None:
        return _restore_to_point(to_time, to_lsn, backup, before, target, confirm, databases, jobs, as_json, system_id)
    from maestro_pipelines.backup import resolve_restore_point, restore_backup
    from maestro_pipelines.backup.restore import check_restore_request, parse_before

    roles = [r.strip() for r in databases.split(",")] if databases is not None else None
    check_restore_request(target, roles, jobs)  # before the store or a server is touched
    moment = parse_before(before, "--before")
    store = _store()
    entry = resolve_restore_point(store, backup, before=moment, log=lambda message: err.print(message, markup=False, highlight=False, soft_wrap=True))
    destinations, _notes = _destinations()
    # restore_backup says "restoring ... into ..." itself, once its refusals are behind it.
    with _progress("download", keep=False) as progress:
        report = restore_backup(
            store, entry, destinations, target=target, confirm=confirm, roles=roles, jobs=jobs, progress=progress,
            log=lambda message: err.print(message, markup=False, highlight=False, soft_wrap=True), phases=progress.phase,
        )
    _print_restore_report(report, as_json)


def _print_restore_report(report, as_json: bool) -> None:
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
    _print_titled(_steps_table(f"restore of backup {report.backup_id}: {human_duration(report.duration_s)}", report.steps))
    for d in report.databases:
        where_now = f"swapped into place as {d.live}" if d.restored_as == d.live and report.target == "live" else f"in {d.restored_as}"
        kept = f"; the old one is kept as {d.kept_as}" if d.kept_as else ""
        out.print(f"{d.role}: {counted(d.tables, 'table')}, {counted(d.rows, 'row')} equal to the backup, "
                  f"{where_now}{kept}", highlight=False, soft_wrap=True)
    if report.missing_artifacts:
        err.print(f"[yellow]warning:[/yellow] {len(report.missing_artifacts)} model artifacts listed in the backup are "
                  f"missing from the store: {', '.join(report.missing_artifacts[:10])}", highlight=False)
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    _print_cleanup_hint([d.live for d in report.databases if d.role == "platform"])


# ---- maestro restore --to-time / --to-lsn (point-in-time recovery) --------------------------


def _restore_to_point(to_time, to_lsn, backup, before, target, confirm, databases, jobs, as_json, system_id) -> None:
    from maestro_pipelines.backup.catalog import is_latest
    from maestro_pipelines.backup.pitr.recover import RecoveryTarget
    from maestro_pipelines.backup.pitr.restore import restore_to_point
    from maestro_pipelines.backup.restore import check_restore_request

    if before is not None or not is_latest(backup):
        given = "--before" if before is not None else f"--backup {backup}"
        raise MaestroError(f"{given} and --to-time/--to-lsn name two restore points",
                           "Give one: a backup (--backup, --before) or a point in time (--to-time, --to-lsn)")
    roles = [r.strip() for r in databases.split(",")] if databases is not None else None
    check_restore_request(target, roles, jobs)
    point = RecoveryTarget.parse(to_time, to_lsn, checked_timezone_setting())
    store = _store()
    destinations, _notes = _destinations()
    say = lambda message: err.print(message, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    with _progress("download", keep=False) as progress:
        report = restore_to_point(store, point, destinations, roles=roles, target_mode=target, confirm=confirm,
                                  jobs=jobs, system_id=system_id, progress=progress, log=say, phases=progress.phase)
    _print_point_report(report, point, as_json)


def checked_timezone_setting() -> str:
    from maestro_pipelines.clock import checked_timezone

    return checked_timezone(load_settings().timezone)


def _print_point_report(report, point, as_json: bool) -> None:
    reached = {"time": report.reached_time.isoformat() if report.reached_time else None, "lsn": report.reached_lsn,
               "base_backup": report.base_id, "target": point.describe()}
    if as_json:
        out.print_json(json.dumps({
            "point": reached, "restore_point": report.backup_id, "target": report.target, "ok": report.ok,
            "duration_s": round(report.duration_s, 3), "steps": report.step_seconds(),
            "databases": [{"role": d.role, "live": d.live, "restored_as": d.restored_as, "kept_as": d.kept_as,
                           "tables": d.tables, "rows": d.rows} for d in report.databases],
            "notes": report.notes,
        }))
        return
    _print_titled(_steps_table(f"restore to {point.describe()}: {human_duration(report.duration_s)}", report.steps))
    when = f"{report.reached_time:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC" if report.reached_time else "none replayed"
    out.print(f"point reached: LSN {report.reached_lsn}, last transaction {when} (base backup {report.base_id})",
              highlight=False, soft_wrap=True)
    for d in report.databases:
        where_now = f"swapped into place as {d.live}" if report.target == "live" else f"in {d.restored_as}"
        kept = f"; the old one is kept as {d.kept_as}" if d.kept_as else ""
        out.print(f"{d.role}: {counted(d.tables, 'table')}, {counted(d.rows, 'row')} as at that point, {where_now}{kept}",
                  highlight=False, soft_wrap=True)
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    _print_cleanup_hint([d.live for d in report.databases if d.role == "platform"])


def _print_cleanup_hint(platform: list[str]) -> None:
    """How to drop what a restore left, naming the platform database --confirm wants when known."""
    confirm = f"--confirm {platform[0]}" if platform else "--confirm DATABASE (the platform database's name)"
    out.print(f"when you no longer need them: `maestro restore cleanup` drops the scratch databases, with "
              f"{confirm} also the old live ones", highlight=False)


@restore_app.command("cleanup")
def restore_cleanup_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be dropped, drop nothing."),
    confirm: str = typer.Option(
        None, "--confirm", metavar="DATABASE",
        help="The platform database's name: also drop the old live databases (<db>_pre_restore_<time>), "
             "the only way back from a wrong restore.",
    ),
) -> None:
    """Drop the databases restores left: scratch restores, and with --confirm the old live ones.

    Lists every database restores left on the servers, with size and age, and drops the scratch
    restores (`<db>_restore_<time>`); the old live databases kept aside (`<db>_pre_restore_<time>`,
    the way back from a wrong restore) only with --confirm. Never those of a running or
    half-done restore.

    Examples:

        maestro restore cleanup --dry-run
        maestro restore cleanup
        maestro restore cleanup --confirm maestro"""
    from maestro_pipelines.backup import restore_cleanup
    from maestro_pipelines.backup.restore.recovery import half_done_swaps
    from maestro_pipelines.backup.restore import cleanup_summary, raise_for_in_use

    destinations, _notes = _destinations()
    store = _store()
    _print_half_done(half_done_swaps(store, destinations))
    items = restore_cleanup(destinations, dry_run=dry_run, store=store, confirm=confirm)
    for item in items:
        out.print(item.describe(), highlight=False, soft_wrap=True)
    out.print(cleanup_summary(items, dry_run), highlight=False)
    raise_for_in_use(items)


def _print_half_done(found) -> None:
    for half in found:
        err.print(f"[red]HALF-DONE RESTORE:[/red] {half.describe()}", highlight=False, soft_wrap=True)
        err.print(half.hint(), highlight=False, soft_wrap=True)


@restore_app.command("status")
def restore_status(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Live restores that stopped half way, and which database is from which backup.

    A live restore killed between two swaps leaves some live databases from the backup and
    some not: this reads which from the servers. Exits 1 when there is one; `maestro restore
    finish` or `undo` ends it."""
    from maestro_pipelines.backup.restore.recovery import half_done_swaps

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
    from maestro_pipelines.backup.restore.recovery import finish_swap, undo_swap

    destinations, _notes = _destinations()
    recover = undo_swap if undo else finish_swap
    done = recover(_store(), destinations, confirm, log=lambda message: err.print(message, markup=False, highlight=False))
    for line in done.lines():
        out.print(line, highlight=False, soft_wrap=True)
    _print_cleanup_hint([t.database for t in destinations if t.role == "platform"])


_RECOVER_CONFIRM = "The platform database's name (what the interrupted restore was confirmed with)."


@restore_app.command("finish")
def restore_finish(confirm: str = typer.Option(None, "--confirm", metavar="DATABASE", help=_RECOVER_CONFIRM)) -> None:
    """Finish a live restore that stopped half way: swap in the databases it had not swapped yet.

    Every live database is then from the backup; the old ones are kept aside."""
    _recover(undo=False, confirm=confirm)


@restore_app.command("undo")
def restore_undo(confirm: str = typer.Option(None, "--confirm", metavar="DATABASE", help=_RECOVER_CONFIRM)) -> None:
    """Undo a live restore that stopped half way: put back the old live databases it had swapped.

    Every live database is then as before the restore; the restored copies are kept."""
    _recover(undo=True, confirm=confirm)


drill_app = typer.Typer(invoke_without_command=True)
app.add_typer(drill_app, name="drill")


@drill_app.callback()
def drill(
    ctx: typer.Context,
    rto_minutes: float = typer.Option(15, metavar="MINUTES", help="RTO target: restore to verified within this many minutes."),
    rpo_hours: float = typer.Option(RPO_TARGET_HOURS, metavar="HOURS",
                                    help="RPO target: the latest verified backup at most this old."),
    backup: str = typer.Option("latest", metavar="ID", help="Backup to drill with: an id, or `latest`, the latest verified "
                                              "(`newest` is accepted too)."),
    jobs: int = typer.Option(2, metavar="N", help="pg_restore parallel jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
) -> None:
    """Disaster-recovery drill: restore the latest verified backup into scratch databases, prove it, time it.

    Without Dagster: restores into scratch databases, verifies row counts, checksums and
    indexes (amcheck), resolves MLflow's production aliases through MLflow's own client,
    measures RTO and RPO against their targets, and drops the scratch databases. Exits 1 when
    the drill fails. Every drill is recorded in the store (drills/), where `maestro drill list`
    and the dr_drill asset's history read it.

    Examples:

        maestro drill
        maestro drill --rto-minutes 5 --json
        maestro drill --backup 20261126T020000Z-3f2a1b
        maestro drill list"""
    if ctx.invoked_subcommand is not None:
        return
    from maestro_pipelines.backup import run_drill
    from maestro_pipelines.backup.drill import drill_targets
    from maestro_pipelines.backup.restore import SCRATCH, check_restore_request

    rto_target, rpo_target = drill_targets(rto_minutes, rpo_hours)
    check_restore_request(SCRATCH, None, jobs)
    destinations, _notes = _destinations()
    with _progress("download", keep=False) as progress:
        report = run_drill(
            _store(), destinations, rto_target, rpo_target, jobs=jobs,
            progress=progress, log=lambda message: err.print(message, markup=False, highlight=False, soft_wrap=True), backup=backup,
            source="cli", phases=progress.phase,
        )
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        _print_drill_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_drill_report(report) -> None:
    """The drill's steps, RTO and RPO against their targets, what it checked, notes and failures."""
    _print_titled(_steps_table(f"drill with backup {report.backup_id}", report.steps))
    if report.rto_s is not None:
        out.print(f"RTO {human_duration(report.rto_s)} (target {human_duration(report.rto_target_s)}): "
                  f"{'ok' if report.rto_ok else 'MISSED'}", highlight=False)
    if report.rpo_s is not None and not report.restored:
        out.print("RPO not judged: the drill's restore failed (below), so this backup is no proven restore point",
                  highlight=False)
    elif report.rpo_s is not None:
        out.print(f"RPO {human_duration(report.rpo_s)} (target {human_duration(report.rpo_target_s)}): "
                  f"{'ok' if report.rpo_ok else 'MISSED'}", highlight=False)
    if report.restored:
        out.print(f"{counted(report.indexes_checked, 'btree index', 'btree indexes')} checked, "
                  f"{counted(report.aliases_resolved, 'production alias', 'production aliases')} resolved",
                  highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False)
    for failure in report.failures():
        err.print(f"drill FAILED: {failure}", highlight=False, soft_wrap=True)
    if report.record_key:
        out.print(f"recorded in the store as {report.record_key} (`maestro drill list` shows the history)",
                  highlight=False)


@drill_app.command("list", short_help="The drills recorded in the store (CLI and Dagster ones), oldest first.")
def drill_list(
    limit: int = typer.Option(20, min=1, help="Show the latest this many drills."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts)."),
) -> None:
    """The drills recorded in the store (from `maestro drill` and Dagster's dr_drill), oldest
    first: when, where they ran, the backup, RTO and RPO against their targets, the result."""
    from maestro_pipelines.backup.drill_history import list_drills

    store = _store()
    history = list_drills(store, limit=limit)
    for line in history.skipped:  # on stderr: the JSON on stdout stays the list
        err.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    if history.locked:
        err.print(f"{counted(history.locked, 'drill record is', 'drill records are')} encrypted and not shown: "
                  f"{escape(history.locked_by or '')}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps([{**r.to_dict(), "key": r.key} for r in history.records]))
        return
    _print_titled(_drill_table(history.records, store.url))
    if history.records:
        out.print(_drill_targets(history.records), highlight=False)


def _print_titled(table: Table) -> None:
    """The table's title on a line of its own that never wraps (it names the store, whose URL
    or path people copy: a table wraps its title at the table's width), then the table."""
    if table.title:
        out.print(table.title, soft_wrap=True, highlight=False, markup=False)
        table.title = None
    out.print(table)


def _drill_table(records, store_url: str) -> Table:
    """Five columns that fit 80: the time to the minute, the whole backup id (never cut: it is
    copied into `maestro restore --backup`), durations as people say them, and the result
    with where it ran, the only column that wraps. Targets and seconds are in --json."""

    table = Table(title=f"{counted(len(records), 'drill', 'drills')} in {store_url}", title_justify="left")
    for column in ("started (UTC)", "backup", "RTO", "RPO", "result"):
        table.add_column(column, justify="right" if column in ("RTO", "RPO") else "left", no_wrap=column != "result")
    for r in records:
        rto = human_duration(r.rto_s) if r.rto_s is not None else "-"
        rpo = human_duration(r.rpo_s) if r.rpo_s is not None else "-"
        problem = escape(r.problems[0]) if r.problems else "no detail recorded"
        result = f"ok ({escape(r.where)})" if r.ok else f"[red]FAILED[/red] ({escape(r.where)}): {problem}"
        table.add_row(f"{r.started_at:%Y-%m-%d %H:%M}", r.backup_id or "-", rto, rpo, result)
    return table


def _drill_targets(records) -> str:
    latest = records[-1]
    said = f"targets: RTO {human_duration(latest.rto_target_s)}, RPO {human_duration(latest.rpo_target_s)}"
    if any((r.rto_target_s, r.rpo_target_s) != (latest.rto_target_s, latest.rpo_target_s) for r in records):
        return f"{said} (the latest drill's; others had other targets: --json gives each drill's)"
    return said


# ---- wal: continuous WAL archiving (backup/pitr/wal.py) --------------------------------------

wal_app = typer.Typer(
    help="Continuous WAL archiving into the store (point-in-time recovery), and whether it works.\n\n"
    "archive_command = 'maestro wal push %p', restore_command = 'maestro wal fetch %f %p' "
    "(docs/configuration.md). The embedded server archives by itself.",
    no_args_is_help=True,
)
app.add_typer(wal_app, name="wal")


@wal_app.command("push")
def wal_push(
    path: Path = typer.Argument(..., metavar="PATH", help="The WAL file (%p: relative to the data directory)."),
    system_id: str = typer.Option(None, "--system-id", metavar="ID",
                                  help="The server's system identifier, for history files outside the data directory."),
) -> None:
    """Archive one WAL file into the store; PostgreSQL's archive_command: 'maestro wal push %p'.

    Pushing the same file again succeeds; other bytes under an archived name are refused
    (exit 1), recorded in the store, and the stored file is kept.
    """
    from maestro_pipelines.backup.pitr.wal import push_wal

    _refuse_a_store_in_the_data_directory()
    outcome = push_wal(_store(), path, system_id)
    out.print(f"{outcome} {path.name}", highlight=False)


def _refuse_a_store_in_the_data_directory() -> None:
    """archive_command and restore_command run in the data directory: with neither MAESTRO_STORE_URL nor
    MAESTRO_HOME in the server's environment the default store would be .maestro/store in
    there, deleted with the server it should outlive."""
    settings = load_settings()
    if settings.store_url is None and (Path.cwd() / "PG_VERSION").exists() and settings.home.is_relative_to(Path.cwd().resolve()):
        raise MaestroError(
            "MAESTRO_STORE_URL is not set where archive_command (or restore_command) runs, so the WAL store would be "
            "inside the server's own data directory",
            "Set MAESTRO_STORE_URL (and the store's credentials) in the PostgreSQL server's environment (docs/configuration.md)",
        )


@wal_app.command("fetch")
def wal_fetch(
    name: str = typer.Argument(..., metavar="NAME", help="The WAL file's name (%f)."),
    dest: Path = typer.Argument(..., metavar="DEST", help="Where to write it (%p)."),
    system_id: str = typer.Option(None, "--system-id", metavar="ID",
                                  help="The server's system identifier (default: pg_control of the data directory here)."),
) -> None:
    """Write one archived WAL file to DEST; PostgreSQL's restore_command: 'maestro wal fetch %f %p'.

    Exits 1 when the store has no such file (PostgreSQL asks for files that may not exist,
    such as the next timeline's history, and then ends recovery).
    """
    from maestro_pipelines.backup.pitr import layout
    from maestro_pipelines.backup.pitr.wal import fetch_wal

    layout.check_wal_name(name)
    _refuse_a_store_in_the_data_directory()
    system_id = system_id or layout.control_system_id(Path.cwd())
    if not fetch_wal(_store(), system_id, name, dest):
        err.print(f"{name}: not archived", highlight=False)
        raise typer.Exit(1)


@wal_app.command("status")
def wal_status(as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts).")) -> None:
    """Whether the platform database's server archives its WAL (pg_stat_archiver), and the newest
    segment the store holds for it."""
    from maestro_pipelines.backup.pitr.wal import archiver_status, list_conflicts, newest_segment

    location = _location()
    status = archiver_status(location.admin_url, location.source)
    store = _store()
    newest = newest_segment(store, status.system_id) if status.system_id else None
    spool = {**_spool_state(location), "conflicts": list_conflicts(store, status.system_id) if status.system_id else []}
    if as_json:
        body = {**status.to_json(), "store": store.url,
                "newest_in_store": newest.name if newest else None,
                "newest_in_store_at": newest.last_modified.isoformat() if newest and newest.last_modified else None,
                **spool}
        print(json.dumps(body, indent=2))
        return
    _print_wal_status(status, store, newest, spool)


def _spool_state(location) -> dict:
    """The embedded server's spool: segments waiting for the pusher, and whether it runs."""
    embedded = location.embedded
    if embedded is None or not embedded.wal_archiving:
        return {}
    from maestro_pipelines.backup.pitr.spool import refused, spooled

    return {"spool_waiting": [path.name for path in spooled(embedded.spool)], "spool_refused": refused(embedded.spool),
            "pusher_running": embedded.pusher_alive()}


def _print_wal_status(status, store, newest, spool: dict) -> None:
    def when(moment) -> str:
        return moment.isoformat(timespec="seconds") if moment else "never"

    _print_keyed("server", f"{status.where} (system identifier {status.system_id})")
    _print_keyed("settings", f"wal_level={status.wal_level} archive_mode={status.archive_mode} "
                 f"archive_timeout={status.archive_timeout_s}s summarize_wal={status.summarize_wal or 'n/a'}")
    _print_keyed("command", status.archive_command or "(empty archive_command)")
    _print_keyed("archived", f"{status.last_archived_wal or 'none'} at {when(status.last_archived_time)} "
                 f"({status.archived_count} archived, {status.failed_count} failed)")
    if status.lag_segments is not None:
        _print_keyed("lag", f"{status.lag_segments} complete segment(s) not archived yet (writing {status.current_wal})")
    _print_keyed("store", f"{store.url}: newest segment {newest.name if newest else 'none'}"
                 f"{' at ' + when(newest.last_modified) if newest else ''}")
    if "spool_waiting" in spool:
        _print_keyed("spool", f"{len(spool['spool_waiting'])} file(s) waiting; pusher "
                     f"{'running' if spool['pusher_running'] else 'not running'}")
    for name in spool.get("spool_refused", []):
        err.print(f"[yellow]warning:[/yellow] {escape(name)} could not be archived and is kept in the spool's refused/ "
                  "folder: the WAL has a gap there (wal-pusher.log in MAESTRO_HOME says why); take a new base backup",
                  highlight=False, soft_wrap=True)
    if spool["conflicts"]:
        err.print(f"[yellow]warning:[/yellow] the store recorded {len(spool['conflicts'])} refused push(es) of other bytes "
                  f"under an archived name (first: {escape(spool['conflicts'][0])}): two servers may archive as one",
                  highlight=False, soft_wrap=True)
    if status.problem:
        err.print(f"[yellow]warning:[/yellow] {escape(status.problem)}", highlight=False, soft_wrap=True)
    else:
        out.print("archiving: on", highlight=False)


mlflow_app = typer.Typer(help="MLflow: its UI on the runs and models Maestro's trainings recorded.", no_args_is_help=True)
app.add_typer(mlflow_app, name="mlflow")


@mlflow_app.command("ui")
def mlflow_ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback: only this machine)."),
    port: int = typer.Option(5000, min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the MLflow UI on Maestro's MLflow database (the embedded one too) until Ctrl-C.

    Example: maestro mlflow ui --port 5000, then open http://127.0.0.1:5000. Set
    MAESTRO_MLFLOW_UI_URL=http://127.0.0.1:5000 where Dagster runs, and the ML assets link to
    their MLflow runs and model versions.
    """
    from maestro_pipelines.ml.ui_server import mlflow_backend, serve_mlflow_ui

    backend = mlflow_backend(load_settings())
    out.print(f"MLflow UI on {backend.where}: http://{host}:{port} (Ctrl-C stops it)", highlight=False, soft_wrap=True)
    out.print(f"for links from Dagster: export MAESTRO_MLFLOW_UI_URL=http://{host}:{port}", highlight=False, soft_wrap=True)
    code = serve_mlflow_ui(backend, host, port)
    if code != 0:
        raise MaestroError(f"mlflow server exited with code {code}", f"Read its output above; is port {port} free?")


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


def _command():
    """The click command of `app`, its help laid out as git's and gh's are (cli_help.py)."""
    from maestro_pipelines.cli_help import conventional_parameters, tidy

    conventional_parameters()
    command = typer.main.get_command(app)
    tidy(command)
    return command


def _usage_hint(exc) -> str:
    """`maestro restore latest` reads as "restore the latest backup": the word is a backup, not
    a subcommand, and the command that does it is named."""
    import re

    unknown = re.match(r"No such command '(?P<word>[^']*)'", exc.format_message())
    if unknown is None or exc.ctx is None or not any("--backup" in p.opts for p in exc.ctx.command.params):
        return ""
    return f" (to restore backup {unknown['word']}: {exc.ctx.command_path} --backup {unknown['word']})"


def main() -> None:
    import signal

    # Typer 0.2x carries its own copy of click: its UsageError (the base of BadParameter,
    # NoSuchOption, MissingParameter) is reached through the public BadParameter.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        # Not standalone: a usage error (a word where a number goes, an unknown option) comes
        # here and gets one line like every other bad input, not click's framed box.
        code = _command()(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `maestro backup` alone: its help was the answer
            sys.exit(2)
        command = exc.ctx.command_path if exc.ctx is not None else "maestro"
        err.print(f"error: {exc.format_message().rstrip('.')}{_usage_hint(exc)}. See `{command} --help`",
                  markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except _Terminated:
        err.print("terminated (SIGTERM)", highlight=False)
        sys.exit(128 + signal.SIGTERM)
    except MaestroError as exc:
        # Library messages are plain text: "pip install 'maestro-pipelines[s3]'" is not markup.
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: say so in one line
        from maestro_pipelines.settings import debug_requested

        if debug_requested():
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0]
        err.print(
            f"error: unexpected {type(exc).__name__}: {first_line} "
            "(run again with MAESTRO_DEBUG=1 for the traceback, and please report it)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
