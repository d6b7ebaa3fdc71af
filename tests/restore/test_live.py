"""Restoring into the live databases: refused without confirmation, then swapped into place
with the old databases kept aside until `restore_cleanup`; also when they were dropped."""

from __future__ import annotations

import pytest

from maestro_pipelines.backup import LIVE, RestoreRefused, get_backup, restore_backup, restore_cleanup, running_activities
from tests.restore.conftest import contents, database_names, tenants


def test_live_restore_needs_confirmation_and_creates_nothing_without_it(pg18_installation, local_case):
    """Without `confirm` naming the platform database (or with another name) a live
    restore is refused before anything happens: no database is created, nothing is marked
    running in the store, and the error says how to confirm."""
    inst = pg18_installation
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)
    for confirm in (None, inst.mlflow, "yes"):
        with pytest.raises(RestoreRefused) as refused:
            restore_backup(store, entry, inst.destinations(), target=LIVE, confirm=confirm)
        assert f"--confirm {inst.platform} (job: confirm: {inst.platform})" in refused.value.hint
        assert inst.platform in str(refused.value) and inst.mlflow in str(refused.value)
    assert database_names(inst.dbs, inst.platform) == sorted(inst.names), "a refused restore created a database"
    assert inst.leftovers() == []
    assert running_activities(store) == []


def test_live_restore_replaces_the_live_databases_and_keeps_the_old_ones(installation, local_case):
    """With confirmation the live databases hold the backup's data (rows written after the
    backup are gone), under their own names, so every client reconnects to the restored data;
    the old ones are kept as `<name>_pre_restore_<stamp>` with those later rows, until
    `restore_cleanup` drops them and says which it dropped."""
    inst = installation
    dbs = inst.dbs
    store = local_case.store
    manifest = inst.backup(store)
    at_backup = {name: contents(dbs, name) for name in inst.names}
    dbs.execute(inst.platform, "INSERT INTO tenants (name) VALUES ('after-the-backup')")
    dbs.execute(inst.mlflow, "INSERT INTO experiments (name) VALUES ('after-the-backup')")
    dbs.execute(inst.dagster, "DELETE FROM event_logs")
    after_backup = {name: contents(dbs, name, schema=False) for name in inst.names}

    report = restore_backup(store, get_backup(store, manifest.backup_id), inst.destinations(),
                            target=LIVE, confirm=inst.platform)

    assert report.ok and report.target == LIVE
    for restored, live in zip(report.databases, inst.names):
        assert (restored.live, restored.restored_as, restored.url.database) == (live, live, live)
        assert restored.kept_as is not None and restored.kept_as.startswith(f"{live}_pre_restore_")
        assert contents(dbs, live) == at_backup[live], f"live {restored.role} database is not the backup's data"
        assert contents(dbs, restored.kept_as, schema=False) == after_backup[live], "the old database was not kept as it was"
    assert "after-the-backup" not in tenants(dbs, inst.platform)
    assert tenants(dbs, report.databases[0].kept_as)[-1] == "after-the-backup"
    assert "swap" in report.step_seconds()
    kept = sorted(d.kept_as for d in report.databases)
    assert sorted(inst.leftovers()) == kept

    # The old databases are the only way back: kept unless the cleanup is confirmed.
    by_default = [i for i in restore_cleanup(inst.destinations(), store=store) if i.leftover.configured]
    assert {i.leftover.name: i.action.split(":")[0] for i in by_default} == {name: "kept" for name in kept}
    assert sorted(inst.leftovers()) == kept
    dropped = [i for i in restore_cleanup(inst.destinations(), store=store, confirm=inst.platform) if i.leftover.configured]
    assert sorted(i.leftover.name for i in dropped if i.action == "dropped") == kept
    assert {i.leftover.kind for i in dropped} == {"pre_restore"}
    assert inst.leftovers() == []
    assert database_names(dbs, inst.platform) == sorted(inst.names)
    assert running_activities(store) == []


def test_live_restore_brings_back_dropped_databases(installation, local_case):
    """After DROP DATABASE of the platform and MLflow databases, a live restore recreates
    both under their own names with the backup's data (nothing to keep aside for them)."""
    inst = installation
    dbs = inst.dbs
    store = local_case.store
    manifest = inst.backup(store)
    at_backup = {name: contents(dbs, name) for name in inst.names}
    dbs.execute("postgres", f'DROP DATABASE "{inst.platform}" WITH (FORCE)', f'DROP DATABASE "{inst.mlflow}" WITH (FORCE)')

    report = restore_backup(store, get_backup(store, manifest.backup_id), inst.destinations(),
                            target=LIVE, confirm=inst.platform)

    assert report.ok
    assert [(d.role, d.restored_as, d.kept_as is None) for d in report.databases] == [
        ("platform", inst.platform, True), ("mlflow", inst.mlflow, True), ("dagster", inst.dagster, False)
    ]
    for name in inst.names:
        assert contents(dbs, name) == at_backup[name]
    dropped = [i for i in restore_cleanup(inst.destinations(), store=store, confirm=inst.platform) if i.leftover.configured]
    assert [(i.leftover.kind, i.action) for i in dropped] == [("pre_restore", "dropped")]  # Dagster's old one
    assert database_names(dbs, inst.platform) == sorted(inst.names)
