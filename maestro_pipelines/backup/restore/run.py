"""`restore_backup`: the phases of a restore, in order, over one `RestoreState`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.catalog import BackupEntry
from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.phases import PhaseProgress
from maestro_pipelines.backup.restore.check import verify_artifacts, verify_database
from maestro_pipelines.backup.restore.cleanup import clean_up
from maestro_pipelines.backup.restore.fetch import fetch, open_workdir, use_fetched
from maestro_pipelines.backup.restore.load import check_client_programs, migrate_database, restore_database
from maestro_pipelines.backup.restore.plan import announce, check_versions, plan_restore, refuse_plaintext_if_required
from maestro_pipelines.backup.restore.state import LIVE, SCRATCH, RestoreReport
from maestro_pipelines.backup.restore.swap import swap
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.storage import ObjectStore


def restore_backup(
    store: ObjectStore,
    entry: BackupEntry,
    destinations: list[DatabaseTarget],
    target: str = SCRATCH,
    confirm: str | None = None,
    roles: list[str] | None = None,
    jobs: int = 2,
    workdir: Path | None = None,
    progress: Progress | None = None,
    upgrade_platform: bool = True,
    log: Callable[[str], None] | None = None,
    phases: PhaseProgress | None = None,
    fetched: dict[str, Path] | None = None,
) -> RestoreReport:
    """Restore `entry` into the servers of `destinations` (role -> the live database's URL).
    `progress` follows the download's bytes, `phases` every step from the download on.

    target `scratch` (default): restored databases stay next to the live ones as
    `<live>_restore_<stamp>` (report.databases[i].restored_as). target `live`: swapped into
    place; needs `confirm` equal to the platform database's name (or, without a platform
    database among the roles, the first one's).

    `fetched` (role -> a dump file on local disk): dumps the caller already made and checked
    (a restore to a point dumps its temporary server), used instead of the download."""
    if fetched is None:
        refuse_plaintext_if_required(store, entry)
    state = plan_restore(store, entry, destinations, target, confirm, roles, jobs, workdir=workdir,
                         upgrade_platform=upgrade_platform, progress=progress, log=log, phases=phases)
    check_versions(state)
    check_client_programs(state)
    announce(state)
    open_workdir(state)
    failed = True
    try:
        with activity(store, "restore", state.stamp):
            if fetched is None:
                fetch(state)
            else:
                use_fetched(state, fetched)
            for database in state.databases:
                restore_database(state, database)
                verify_database(state, database)
                migrate_database(state, database)
            verify_artifacts(state)
            if state.target == LIVE:
                swap(state)
        failed = False
    finally:
        clean_up(state, failed)
    state.report.finished_at = utcnow()
    return state.report
