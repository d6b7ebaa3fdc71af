"""Jobs of restores, for on-call from the launchpad, and the drill's job for its schedule.

- `restore_database`: restore a backup (`latest`, an id, or the newest verified one before a
  time) into scratch databases next to the live ones (default), or into the live databases'
  place (`target: live`, `confirm: <platform database name>`): every object checked before
  any database is touched, each database restored beside the live one and verified against
  the manifest, then swapped into place in one step with the old database kept aside
  (`<db>_pre_restore_<time>`). The metadata says where everything is now.
- `restore_cleanup_job`: drop what restores left (`<db>_pre_restore_<time>`, `<db>_restore_<time>`);
  a dry run unless `dry_run: false`. Databases of a restore still running are never dropped.
- `dr_drill_job`: materializes `dr_drill` (the weekly schedule launches it).

The work is `maestro_pipelines.backup` (`maestro restore` runs the same functions, and is the
way when Dagster itself is what was lost). Runs are tagged `maestro/kind` (restore, drill), so
the failure-alert sensor alerts on them, and run in the pool `maestro_backup`: never while a
backup, archive, retention, verification or drill runs.

Dagster's own database is never restored live from here: this run writes its events into it,
and the swap would end the run's (and the daemon's) sessions and put a database without this
run in its place. With no `databases` given a live restore leaves it out (and says so); asking
for it is refused. Restore it with the CLI, Dagster stopped:
`maestro restore --target live --databases dagster --confirm <platform database>`.

Retries: only a store that stopped answering (StoreUnavailable, ObjectChanged) is retried; a
refused restore (confirmation, versions, roles) and any other error fail at once with their
message. A failed restore left the live databases as they were.
"""

import functools
from datetime import datetime, timezone
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from maestro_pipelines.assets.backups import BACKUP_POOL, STORE_RETRY, _ProgressLog, backup_step
from maestro_pipelines.assets.drills import DRILL_KIND, dr_drill, live_destinations, steps_table
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.jobs.backups import DATABASE_LANE, KIND_TAG
from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase

RESTORE_KIND = "restore"
DAGSTER_ROLE = "dagster"
RESTORE_MAX_RUNTIME_S = 4 * 3600
"""A restore rebuilds every index (a dump holds none): give it longer than the nightly backup's 3 h."""
DRILL_MAX_RUNTIME_S = 2 * 3600
CLEANUP_HINT = (
    "When you no longer need the old or scratch databases: run `maestro restore cleanup` "
    "(or launch restore_cleanup_job with dry_run: false)."
)


