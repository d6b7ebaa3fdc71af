"""Restoring as Maestro's own database user, not a superuser: it owns the platform database
and may create databases (CREATEDB), which is all a restore beside the live databases needs."""

from __future__ import annotations

import pytest

from maestro_pipelines.backup import LIVE, SCRATCH, DatabaseTarget, RestoreError, get_backup, restore_backup
from maestro_pipelines.platform_db.admin import quote_ident
from tests.restore.conftest import Installation, contents, tenants

PASSWORD = "restorer-password"


def restorer(inst: Installation, owns: list[str]) -> list[DatabaseTarget]:
    """A CREATEDB role owning the databases `owns`; the installation's destinations as it."""
    role = inst.dbs.create_role(PASSWORD)
    inst.dbs.execute("postgres", f"ALTER ROLE {quote_ident(role)} CREATEDB",
                     *[f"ALTER DATABASE {quote_ident(name)} OWNER TO {quote_ident(role)}" for name in owns])
    return [DatabaseTarget(d.role, d.url.set(username=role, password=PASSWORD), d.source) for d in inst.destinations()]


def test_restore_by_the_owner_of_a_database_with_an_administrators_extension(pg18_installation, local_case):
    """An administrator created pg_stat_statements in the platform database (as migration
    0003 tells them to when Maestro's user may not); Maestro's user, which cannot create
    that extension, can still restore the platform database: the extension is optional to
    Maestro (the migration goes on without it), so at most a note, never a failed restore."""
    inst = pg18_installation
    dbs = inst.dbs
    assert dbs.scalar(inst.platform, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'") == 1
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)
    destinations = restorer(inst, owns=[inst.platform])

    try:
        report = restore_backup(store, entry, destinations, target=SCRATCH, roles=["platform"])
    except RestoreError as failed:
        pytest.fail(f"{failed} / {failed.hint}")
    assert report.ok
    assert tenants(dbs, report.databases[0].restored_as) == ["acme", "globex", "initech"]


def test_live_restore_swaps_every_database_or_none(pg18_installation, local_case):
    """Maestro's user owns the platform database but not MLflow's (created by a DBA, say):
    it can restore both beside the live ones but cannot rename MLflow's. The restore must
    then fail (or refuse up front) with a RestoreError and leave the platform database as it
    was, rather than swap the platform database alone: the backup's platform database and
    MLflow registry describe one moment, and so must the live ones."""
    inst = pg18_installation
    dbs = inst.dbs
    dbs.execute(inst.platform, "DROP EXTENSION pg_stat_statements")  # see the test above
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)
    destinations = restorer(inst, owns=[inst.platform])
    dbs.execute(inst.platform, "INSERT INTO tenants (name) VALUES ('after-the-backup')")
    live_before = {name: contents(dbs, name, schema=False) for name in inst.names}

    with pytest.raises(RestoreError) as failed:
        restore_backup(store, entry, destinations, target=LIVE, confirm=inst.platform)

    assert inst.mlflow in str(failed.value)
    assert tenants(dbs, inst.platform)[-1] == "after-the-backup", "the platform database was swapped alone"
    assert {name: contents(dbs, name, schema=False) for name in inst.names} == live_before
