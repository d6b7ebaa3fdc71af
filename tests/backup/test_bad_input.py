"""A backup that cannot be taken says why in one line, names the setting to fix, never shows
a password, and leaves nothing in the store that could pass for a backup."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from maestro_pipelines.backup import BackupError, DatabaseTarget, backup_targets, create_backup, list_backups
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.settings import Settings
from tests.backup.conftest import keys
from tests.services import free_port

PASSWORD = "s3cret-Hunter2"


def nowhere(database: str = "maestro") -> URL:
    """A PostgreSQL URL with a password, on a loopback port nothing listens on."""
    return URL.create("postgresql+psycopg", username="maestro", password=PASSWORD, host="127.0.0.1",
                      port=free_port(), database=database)


def test_unreachable_database_is_one_error_naming_the_setting(local_case, tmp_path):
    """Nothing listening at MAESTRO_DATABASE_URL: one MaestroError that names the variable and
    where it points, without the password, and the store is left as it was."""
    url = nowhere()
    with pytest.raises(MaestroError) as raised:
        create_backup(local_case.store, [DatabaseTarget("platform", url, "MAESTRO_DATABASE_URL")])
    message = str(raised.value)
    assert message.startswith("MAESTRO_DATABASE_URL: nothing accepts connections at ")
    assert f"127.0.0.1:{url.port}/maestro" in message and PASSWORD not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert keys(local_case.store) == []

    settings = Settings(home=tmp_path, database_url=url.render_as_string(hide_password=False))
    with pytest.raises(MaestroError, match="^MAESTRO_DATABASE_URL: nothing accepts connections") as raised:
        backup_targets(settings)
    assert PASSWORD not in str(raised.value)


def test_unreachable_dagster_database_names_its_own_setting(pg18_databases, local_case):
    """When only Dagster's database is unreachable the error names MAESTRO_DAGSTER_DATABASE_URL,
    not the platform's setting, and no object is written."""
    platform = pg18_databases.create()
    targets = [DatabaseTarget("platform", pg18_databases.url(platform)),
               DatabaseTarget("dagster", nowhere("dagster"), "MAESTRO_DAGSTER_DATABASE_URL")]
    with pytest.raises(MaestroError, match="^MAESTRO_DAGSTER_DATABASE_URL: nothing accepts connections") as raised:
        create_backup(local_case.store, targets)
    assert PASSWORD not in str(raised.value)
    assert keys(local_case.store) == []


def permission_denied_setup(dbs, password: str = PASSWORD):
    """A platform database the admin can dump, and an MLflow database whose backup user may
    not read one of its tables."""
    platform = dbs.create()
    dbs.execute(platform, "CREATE TABLE tenants (id int)", "INSERT INTO tenants VALUES (1), (2)")
    mlflow = dbs.create(f"{platform}_mlflow")
    role = dbs.create_role(password)
    dbs.execute(
        mlflow,
        "CREATE TABLE visible (id int)", "INSERT INTO visible VALUES (1)",
        "CREATE TABLE secrets (id int)", "INSERT INTO secrets VALUES (1)",
        f'GRANT SELECT ON visible TO "{role}"',
    )
    return [DatabaseTarget("platform", dbs.url(platform)),
            DatabaseTarget("mlflow", dbs.url(mlflow, user=role, password=password), "MLFLOW_TRACKING_URI")]


def test_pg_dump_failure_says_what_pg_dump_said_and_commits_nothing(databases, local_case):
    """pg_dump refused (the backup user lacks SELECT on a table): a BackupError naming the
    database and pg_dump's own reason (permission denied for that table), no password, and
    no manifest, so nothing lists as a backup."""
    targets = permission_denied_setup(databases)
    with pytest.raises(BackupError) as raised:
        create_backup(local_case.store, targets)
    message = str(raised.value)
    assert "mlflow database" in message and PASSWORD not in message
    assert "permission denied for table secrets" in message, message
    assert list_backups(local_case.store) == []
    assert [k for k in keys(local_case.store) if k.endswith(("manifest.json", "mlflow.dump.zst"))] == []
    assert keys(local_case.store, "activity/") == []


def test_a_one_letter_password_does_not_mangle_what_pg_dump_said(databases, local_case):
    """The backup user's password is one letter ("e"): pg_dump's reason still reads as it
    said it. Hiding every "e" in its message used to print `p***rmission d***ni***d for
    tabl*** s***cr***ts`, which hid the cause along with the password."""
    targets = permission_denied_setup(databases, password="e")
    with pytest.raises(BackupError) as raised:
        create_backup(local_case.store, targets)
    message = str(raised.value)
    assert "permission denied for table secrets" in message, message
    assert "***" not in message and "pg_dump of mlflow database" in message


def test_failed_backup_removes_what_it_wrote(databases, local_case):
    """A backup that failed (rather than being killed) removes the objects it already wrote,
    the dumps of the databases before the failing one included: a failed nightly backup does
    not hold a full dump's worth of storage until retention's stale limit (12 h) passes."""
    targets = permission_denied_setup(databases)
    with pytest.raises(BackupError):
        create_backup(local_case.store, targets)
    assert keys(local_case.store, "backups/") == []


def test_a_password_from_pgpassword_works_for_the_dump_too(pg15, local_case, monkeypatch):
    """MAESTRO_DATABASE_URL without a password and PGPASSWORD in the environment (a common way
    to keep it out of URLs): Maestro's own connections use it through libpq, and so must
    pg_dump, or the backup fails where everything else works. A stray PGHOST must not
    redirect the dump to another server."""
    from tests.conftest import create_database, drop_database

    name = create_database(pg15, "pgpass")
    try:
        url = pg15.admin_url.set(database=name)
        monkeypatch.setenv("PGPASSWORD", str(url.password))
        monkeypatch.setenv("PGHOST", "no-such-host.invalid")
        manifest = create_backup(local_case.store, [DatabaseTarget("platform", url._replace(password=None), "MAESTRO_DATABASE_URL")])
        assert [d.role for d in manifest.databases] == ["platform"]
        assert list_backups(local_case.store)[0].backup_id == manifest.backup_id
    finally:
        drop_database(pg15, name)