def _restore_step(fn):
    """backup_step (transient store errors retry, MaestroErrors fail at once), and any other
    exception fails at once too: never retry a restore that may have swapped a database."""
    inner = backup_step(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except dg.Failure:
            raise
        except Exception as exc:
            raise dg.Failure(description=f"{type(exc).__name__}: {str(exc).strip()[:1000]}", allow_retries=False) from exc

    return wrapper


def parse_before(value: Optional[str]) -> Optional[datetime]:
    """ISO 8601 time (UTC when it has no zone) or None."""
    if not value or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise MaestroError(
            f"before '{value}' is not a time", "Write it as ISO 8601, e.g. 2026-11-26T14:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class RestoreConfig(dg.Config):
    backup: str = Field(
        default="latest",
        description="Backup id (`maestro backup list`, the database_backup materializations), or `latest`: the newest verified.",
    )
    before: Optional[str] = Field(
        default=None,
        description="Instead of `backup`: the newest verified backup taken before this time (ISO 8601, UTC without a zone).",
    )
    target: Literal["scratch", "live"] = Field(
        default="scratch",
        description="`scratch`: restored next to the live databases as <db>_restore_<time>; `live`: in their place.",
    )
    databases: list[str] = Field(
        default=[],
        description="Roles to restore (platform, mlflow, dagster). Empty: every one the backup holds (live: but dagster).",
    )
    confirm: Optional[str] = Field(
        default=None, description="Required for `live`: the platform database's name, typed out."
    )
    jobs: int = Field(default=2, ge=1, le=32, description="pg_restore parallel jobs (-j).")


def restore_roles(config: RestoreConfig, entry, destinations, log) -> Optional[list[str]]:
    """The roles to restore: None (the library's default: every configured one the backup
    holds) for scratch restores without a list; live restores leave Dagster's own out."""
    from maestro_pipelines.backup import LIVE, RestoreRefused

    requested = list(dict.fromkeys(r.strip() for r in config.databases if r.strip()))
    if config.target != LIVE:
        return requested or None
    if DAGSTER_ROLE in requested:
        raise RestoreRefused(
            "Dagster's own database cannot be restored live from a Dagster run (the run writes its events there)",
            "Stop the Dagster daemon and webserver and run `maestro restore --target live --databases dagster "
            "--confirm <platform database>` from a shell",
        )
    if requested:
        return requested
    configured = {d.role for d in destinations}
    held = [d.role for d in entry.manifest.databases if d.role in configured]
    if DAGSTER_ROLE in held:
        log.warning(
            "Dagster's own database is left out of this live restore (this run writes its events there); "
            "restore it with `maestro restore --target live --databases dagster` with Dagster stopped"
        )
    roles = [r for r in held if r != DAGSTER_ROLE]
    if not roles:
        raise RestoreRefused(
            f"Backup {entry.backup_id} holds no database a live restore from Dagster can replace",
            f"It holds: {', '.join(d.role for d in entry.manifest.databases)}",
        )
    return roles


def _databases_table(report) -> dg.MetadataValue:
    return dg.MetadataValue.table(
        [
            dg.TableRecord({
                "role": d.role,
                "live": d.live,
                "restored_as": d.restored_as,
                "kept_as": d.kept_as or "",
                "tables": d.tables,
                "rows": d.rows,
            })
            for d in report.databases
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("role", "string"),
                dg.TableColumn("live", "string", description="the live database's name"),
                dg.TableColumn("restored_as", "string", description="where the restored data is now"),
                dg.TableColumn("kept_as", "string", description="where the old live database was kept (live restores)"),
                dg.TableColumn("tables", "int", description="tables compared with the manifest"),
                dg.TableColumn("rows", "int", description="rows compared with the manifest"),
            ]
        ),
    )


def _where_now(report) -> str:
    lines = []
    for d in report.databases:
        if d.restored_as == d.live and report.target == "live":
            line = f"- **{d.role}**: swapped into place as `{d.live}`"
            line += f"; the old one is kept as `{d.kept_as}`" if d.kept_as else " (there was no live database)"
        else:
            line = f"- **{d.role}**: restored into `{d.restored_as}` (the live `{d.live}` is untouched)"
        lines.append(line + f", {d.tables} tables, {d.rows:,} rows equal to the backup")
    return "\n".join(lines)


@dg.op(pool=BACKUP_POOL, retry_policy=STORE_RETRY, tags={KIND_TAG: RESTORE_KIND})
@_restore_step
def restore_from_backup(
    context: dg.OpExecutionContext,
    config: RestoreConfig,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
):
    """Restore a backup into scratch databases (default) or in place of the live ones."""
    from maestro_pipelines.backup import RestoreRefused, resolve_restore_point, restore_backup

    before = parse_before(config.before)
    if before is not None and config.backup != "latest":
        raise RestoreRefused(
            f"Both backup ({config.backup}) and before ({config.before}) are set",
            "Set one: a backup id, or a time to take the newest verified backup before it",
        )
    object_store = store.get_store()
    destinations, notes = live_destinations(platform_db, mlflow)
    for note in notes:
        context.log.info(note)
    entry = resolve_restore_point(object_store, config.backup, before=before)
    roles = restore_roles(config, entry, destinations, context.log)
    context.log.info(
        f"Restoring backup {entry.backup_id} (snapshot {entry.manifest.snapshot_at:%Y-%m-%d %H:%M:%S} UTC) from "
        f"{object_store.url} into {'the LIVE databases' if config.target == 'live' else 'scratch databases'}"
        + (f" ({', '.join(roles)})" if roles else "")
    )
    report = restore_backup(
        object_store,
        entry,
        destinations,
        target=config.target,
        confirm=config.confirm or None,
        roles=roles,
        jobs=config.jobs,
        progress=_ProgressLog(context.log, "download"),
        log=context.log.info,
    )
    # From here on the restore is done (and, live, swapped): report only.
    for step in report.steps:
        context.log.info(f"{step.name}: {step.seconds:.2f} s {step.detail}".rstrip())
    where_now = _where_now(report)
    context.log.info(f"Restore of backup {report.backup_id} done in {report.duration_s:.1f} s:\n{where_now}")
    if report.missing_artifacts:
        context.log.warning(
            f"{len(report.missing_artifacts)} of {report.artifacts_checked} model artifacts listed in the backup are "
            f"missing from the store: {', '.join(report.missing_artifacts[:10])}"
        )
    for note in report.notes:
        context.log.warning(note)
    context.log.info(CLEANUP_HINT)
    return dg.Output(
        None,
        metadata={
            "backup_id": dg.MetadataValue.text(report.backup_id),
            "snapshot_at": dg.MetadataValue.timestamp(report.snapshot_at),
            "target": dg.MetadataValue.text(report.target),
            "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
            "steps": steps_table(report.steps),
            "databases": _databases_table(report),
            "where_now": dg.MetadataValue.md(where_now),
            "artifacts_checked": dg.MetadataValue.int(report.artifacts_checked),
            "missing_artifacts": dg.MetadataValue.md(
                "\n".join(f"- `{key}`" for key in report.missing_artifacts) or "none"
            ),
            "notes": dg.MetadataValue.md("\n".join(f"- {note}" for note in report.notes) or "none"),
            "next_step": dg.MetadataValue.text(CLEANUP_HINT),
        },
    )


@dg.job(
    tags={KIND_TAG: RESTORE_KIND, **DATABASE_LANE, "dagster/max_runtime": str(RESTORE_MAX_RUNTIME_S)},
    description=(
        "On-call: restore a backup (latest, an id, or the newest before a time) into scratch databases, or with "
        "target: live and confirm: <platform database> in place of the live ones (old ones kept aside)."
    ),
)
def restore_database():
    restore_from_backup()


class RestoreCleanupConfig(dg.Config):
    dry_run: bool = Field(default=True, description="Only list what would be dropped; set false to drop.")


@dg.op(pool=BACKUP_POOL, tags={KIND_TAG: RESTORE_KIND})
@_restore_step
def drop_restore_leftovers(
    context: dg.OpExecutionContext,
    config: RestoreCleanupConfig,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
):
    """Drop `<db>_pre_restore_<time>` (old live databases kept aside) and `<db>_restore_<time>`
    (scratch restores) of the live databases; never those of a restore still running."""
    from maestro_pipelines.backup import restore_leftovers
    from maestro_pipelines.backup.restore import DatabaseInUse, drop_database, running_restore_stamps

    destinations, _notes = live_destinations(platform_db, mlflow)
    running = running_restore_stamps(store.get_store())
    rows, dropped, skipped = [], 0, 0
    in_use: list[str] = []
    for leftover in restore_leftovers(destinations):
        what = "old live database" if leftover.kind == "pre_restore" else "scratch restore"
        if leftover.stamp in running:
            action = "skipped: its restore is running"
            skipped += 1
        elif config.dry_run:
            action = "would drop"
        else:
            try:
                drop_database(leftover.url, leftover.name, leftover.source)
                action = "dropped"
                dropped += 1
            except DatabaseInUse as exc:  # another role's session: the others are still dropped
                action = "kept: in use"
                in_use.append(exc.problem)
        context.log.info(f"{action}: {leftover.name} ({what} of {leftover.live})")
        rows.append(dg.TableRecord({"database": leftover.name, "kind": what, "live": leftover.live, "action": action}))
    done = f"Would drop {len(rows) - skipped}" if config.dry_run else f"Dropped {dropped}"
    context.log.info(f"{done} database(s), {skipped} skipped (their restore is running)")
    if in_use:
        raise DatabaseInUse(
            f"Kept {len(in_use)} restore leftovers, {dropped} dropped: " + "; ".join(in_use),
            "Ask those sessions to disconnect (or an administrator to end them), then run the cleanup again",
        )
    return dg.Output(
        None,
        metadata={
            "dry_run": dg.MetadataValue.bool(config.dry_run),
            "found": dg.MetadataValue.int(len(rows)),
            "dropped": dg.MetadataValue.int(dropped),
            "skipped": dg.MetadataValue.int(skipped),
            "leftovers": dg.MetadataValue.table(
                rows,
                schema=dg.TableSchema(
                    columns=[
                        dg.TableColumn("database", "string"),
                        dg.TableColumn("kind", "string"),
                        dg.TableColumn("live", "string"),
                        dg.TableColumn("action", "string"),
                    ]
                ),
            ),
        },
    )


@dg.job(
    tags={KIND_TAG: RESTORE_KIND, **DATABASE_LANE, "dagster/max_runtime": str(3600)},
    description=(
        "Drop the databases restores left (<db>_pre_restore_<time>, <db>_restore_<time>); "
        "a dry run unless dry_run: false."
    ),
)
def restore_cleanup_job():
    drop_restore_leftovers()


dr_drill_job = dg.define_asset_job(
    "dr_drill_job",
    selection=dg.AssetSelection.assets(dr_drill),
    description="The DR drill: restore the newest verified backup into scratch databases, verify, time, drop.",
    tags={KIND_TAG: DRILL_KIND, **DATABASE_LANE, "dagster/max_runtime": str(DRILL_MAX_RUNTIME_S)},
)

restore_jobs = [restore_database, restore_cleanup_job, dr_drill_job]
