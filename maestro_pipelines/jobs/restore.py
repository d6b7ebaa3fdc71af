"""Jobs of restores, for on-call from the launchpad, and the drill's job for its schedule.

- `restore_database`: restore a backup (`latest`, an id, or the latest verified one before a
  time) into scratch databases next to the live ones (default), or into the live databases'
  place (`target: live`, `confirm: <platform database name>`): every object checked before
  any database is touched, each database restored beside the live one and verified against
  the manifest, then swapped into place in one step with the old database kept aside
  (`<db>_pre_restore_<time>`). The metadata says where everything is now.
  With `to_time` (or `to_lsn`) it restores the databases as they were at that point instead
  (point-in-time recovery: a temporary server from the newest base backup before it plus
  the archived WAL, `backup/pitr/restore.py`), delivered the same way.
- `restore_cleanup_job`: list what restores left, with size and age, and drop the scratch
  restores (`<db>_restore_<time>`); the old live databases (`<db>_pre_restore_<time>`, the
  only way back from a wrong restore) only with `confirm: <platform database>`. The same
  defaults and the same library function as `maestro restore cleanup`. Databases of a
  restore still running or half done (its swap journal) are never dropped.
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
from typing import Literal, Optional

import dagster as dg
from pydantic import Field, field_validator

from maestro_pipelines.assets.drills import DRILL_KIND, dr_drill, live_destinations, steps_table
from maestro_pipelines.dagster_support import BACKUP_POOL, KIND_TAG, STORE_RETRY, ProgressLog, backup_step, run_tags
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources import MLflowRegistry, ObjectStoreResource, PlatformDatabase

RESTORE_KIND = "restore"
DAGSTER_ROLE = "dagster"
RESTORE_MAX_RUNTIME_S = 4 * 3600
"""A restore rebuilds every index (a dump holds none): give it longer than the nightly backup's 3 h."""
DRILL_MAX_RUNTIME_S = 2 * 3600
CLEANUP_HINT = (
    "When you no longer need the scratch databases: run `maestro restore cleanup` (or launch "
    "restore_cleanup_job); the old live databases too: add --confirm <platform database> (confirm: ...)."
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


class RestoreConfig(dg.Config):
    backup: str = Field(
        default="latest",
        description="Backup id (`maestro backup list`, the database_backup materializations), or `latest`: the latest verified (`newest` is accepted too).",
    )
    # `before` and `confirm` default to "" (not None) so the Launchpad pre-fills them: on-call
    # sees every choice of a restore and types only the values.
    before: Optional[str] = Field(
        default="",
        description=(
            "Instead of `backup`: the latest verified backup taken before this time, ISO 8601, e.g. "
            "2026-11-26T14:00:00Z (a time without a zone is taken as UTC). Empty: use `backup`."
        ),
    )
    # Point in time (base backup + WAL), "" so the Launchpad pre-fills them too: empty means
    # a dump restore as above.
    to_time: Optional[str] = Field(
        default="",
        description=(
            "Instead of a backup: the databases as they were at this time (point-in-time recovery from a base "
            "backup and the archived WAL), ISO 8601, e.g. 2026-11-26T14:04:00Z (no zone: MAESTRO_TIMEZONE, else "
            "UTC), or `latest` for the newest recoverable point. Empty: use `backup`."
        ),
    )
    to_lsn: Optional[str] = Field(
        default="",
        description="Instead of a backup: the databases as they were at this WAL position (LSN), e.g. 0/3000060. Empty: use `backup`.",
    )
    target: Literal["scratch", "live"] = Field(
        default="scratch",
        description="`scratch`: restored next to the live databases as `<db>_restore_<time>`; `live`: in their place.",
    )
    databases: list[str] = Field(
        default=[],
        description="Roles to restore (platform, mlflow, dagster). Empty: every one the backup holds (live: but dagster).",
    )
    confirm: Optional[str] = Field(
        default="",
        description="Required for `live`: the platform database's name, typed out. Not needed for `scratch`.",
    )
    # le: backup.restore.MAX_JOBS, written out: importing the library here would load
    # SQLAlchemy into every Dagster process that loads the definitions.
    jobs: int = Field(default=2, ge=1, le=32, description="pg_restore parallel jobs (-j).")

    @field_validator("databases")
    @classmethod
    def _each_role_once(cls, value: list[str]) -> list[str]:
        # The same rule as `maestro restore --databases` (the library's check).
        from maestro_pipelines.backup.restore import check_restore_request

        try:
            check_restore_request("scratch", [r.strip() for r in value], 1)
        except MaestroError as exc:
            raise ValueError(str(exc)) from None
        return value


def restore_roles(config: RestoreConfig, entry, destinations, log) -> Optional[list[str]]:
    """The roles to restore: None (the library's default: every configured one the backup
    holds) for scratch restores without a list; live restores leave Dagster's own out."""
    configured = {d.role for d in destinations}
    return _roles_to_restore(config, [d.role for d in entry.manifest.databases if d.role in configured],
                             f"Backup {entry.backup_id}", [d.role for d in entry.manifest.databases],
                             "maestro restore", log)


def _roles_to_restore(config: RestoreConfig, held: list[str], what: str, holds: list[str], command: str,
                      log) -> Optional[list[str]]:
    """The requested roles (or, live, every one held but Dagster's own, which this run writes
    its events into); `command` is the shell command that can restore Dagster's own."""
    from maestro_pipelines.backup import LIVE, RestoreRefused

    requested = list(dict.fromkeys(r.strip() for r in config.databases if r.strip()))
    if config.target != LIVE:
        return requested or None
    if DAGSTER_ROLE in requested:
        raise RestoreRefused(
            "Dagster's own database cannot be restored live from a Dagster run (the run writes its events there)",
            f"Stop the Dagster daemon and webserver and run `{command} --target live --databases dagster "
            "--confirm <platform database>` from a shell",
        )
    if requested:
        return requested
    if DAGSTER_ROLE in held:
        log.warning(
            "Dagster's own database is left out of this live restore (this run writes its events there); "
            f"restore it with `{command} --target live --databases dagster` with Dagster stopped"
        )
    roles = [r for r in held if r != DAGSTER_ROLE]
    if not roles:
        raise RestoreRefused(f"{what} holds no database a live restore from Dagster can replace",
                             f"It holds: {', '.join(holds) or 'none'}")
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


def _where_now(report, markdown: bool = True) -> str:
    """Where each database is now: markdown for the metadata (Dagster renders it), plain text
    for the run's log (shown as written)."""
    def role(name: str) -> str:
        return f"**{name}**" if markdown else name

    def db(name: str) -> str:
        return f"`{name}`" if markdown else name

    lines = []
    for d in report.databases:
        if d.restored_as == d.live and report.target == "live":
            line = f"- {role(d.role)}: swapped into place as {db(d.live)}"
            line += f"; the old one is kept as {db(d.kept_as)}" if d.kept_as else " (there was no live database)"
        else:
            line = f"- {role(d.role)}: restored into {db(d.restored_as)} (the live {db(d.live)} is untouched)"
        lines.append(line + f", {d.tables} tables, {d.rows:,} rows equal to the backup")
    return "\n".join(lines)


def _restore_before(config: RestoreConfig):
    """`before` as a time (the CLI's --before parser), refused together with a backup id."""
    from maestro_pipelines.backup import RestoreRefused
    from maestro_pipelines.backup.catalog import is_latest
    from maestro_pipelines.backup.restore import parse_before

    before = parse_before(config.before, "before")
    if before is not None and not is_latest(config.backup):
        raise RestoreRefused(
            f"Both backup ({config.backup}) and before ({config.before}) are set",
            "Set one: a backup id, or a time to take the latest verified backup before it",
        )
    return before


def _log_restore_done(log, report) -> None:
    log.info(f"Restore of backup {report.backup_id} done in {report.duration_s:.1f} s:\n"
             f"{_where_now(report, markdown=False)}")
    if report.missing_artifacts:
        log.warning(
            f"{len(report.missing_artifacts)} of {report.artifacts_checked} model artifacts listed in the backup are "
            f"missing from the store: {', '.join(report.missing_artifacts[:10])}"
        )
    for note in report.notes:
        log.warning(note)
    log.info(CLEANUP_HINT)


def _restore_metadata(report) -> dict:
    return {
        "backup_id": dg.MetadataValue.text(report.backup_id),
        "snapshot_at": dg.MetadataValue.timestamp(report.snapshot_at),
        "target": dg.MetadataValue.text(report.target),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
        "steps": steps_table(report.steps),
        "databases": _databases_table(report),
        "where_now": dg.MetadataValue.md(_where_now(report)),
        "artifacts_checked": dg.MetadataValue.int(report.artifacts_checked),
        "missing_artifacts": dg.MetadataValue.md(
            "\n".join(f"- `{key}`" for key in report.missing_artifacts) or "none"
        ),
        "notes": dg.MetadataValue.md("\n".join(f"- {note}" for note in report.notes) or "none"),
        "next_step": dg.MetadataValue.text(CLEANUP_HINT),
    }


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
    from maestro_pipelines.backup import resolve_restore_point, restore_backup
    from maestro_pipelines.backup.phases import PhaseLog

    if (config.to_time or "").strip() or (config.to_lsn or "").strip():
        return _restore_to_point(context, config, platform_db, mlflow, store)
    before = _restore_before(config)
    object_store = store.get_store()
    destinations, notes = live_destinations(platform_db, mlflow)
    for note in notes:
        context.log.info(note)
    entry = resolve_restore_point(object_store, config.backup, before=before, log=context.log.warning)
    roles = restore_roles(config, entry, destinations, context.log)
    # restore_backup logs "restoring ... into ..." itself, once its refusals (confirmation,
    # permissions, versions) are behind it: a refused restore never announces itself.
    context.log.info(f"Restore point: backup {entry.backup_id} from {object_store.url}")
    report = restore_backup(
        object_store,
        entry,
        destinations,
        target=config.target,
        confirm=config.confirm or None,
        roles=roles,
        jobs=config.jobs,
        progress=ProgressLog(context.log, "download"),
        log=context.log.info,
        phases=PhaseLog(context.log.info, milestones=True),  # each step logged as it ends
    )
    # From here on the restore is done (and, live, swapped): report only.
    _log_restore_done(context.log, report)
    return dg.Output(None, metadata=_restore_metadata(report))


def _point_roles(config: RestoreConfig, destinations, log) -> Optional[list[str]]:
    """restore_roles for a point in time: every configured database the server holds."""
    roles = [d.role for d in destinations]
    return _roles_to_restore(config, roles, "The recovered server", roles, "maestro restore --to-time TIME", log)


def _restore_to_point(context, config: RestoreConfig, platform_db, mlflow, store):
    """`to_time` / `to_lsn`: restore_to_point, the same report and metadata plus the point reached."""
    from maestro_pipelines.backup import RestoreRefused
    from maestro_pipelines.backup.catalog import is_latest
    from maestro_pipelines.backup.phases import PhaseLog
    from maestro_pipelines.backup.pitr.recover import RecoveryTarget
    from maestro_pipelines.backup.pitr.restore import restore_to_point
    from maestro_pipelines.clock import checked_timezone
    from maestro_pipelines.settings import load_settings

    if (config.before or "").strip() or not is_latest(config.backup):
        raise RestoreRefused("backup/before and to_time/to_lsn are both set",
                             "Set one: a backup (backup, before) or a point in time (to_time, to_lsn)")
    point = RecoveryTarget.parse(config.to_time, config.to_lsn, checked_timezone(load_settings().timezone),
                                 options=("to_time", "to_lsn"))
    destinations, notes = live_destinations(platform_db, mlflow)
    for note in notes:
        context.log.info(note)
    report = restore_to_point(
        store.get_store(), point, destinations, roles=_point_roles(config, destinations, context.log),
        target_mode=config.target, confirm=config.confirm or None, jobs=config.jobs,
        progress=ProgressLog(context.log, "download"), log=context.log.info,
        phases=PhaseLog(context.log.info, milestones=True),
    )
    _log_restore_done(context.log, report)
    metadata = _restore_metadata(report)
    metadata.update({
        "point_target": dg.MetadataValue.text(point.describe()),
        "reached_lsn": dg.MetadataValue.text(report.reached_lsn or ""),
        "reached_time": dg.MetadataValue.text(report.reached_time.isoformat() if report.reached_time else ""),
        "base_backup": dg.MetadataValue.text(report.base_id or ""),
    })
    return dg.Output(None, metadata=metadata)


@dg.job(
    tags=run_tags(RESTORE_KIND, RESTORE_MAX_RUNTIME_S, database_lane=True),
    description=(
        "On-call: restore a backup (latest, an id, or the latest before a time), or the databases as they were at "
        "a time or LSN (to_time, to_lsn: base backup + WAL), into scratch databases, or with target: live and "
        "confirm: <platform database> in place of the live ones (old ones kept aside)."
    ),
)
def restore_database():
    restore_from_backup()


class RestoreCleanupConfig(dg.Config):
    # The same defaults as `maestro restore cleanup`: scratch restores dropped, old live
    # databases (the only way back from a wrong restore) kept unless confirmed.
    dry_run: bool = Field(default=False, description="Only list what would be dropped; drop nothing.")
    confirm: Optional[str] = Field(
        default="",
        description="The platform database's name, typed out: also drop the old live databases "
        "(`<db>_pre_restore_<time>`). Empty: they are kept.",
    )


@dg.op(pool=BACKUP_POOL, tags={KIND_TAG: RESTORE_KIND})
@_restore_step
def drop_restore_leftovers(
    context: dg.OpExecutionContext,
    config: RestoreCleanupConfig,
    platform_db: PlatformDatabase,
    mlflow: MLflowRegistry,
    store: ObjectStoreResource,
):
    """List every database restores left (with size and age) and drop the scratch restores;
    the old live databases only with `confirm`; never those of a running or half-done restore."""
    from maestro_pipelines.backup import restore_cleanup
    from maestro_pipelines.backup.restore.recovery import half_done_swaps
    from maestro_pipelines.backup.restore import cleanup_summary, raise_for_in_use

    destinations, _notes = live_destinations(platform_db, mlflow)
    object_store = store.get_store()
    for half in half_done_swaps(object_store, destinations):
        context.log.error(f"HALF-DONE RESTORE: {half.describe()}. {half.hint()}")
    items = restore_cleanup(destinations, dry_run=config.dry_run, store=object_store, confirm=config.confirm or None)
    rows = []
    for item in items:
        context.log.info(item.describe())
        leftover = item.leftover
        rows.append(dg.TableRecord({
            "database": leftover.name,
            "kind": leftover.what,
            "live": leftover.live, "size_bytes": leftover.size_bytes,  # None: the server would not say
            "created_at": leftover.created_at.isoformat(), "action": item.action,
        }))
    dropped = sum(item.action == "dropped" for item in items)
    skipped = sum(not item.dropped for item in items)
    context.log.info(cleanup_summary(items, config.dry_run))
    raise_for_in_use(items)
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
                        dg.TableColumn("size_bytes", "int", description="empty: not readable by this user"),
                        dg.TableColumn("created_at", "string"),
                        dg.TableColumn("action", "string"),
                    ]
                ),
            ),
        },
    )


@dg.job(
    tags=run_tags(RESTORE_KIND, 3600, database_lane=True),
    description=(
        "List the databases restores left and drop the scratch ones (`<db>_restore_<time>`); the old live "
        "databases (`<db>_pre_restore_<time>`) only with confirm: the platform database's name."
    ),
)
def restore_cleanup_job():
    drop_restore_leftovers()


dr_drill_job = dg.define_asset_job(
    "dr_drill_job",
    selection=dg.AssetSelection.assets(dr_drill),
    description="The DR drill: restore the latest verified backup into scratch databases, verify, time, drop.",
    tags=run_tags(DRILL_KIND, DRILL_MAX_RUNTIME_S, database_lane=True),
)

restore_jobs = [restore_database, restore_cleanup_job, dr_drill_job]
