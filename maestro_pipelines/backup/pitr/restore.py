"""Restore to a point: a temporary server recovered to the target (recover.py), then the
chosen databases delivered through the same phases as a dump's restore.

    refuse early    the request, the live confirmation and the right to rename (as a dump's
                    restore does), before anything is extracted
    recover         recovered_server(...): extract, replay to the point, promote
    dump            pg_dump -Fd -j of each chosen database from the temporary server into the
                    restore's work folder, and its table checks (backup/consistency.py)
                    computed there: an in-memory manifest the verify phase compares with
    deliver         restore_backup(..., fetched=...): plan, pg_restore, verify, migrate,
                    swap (scratch by default, live only confirmed, old copies kept aside,
                    the journal) exactly as for a dump
The report is the dump restore's, with the point reached (reached_time, reached_lsn) and
the base backup it came from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.catalog import BackupEntry
from maestro_pipelines.backup.consistency import table_checks
from maestro_pipelines.backup.manifest import BackupManifest, DatabaseDump, utcnow
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.pgtools import CHECKSUM_SESSION_OPTIONS, libpq_environment, program, program_version
from maestro_pipelines.backup.pitr.recover import RecoveredServer, RecoveryError, RecoveryTarget, only_system_id, recovered_server
from maestro_pipelines.backup.restore.fetch import WORKDIR_PREFIX, remove_stale_workdirs
from maestro_pipelines.backup.restore.plan import _check_confirmation, check_half_done, check_may_swap, check_restore_request
from maestro_pipelines.backup.restore.run import restore_backup
from maestro_pipelines.backup.restore.state import LIVE, SCRATCH, RestoreRefused, RestoreReport, RestoreStep
from maestro_pipelines.backup.tethered import run_tethered
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.storage import ObjectStore


def choose_system_id(store: ObjectStore, destinations: list[DatabaseTarget], system_id: str | None = None) -> str:
    """The server to recover: the one given, the only one with base backups in the store, or
    the live platform server's (it still answers)."""
    if system_id:
        return str(system_id)
    only = only_system_id(store)
    if only is not None:
        return only
    from maestro_pipelines.backup.pitr.base import server_system_id

    primary = next((d for d in destinations if d.role == "platform"), destinations[0] if destinations else None)
    if primary is not None:
        try:
            return server_system_id(primary.url, primary.source)
        except Exception:  # the live server is gone: say what to pass instead
            pass
    raise RecoveryError(f"The store at {store.url} has base backups of no server, or of several",
                        "Name the server with --system-id (`maestro backup info` lists them)")


def _chosen(destinations: list[DatabaseTarget], roles: list[str] | None) -> list[DatabaseTarget]:
    by_role = {d.role: d for d in destinations}
    for role in roles or []:
        if role not in by_role:
            raise RestoreRefused(f"No database is configured for the '{role}' database",
                                 "Configure it (MLFLOW_TRACKING_URI, MAESTRO_DAGSTER_DATABASE_URL) or leave it out")
    return [by_role[r] for r in roles] if roles else list(destinations)


def refuse_early(store: ObjectStore, destinations: list[DatabaseTarget], roles: list[str] | None, target_mode: str,
                 confirm: str | None, jobs: int) -> list[DatabaseTarget]:
    """What restore_backup would refuse, refused before minutes of recovery."""
    check_restore_request(target_mode, roles, jobs)
    chosen = _chosen(destinations, roles)
    if not chosen:
        raise RestoreRefused("No database to restore is configured", "Set MAESTRO_DATABASE_URL")
    if target_mode == LIVE:
        _check_confirmation(chosen, confirm)
        check_may_swap(chosen)
        check_half_done(store, chosen, LIVE)
    return chosen


def dump_database(server: RecoveredServer, dest: DatabaseTarget, folder: Path, phases: PhaseProgress | None,
                  jobs: int = 2) -> DatabaseDump:
    """pg_dump of one database of the temporary server (directory format, `jobs` in parallel,
    uncompressed: it is read once, locally, by pg_restore -j), and its table checks there."""
    url = server.url(dest.database)
    path = folder / f"{dest.role}.dump"
    started = time.monotonic()
    name = f"pg_dump {dest.role}"
    if phases is not None:
        phases(Phase(name, current=dest.database))
    pg_dump = program("pg_dump", dest.client_programs)
    done = run_tethered([pg_dump, "--format=directory", f"--jobs={max(1, jobs)}", "--compress=0", "--no-password",
                         f"--file={path}"],
                        libpq_environment(url, "maestro-restore"))
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
        raise RecoveryError(f"pg_dump of {dest.database} from the recovered server failed: {said}",
                            "Nothing was restored; run the restore again")
    with psycopg_connect(url, options=CHECKSUM_SESSION_OPTIONS, source="the recovered server") as conn:
        checks = table_checks(conn)
    seconds = time.monotonic() - started
    size = sum(part.stat().st_size for part in path.iterdir())
    if phases is not None:
        phases(Phase(name, finished=True, seconds=seconds, detail=f"{len(checks)} tables from the recovered server"))
    return DatabaseDump(
        role=dest.role, database=dest.database, where=f"recovered server {server.base.system_id}", key=path.name,
        server_version=server.base.server_version, server_version_num=server.server_version_num or
        server.base.server_version_num, snapshot_at=server.reached_time or server.base.finished_at,
        wal_lsn=server.reached_lsn, dump_bytes=size, compressed_bytes=size, sha256="", duration_s=round(seconds, 3),
        database_bytes=0, tables=checks)


