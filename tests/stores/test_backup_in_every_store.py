"""A backup lands, verifies, lists and archives in each of the four stores (local folder,
S3 on moto, GCS on its emulator, Azure Blob on Azurite), through the same code path the
nightly job and `maestro backup run` use. The corruption and kill cases run on local and S3
in tests/backup/; this proves the other two stores carry a backup end to end."""

from __future__ import annotations

from sqlalchemy import text

from maestro_pipelines.backup import (
    BackupOptions,
    DatabaseTarget,
    archive_month,
    create_backup,
    list_backups,
    verify_backup,
)
from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade


def test_backup_verifies_and_archives_in_every_store(store, pg18_database):
    upgrade(pg18_database)
    with engine_for(pg18_database.platform_url).connect() as conn:
        conn.execute(text("INSERT INTO tenants (name, display_name) SELECT 't' || g, 'Tenant ' || g FROM generate_series(1, 50) g"))
        conn.commit()
    # An artifact written by the store itself and one that MLflow would have written too.
    store.put_bytes("mlflow-artifacts/1/model.pkl", b"model bytes" * 1000)

    manifest = create_backup(store, [DatabaseTarget("platform", pg18_database.platform_url)], BackupOptions())
    assert manifest.database("platform").rows >= 51  # 50 tenants + alembic_version
    assert manifest.artifacts is not None and manifest.artifacts.count == 1

    report = verify_backup(store, manifest.backup_id)
    assert report.ok, report.problems
    assert report.toc_entries["platform"] >= 2
    [entry] = list_backups(store)
    assert entry.backup_id == manifest.backup_id and entry.verified

    archived, copied = archive_month(store, manifest.started_at.strftime("%Y-%m"))
    assert copied and archived.verified
    assert verify_backup(store, manifest.backup_id, month=archived.month).ok
