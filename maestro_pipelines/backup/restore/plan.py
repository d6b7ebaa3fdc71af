"""Phase 1, plan: which backup, which databases, under which names, and may this user do it.

Everything here only reads (the store's listings and journals, pg_database, pg_roles): a
refused restore has touched nothing. `plan_restore` returns the `RestoreState` every later
phase works on; `check_versions` is its last check, against each destination server.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from maestro_pipelines.backup.catalog import BackupEntry, check_objects, get_backup, is_latest, list_backups
from maestro_pipelines.backup.journal import interrupted_swaps
from maestro_pipelines.backup.manifest import BackupNotFound, utcnow
from maestro_pipelines.backup.phases import PhaseProgress
from maestro_pipelines.backup.pgtools import where
from maestro_pipelines.backup.restore.cleanup import running_restore_stamps
from maestro_pipelines.backup.restore.recovery import half_done_swaps
from maestro_pipelines.backup.restore.state import (
    LIVE,
    MAX_JOBS,
    SCRATCH,
    DatabasePlan,
    DatabaseRestore,
    RestoreRefused,
    RestoreReport,
    RestoreState,
    restore_database_name,
    stamp_of,
)
from maestro_pipelines.backup.sealing import keyring_of
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.crypto.keys import ENCRYPTION_VARIABLE
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.admin import database_names, quote_ident, server_url, server_version
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.storage import ObjectStore

# ---- the restore point ---------------------------------------------------------------------


def parse_before(value: str | None, option: str = "before") -> datetime | None:
    """A restore point's `before` time: ISO 8601, UTC when it has no zone; None when empty.
    `option` names it in the error (`--before` for the CLI, `before` for the job's config)."""
    if not value or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise MaestroError(
            f"{option} '{value}' is not a time", "Write it as ISO 8601, e.g. 2026-11-26T14:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _candidates(store: ObjectStore, before: datetime | None) -> list[BackupEntry]:
    """Daily backups, oldest first; with `before`, those older than it, monthly archives included
    (they outlive the daily backups by a year)."""
    if before is None:
        return list_backups(store)
    return sorted(
        (e for e in list_backups(store) + list_backups(store, monthly=True)
         if e.manifest and e.manifest.snapshot_at < before),
        key=lambda e: e.manifest.snapshot_at,
    )


def resolve_restore_point(store: ObjectStore, backup: str = "latest", before: datetime | None = None,
                          log: Callable[[str], None] | None = None) -> BackupEntry:
    """`latest` (newest verified), a backup id, or with `before` the newest verified backup
    whose snapshot is older than that time (monthly archives included).

    For `latest` and `before`, each candidate, newest first, has its objects checked with a
    head each (`check_objects`: missing, another size or recorded sha256, altered in place);
    one that no longer matches its manifest, or whose last verification failed, is skipped
    with one line to `log` naming it and why, and the next one is tried. A byte changed with
    size and records left as they were is not seen by a head: the restore's own download
    (every byte against the sha256) refuses it, and `maestro backup verify` finds it."""
    if is_latest(backup):
        backup = "latest"  # `newest` is its alias
    if before is None and backup != "latest":
        entry = get_backup(store, backup)
        if entry.manifest is None:
            raise BackupNotFound(
                f"Backup {entry.backup_id} cannot be used: {entry.problem}",
                "Pick another restore point (`maestro backup list`)",
            )
        return entry
    say = log or (lambda message: None)
    skipped: list[str] = []
    for entry in reversed(_candidates(store, before)):
        name = entry.backup_id + (f" (monthly archive {entry.month})" if entry.month else "")
        if entry.verification_failed:
            why = entry.bad
        elif not entry.verified:
            continue  # never verified (`backup run --no-verify`): not a candidate, nothing wrong
        elif check_objects(store, entry) is None:
            return entry
        else:
            why = f"{entry.damage}; `maestro backup verify {entry.backup_id}` checks it fully"
        skipped.append(f"{name}: {why}")
        say(f"skipping backup {skipped[-1]}")
    when = f"taken before {before.isoformat()} " if before is not None else ""
    also = f"; {len(skipped)} skipped, the latest {skipped[0]}" if skipped else ""
    raise BackupNotFound(
        f"There is no verified backup {when}in the store at {store.url}{also}",
        "Run `maestro backup list` to see the backups and their times"
        if before is not None
        else "Run `maestro backup run` (and `maestro backup verify ID`), or name a backup id",
    )


# ---- the request ---------------------------------------------------------------------------


def check_restore_request(target: object, roles: list[str] | None, jobs: object) -> None:
    """Refuse a restore request that cannot mean anything, before any store or server is
    read: the CLI and the restore job both pass here."""
    if target not in (SCRATCH, LIVE):
        shown = str(target)[:20]
        raise RestoreRefused(f"Unknown restore target '{shown}'", "Use 'scratch' (default) or 'live', in lowercase")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise RestoreRefused(
            f"{jobs!r} parallel pg_restore jobs is out of range", f"Use a whole number from 1 to {MAX_JOBS} (default 2)"
        )
    seen: set[str] = set()
    for role in roles or []:
        if not isinstance(role, str) or not role.strip():
            raise RestoreRefused("An empty database role was given", "Name roles like platform,mlflow,dagster")
        if role in seen:
            raise RestoreRefused(f"The databases to restore name '{role[:20]}' twice",
                                 "Name each of platform, mlflow and dagster at most once")
        seen.add(role)


def _wanted_roles(entry: BackupEntry, by_role: dict[str, DatabaseTarget], roles: list[str] | None) -> list[str]:
    """The roles to restore: those asked for, else every configured one the backup holds."""
    manifest = entry.manifest
    wanted = roles or [d.role for d in manifest.databases if d.role in by_role]
    for role in wanted:
        if role not in by_role:
            raise RestoreRefused(f"No database is configured for the backup's '{role}' database",
                                 "Configure it (MLFLOW_TRACKING_URI, MAESTRO_DAGSTER_DATABASE_URL) or leave it out")
        manifest.database(role)  # refuses roles the backup does not hold
    if not wanted:
        raise RestoreRefused(f"Backup {entry.backup_id} holds none of the configured databases",
                             f"It holds: {', '.join(d.role for d in manifest.databases)}")
    return wanted


def _check_confirmation(chosen: list[DatabaseTarget], confirm: str | None) -> None:
    """A live restore replaces the live databases: `confirm` must name the platform database
    (or, without it among them, the first one)."""
    primary = next((d.database for d in chosen if d.role == "platform"), chosen[0].database)
    if confirm != primary:
        wrong = f", and the confirmation '{confirm[:60]}' does not name {primary}" if confirm else ""
        raise RestoreRefused(
            f"Restoring into the live databases ({', '.join(d.database for d in chosen)}) replaces them{wrong}",
            f"Confirm with --confirm {primary} (job: confirm: {primary}); the old ones are kept aside until "
            "`maestro restore cleanup`",
        )


def check_may_swap(destinations: list[DatabaseTarget]) -> None:
    """A live restore renames every live database; refuse up front, before anything is
    restored, when the connecting user may not rename one of them (superuser, or member of
    the owning role with CREATEDB), so no restore ever swaps some databases and not others."""
    for dest in destinations:
        with psycopg_connect(server_url(dest.url), autocommit=True, source=dest.source) as conn:
            row = conn.execute(
                "SELECT r.rolsuper, r.rolcreatedb, d.datname IS NULL, "
                "coalesce(pg_has_role(d.datdba, 'MEMBER'), true), pg_get_userbyid(d.datdba) "
                "FROM pg_roles r LEFT JOIN pg_database d ON d.datname = %s WHERE r.rolname = current_user",
                [dest.database],
            ).fetchone()
        superuser, createdb, missing, owns, owner = row
        if superuser or (createdb and (missing or owns)):
            continue
        user = dest.url.username or "the connecting user"
        need = "CREATEDB" if not createdb else f"to own it (it belongs to {owner})"
        raise RestoreRefused(
            f"{user} may not rename the live database '{dest.database}' at {where(dest.url)}: it needs {need}",
            f"Nothing was restored. Restore as its owner or a superuser, or run "
            f"ALTER DATABASE {quote_ident(dest.database)} OWNER TO {quote_ident(user)} (and ALTER ROLE ... CREATEDB); "
            "a scratch restore needs neither",
        )


def check_half_done(store: ObjectStore, destinations: list[DatabaseTarget], target: str) -> list[str]:
    """A live restore is refused while an earlier one is half done (finish or undo it first);
    a scratch restore goes ahead and says so (returned as notes)."""
    if target != LIVE:
        return [journal.summary() for journal in interrupted_swaps(store)]
    for half in half_done_swaps(store, destinations):
        raise RestoreRefused(half.describe(), "Nothing was restored. " + half.hint())
    return []


def free_stamp(store: ObjectStore, destinations: list[DatabaseTarget], start: datetime) -> str:
    """The first one-second stamp from `start` on that names no existing database of any
    destination and no running restore: a restore or drill started in the same second
    (a scheduled drill while on-call restores) must not take over the other's databases."""
    taken: set[str] = set()
    for dest in destinations:
        taken |= database_names(dest.url, dest.source)
    running = running_restore_stamps(store)
    for offset in range(3600):
        stamp = stamp_of(start + timedelta(seconds=offset))
        names = {restore_database_name(d.database, kind, stamp) for d in destinations for kind in ("restore", "pre_restore")}
        if stamp not in running and not names & taken:
            return stamp
    raise RestoreRefused(
        "Every restore name for the next hour is taken on the destination servers",
        "Drop old restores with `maestro restore cleanup`",
    )


# ---- the plan ------------------------------------------------------------------------------


def plan_restore(store: ObjectStore, entry: BackupEntry, destinations: list[DatabaseTarget], target: str = SCRATCH,
                 confirm: str | None = None, roles: list[str] | None = None, jobs: int = 2, *,
                 workdir: Path | None = None, upgrade_platform: bool = True, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, phases: PhaseProgress | None = None) -> RestoreState:
    """Check the request (target, confirmation, the right to rename, no half-done restore in
    the way), pick a stamp no database or running restore uses, and name each database's
    scratch copy `<live>_restore_<stamp>`. Reads only; raises RestoreRefused."""
    check_restore_request(target, roles, jobs)
    if entry.manifest is None:
        raise RestoreRefused(f"Backup {entry.backup_id} has no readable manifest", "Pick another restore point")
    check_keys(entry)
    by_role = {d.role: d for d in destinations}
    chosen = [by_role[role] for role in _wanted_roles(entry, by_role, roles)]
    if target == LIVE:
        _check_confirmation(chosen, confirm)
        check_may_swap(chosen)
    half_done_notes = check_half_done(store, destinations, target)
    started_at = utcnow()
    stamp = free_stamp(store, chosen, started_at)
    report = RestoreReport(entry.backup_id, entry.manifest.snapshot_at, target, started_at, notes=list(half_done_notes))
    state = RestoreState(store, entry, target, stamp, report, [], jobs=jobs, upgrade_platform=upgrade_platform,
                         workdir=Path(workdir) if workdir is not None else None, progress=progress, phases=phases,
                         log=log or (lambda message: None))
    for note in half_done_notes:
        state.log(f"warning: {note}")
    for dest in chosen:
        scratch = restore_database_name(dest.database, "restore", stamp)
        result = DatabaseRestore(dest.role, dest.database, scratch, url=dest.url)
        report.databases.append(result)
        state.databases.append(DatabasePlan(entry.manifest.database(dest.role), dest, result, scratch))
    return state


def check_keys(entry: BackupEntry) -> None:
    """An encrypted backup is restored only with its data key opened and its manifest's MAC
    checked: without it, the one line naming the key it needs."""
    if entry.unchecked:
        raise entry.key_error


def refuse_plaintext_if_required(store: ObjectStore, entry: BackupEntry) -> None:
    """With MAESTRO_BACKUP_ENCRYPTION=required a plaintext backup in the store is refused too:
    a plaintext manifest put in place of an encrypted one has no MAC to betray it. (Not for
    dumps the restore made itself, as a restore to a point does.)"""
    if not entry.encrypted and keyring_of(store).required:
        raise RestoreRefused(
            f"Backup {entry.backup_id} is not encrypted and {ENCRYPTION_VARIABLE}=required: its integrity rests on "
            "a sha256 anyone who can write the store can recompute",
            f"Nothing was restored. Restore an encrypted backup, or unset {ENCRYPTION_VARIABLE} for this restore "
            "if this backup predates the key",
        )


def check_versions(state: RestoreState) -> None:
    """The step `check versions`: every destination server is the dump's major version or newer
    (pg_restore cannot restore into an older server)."""
    def versions() -> str:
        details = []
        for plan in state.databases:
            dump, dest = plan.dump, plan.dest
            server = server_version(dest.url, dest.source)
            if server // 10000 < dump.server_major:
                raise RestoreRefused(
                    f"Backup {state.entry.backup_id}'s {dump.role} database comes from PostgreSQL "
                    f"{dump.server_version}, newer than the target server at {where(dest.url)} "
                    f"(PostgreSQL {server // 10000})",
                    "Restore onto a server of the same or a newer major version",
                )
            details.append(f"{dump.role}: PostgreSQL {dump.server_major} -> {server // 10000}")
        return "; ".join(details)

    state.timed("check versions", versions)


def announce(state: RestoreState) -> None:
    """Said only once the checks passed: a refused restore never announces itself."""
    state.log(f"restoring backup {state.entry.backup_id} (snapshot {state.manifest.snapshot_at:%Y-%m-%d %H:%M:%S} UTC) "
              f"into {'the LIVE databases' if state.target == LIVE else 'scratch databases'}")
