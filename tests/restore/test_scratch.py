"""A scratch restore brings back exactly what was backed up, next to the live databases,
on PostgreSQL 18 and 15, from a local folder and from S3."""

from __future__ import annotations

from maestro_pipelines.backup import SCRATCH, get_backup, restore_backup
from tests.backup.conftest import count_rows
from tests.restore.conftest import contents, tenants


def test_scratch_restore_equals_the_source(installation, case):
    """Restoring a backup of the platform, MLflow and Dagster databases gives databases whose
    every row, sequence position and schema equal the source at backup time; the live
    databases are left alone, and the report says where each one is and how long each
    step took (what an operator reads before pointing anything at the restored data)."""
    inst = installation
    dbs = inst.dbs
    manifest = inst.backup(case.store)
    before = {name: contents(dbs, name) for name in inst.names}
    dbs.execute(inst.platform, "INSERT INTO tenants (name) VALUES ('after-the-backup')")

    report = restore_backup(case.store, get_backup(case.store, manifest.backup_id), inst.destinations())

    assert report.ok and report.target == SCRATCH and report.backup_id == manifest.backup_id
    assert report.snapshot_at == manifest.snapshot_at
    assert [(d.role, d.live, d.kept_as) for d in report.databases] == [
        ("platform", inst.platform, None), ("mlflow", inst.mlflow, None), ("dagster", inst.dagster, None)
    ]
    for restored, live in zip(report.databases, inst.names):
        assert restored.restored_as.startswith(f"{live}_restore_")
        assert restored.url.database == restored.restored_as
        assert contents(dbs, restored.restored_as) == before[live], f"{restored.role} differs from the backup"
        assert count_rows(dbs, restored.restored_as) == {t.qualified: t.rows for t in manifest.database(restored.role).tables}
        assert restored.tables == len(manifest.database(restored.role).tables)
        assert restored.rows == manifest.database(restored.role).rows
    assert tenants(dbs, inst.platform)[-1] == "after-the-backup", "the scratch restore touched the live database"
    assert sorted(inst.leftovers()) == sorted(d.restored_as for d in report.databases)

    names = [s.name for s in report.steps]
    assert names == [
        "check versions", "download and check",
        "pg_restore platform", "verify platform", "migrations (platform)",
        "pg_restore mlflow", "verify mlflow",
        "pg_restore dagster", "verify dagster",
        "artifacts",
    ]
    assert all(s.seconds >= 0 for s in report.steps)
    assert sum(s.seconds for s in report.steps) <= report.duration_s
    assert report.step_seconds().keys() == set(names)
    assert report.finished_at is not None and report.finished_at >= report.started_at
