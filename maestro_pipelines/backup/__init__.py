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

The names below are imported on first use (PEP 562): `maestro wal push` runs once per WAL
segment and needs none of them (importing them all costs ~150 ms: SQLAlchemy, psycopg).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Activity": "activity",
    "BackupEntry": "catalog",
    "BackupError": "manifest",
    "BackupManifest": "manifest",
    "BackupNotFound": "manifest",
    "BackupOptions": "create",
    "DatabaseDump": "manifest",
    "DatabaseTarget": "types",
    "DrillReport": "drill",
    "LIVE": "restore",
    "SCRATCH": "restore",
    "RestoreError": "restore",
    "RestoreRefused": "restore",
    "RestoreReport": "restore",
    "ManifestInvalid": "manifest",
    "Progress": "types",
    "RetentionPlan": "retention",
    "RetentionPolicy": "retention",
    "TableCheck": "manifest",
    "VerifyReport": "verify",
    "activity": "activity",
    "apply_retention": "retention",
    "archive_month": "archive",
    "backup_targets": "targets",
    "check_objects": "catalog",
    "create_backup": "create",
    "database_targets": "targets",
    "resolve_restore_point": "restore",
    "restore_backup": "restore",
    "restore_cleanup": "restore",
    "restore_leftovers": "restore",
    "run_drill": "drill",
    "get_backup": "catalog",
    "list_backups": "catalog",
    "newest_verified": "catalog",
    "object_key": "catalog",
    "plan_retention": "retention",
    "running_activities": "activity",
    "verify_backup": "verify",
}

__all__ = sorted(_EXPORTS)

# `activity` is also a submodule's name: once anything imports that submodule, the package's
# attribute is the module and __getattr__ is never asked, so the function is bound now (light).
from maestro_pipelines.backup.activity import Activity, activity, running_activities  # noqa: E402


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports
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
