"""Restoring a backup, in named phases over one `RestoreState` (state.py), like pgBackRest's
restore command. `restore_backup` (run.py) runs them in order:

    plan      plan.py     restore point, request checks (target, confirmation, rights to rename,
                          no half-done restore in the way), stamp and scratch names; reads only
              check_versions: each destination server the dump's major version or newer
              load.check_client_programs: pg_restore (MAESTRO_PG_BIN's) reads the dumps, has the SSL asked
    fetch     fetch.py    every dump downloaded into a work folder, sha256 + zstd + sizes checked,
                          before any database is touched
    restore   load.py     CREATE DATABASE <live>_restore_<stamp>; pg_restore -j N --no-owner
                          --no-privileges, the optional extensions filtered out of its list
    verify    check.py    row counts and content checksums compared with the manifest; the model
                          artifacts present in the store
              load.migrate_database: alembic upgrade head (platform database)
    swap      swap.py     live only: journal, end sessions, RENAME <live> TO <live>_pre_restore_<stamp>,
                          RENAME <live>_restore_<stamp> TO <live> (one transaction per database)
    clean up  cleanup.py  a failure before the swap drops what the restore created (the live
                          databases are as they were); the restore's own work folder goes either way

The pre-restore databases stay until `restore_cleanup` (cleanup.py); a killed swap is finished
or undone by recovery.py. Works without Dagster (the CLI restores when Dagster's own database
is the thing that was lost). Database administration (create, drop, rename, end sessions) is
`platform_db.admin`.
"""

from maestro_pipelines.backup.restore.check import check_artifacts, verify_artifacts, verify_database
from maestro_pipelines.backup.restore.cleanup import (
    LEFTOVER,
    CleanupItem,
    Leftover,
    clean_up,
    cleanup_confirmation,
    cleanup_summary,
    raise_for_in_use,
    restore_cleanup,
    restore_leftovers,
    running_restore_stamps,
)
from maestro_pipelines.backup.restore.fetch import WORKDIR_PREFIX, download_dump, fetch, open_workdir, remove_stale_workdirs
from maestro_pipelines.backup.restore.load import (
    OPTIONAL_EXTENSIONS,
    create_scratch_database,
    migrate_database,
    restore_database,
    run_pg_restore,
)
from maestro_pipelines.backup.restore.plan import (
    announce,
    check_may_swap,
    check_restore_request,
    check_versions,
    parse_before,
    plan_restore,
    resolve_restore_point,
)
from maestro_pipelines.backup.restore.run import restore_backup
from maestro_pipelines.backup.restore.state import (
    LIVE,
    MAX_JOBS,
    NAME_LIMIT,
    SCRATCH,
    DatabasePlan,
    DatabaseRestore,
    RestoreError,
    RestoreRefused,
    RestoreReport,
    RestoreState,
    RestoreStep,
    restore_database_name,
    timed,
)
from maestro_pipelines.backup.restore.swap import swap
from maestro_pipelines.platform_db.admin import DatabaseInUse, drop_database

__all__ = [
    "LEFTOVER", "LIVE", "MAX_JOBS", "NAME_LIMIT", "OPTIONAL_EXTENSIONS", "SCRATCH", "WORKDIR_PREFIX",
    "CleanupItem", "DatabaseInUse", "DatabasePlan", "DatabaseRestore", "Leftover", "RestoreError", "RestoreRefused",
    "RestoreReport", "RestoreState", "RestoreStep",
    "announce", "check_artifacts", "check_may_swap", "check_restore_request", "check_versions", "clean_up",
    "cleanup_confirmation", "cleanup_summary", "create_scratch_database", "download_dump", "drop_database", "fetch", "migrate_database",
    "open_workdir", "parse_before", "plan_restore", "raise_for_in_use", "remove_stale_workdirs", "resolve_restore_point",
    "restore_backup", "restore_cleanup", "restore_database", "restore_database_name", "restore_leftovers",
    "run_pg_restore", "running_restore_stamps", "swap", "timed", "verify_artifacts", "verify_database",
]
