"""The backup and restore library: pg_dump streamed into the object store, manifests,
verification, retention, monthly archives.

It never imports Dagster, so the `maestro` CLI can back up and restore when the orchestrator
(or its own database) is the thing that was lost; the Dagster assets call the same functions.

    from maestro_pipelines.backup import backup_targets, create_backup, verify_backup

    targets, notes = backup_targets(load_settings())
    manifest = create_backup(store, targets)          # manifest.json written last
    report = verify_backup(store, manifest.backup_id) # sizes, sha256, pg_restore --list
    restore_backup(store, resolve_restore_point(store, "latest"), database_targets(settings)[0])
    run_drill(store, database_targets(settings)[0])   # scratch restore, verified, RTO/RPO
"""

from maestro_pipelines.backup.activity import Activity, activity, running_activities
from maestro_pipelines.backup.archive import archive_month
from maestro_pipelines.backup.catalog import (
    BackupEntry,
    check_objects,
    get_backup,
    list_backups,
    newest_verified,
    object_key,
)
from maestro_pipelines.backup.create import BackupOptions, create_backup
from maestro_pipelines.backup.manifest import (
    BackupError,
    BackupManifest,
    BackupNotFound,
    DatabaseDump,
    ManifestInvalid,
    TableCheck,
)
from maestro_pipelines.backup.drill import DrillReport, run_drill
from maestro_pipelines.backup.restore import (
    LIVE,
    SCRATCH,
    RestoreError,
    RestoreRefused,
    RestoreReport,
    resolve_restore_point,
    restore_backup,
    restore_cleanup,
    restore_leftovers,
)
from maestro_pipelines.backup.retention import RetentionPlan, RetentionPolicy, apply_retention, plan_retention
from maestro_pipelines.backup.targets import backup_targets, database_targets
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.backup.verify import VerifyReport, verify_backup

__all__ = [
    "Activity",
    "BackupEntry",
    "BackupError",
    "BackupManifest",
    "BackupNotFound",
    "BackupOptions",
    "DatabaseDump",
    "DatabaseTarget",
    "DrillReport",
    "LIVE",
    "SCRATCH",
    "RestoreError",
    "RestoreRefused",
    "RestoreReport",
    "ManifestInvalid",
    "Progress",
    "RetentionPlan",
    "RetentionPolicy",
    "TableCheck",
    "VerifyReport",
    "activity",
    "apply_retention",
    "archive_month",
    "backup_targets",
    "check_objects",
    "create_backup",
    "database_targets",
    "resolve_restore_point",
    "restore_backup",
    "restore_cleanup",
    "restore_leftovers",
    "run_drill",
    "get_backup",
    "list_backups",
    "newest_verified",
    "object_key",
    "plan_retention",
    "running_activities",
    "verify_backup",
]