def point_entry(server: RecoveredServer, dumps: list[DatabaseDump], started_at) -> BackupEntry:
    """An in-memory backup of the recovered databases, for the restore's phases to deliver."""
    point_id = f"pitr-{server.base.base_id}-{(server.reached_lsn or server.base.stop_lsn).replace('/', '-')}"
    manifest = BackupManifest(point_id, started_at, utcnow(), program_version("pg_dump"), {"method": "none"}, dumps)
    return BackupEntry(point_id, "", None, manifest, None, None)


def _missing_databases(server: RecoveredServer, chosen: list[DatabaseTarget], explicit: bool) -> list[DatabaseTarget]:
    """The chosen databases the recovered server holds; asking for one it lacks is refused."""
    held = [d for d in chosen if d.database in server.databases]
    missing = [d for d in chosen if d.database not in server.databases]
    if (missing and explicit) or not held:
        names = ", ".join(f"{d.role} ({d.database})" for d in missing)
        raise RecoveryError(f"The server recovered to {server.target.describe()} has no database for {names}",
                            f"It holds: {', '.join(server.databases) or 'none'}; restore the others from a dump")
    return held


def restore_to_point(store: ObjectStore, target: RecoveryTarget, destinations: list[DatabaseTarget],
                     roles: list[str] | None = None, target_mode: str = SCRATCH, confirm: str | None = None,
                     jobs: int = 2, system_id: str | None = None, workdir: Path | None = None,
                     progress: Progress | None = None, log: Callable[[str], None] | None = None,
                     phases: PhaseProgress | None = None, upgrade_platform: bool = True,
                     pg_bin: Path | str | None = None) -> RestoreReport:
    """Restore the chosen databases (`roles`, default every configured one the recovered
    server holds) as they were at `target`: into scratch databases `<live>_restore_<stamp>`
    (default), or with target_mode `live` and `confirm` in place of the live ones (the old
    ones kept aside). A failed recovery touches no database. Report: restore_backup's, with
    reached_time, reached_lsn and base_id."""
    say = log or (lambda message: None)
    chosen = refuse_early(store, destinations, roles, target_mode, confirm, jobs)
    sid = choose_system_id(store, destinations, system_id)
    parent = Path(workdir or tempfile.gettempdir())
    remove_stale_workdirs(parent)
    dumps_folder = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    steps: list[RestoreStep] = []
    started_at = utcnow()

    def recorded(phase: Phase) -> None:
        if phase.finished:
            steps.append(RestoreStep(phase.name, phase.seconds, phase.detail))
        if phases is not None:
            phases(phase)

    try:
        with activity(store, "restore", f"pitr-{os.getpid()}-{started_at:%Y%m%dT%H%M%S}"), \
                recovered_server(store, sid, target, parent, say, recorded, pg_bin,
                                 users=[d.url.username for d in chosen if d.url.username]) as server:
            held = _missing_databases(server, chosen, explicit=bool(roles))
            dumps = [dump_database(server, dest, dumps_folder, recorded, jobs) for dest in held]
            entry = point_entry(server, dumps, started_at)
        files = {dump.role: dumps_folder / dump.key for dump in dumps}
        report = restore_backup(store, entry, destinations, target_mode, confirm, [d.role for d in held], jobs,
                                workdir=dumps_folder, progress=progress, upgrade_platform=upgrade_platform, log=say,
                                phases=phases, fetched=files)
    finally:
        shutil.rmtree(dumps_folder, ignore_errors=True)
    report.steps[:0] = steps
    report.started_at = started_at
    report.reached_time, report.reached_lsn, report.base_id = server.reached_time, server.reached_lsn, server.base.base_id
    left_out = [d for d in chosen if d not in held]
    report.notes.extend(f"{d.role}: the recovered server has no database {d.database}: not restored" for d in left_out)
    return report
