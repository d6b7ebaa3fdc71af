"""Across PostgreSQL major versions: a backup restores onto the same or a newer server, and
is refused, before anything is touched, by an older one."""

from __future__ import annotations

import pytest

from maestro_pipelines.backup import LIVE, DatabaseTarget, RestoreRefused, get_backup, restore_backup
from maestro_pipelines.settings import Settings
from tests.restore.conftest import Installation, contents, database_names, install


def test_backup_from_a_newer_server_is_refused_by_an_older_one(pg18_databases, pg15_databases, local_case, templates,
                                                                tmp_path):
    """A PostgreSQL 18 backup restored onto a PostgreSQL 15 server (pg_restore cannot
    downgrade a dump) is refused with both versions named, scratch or live, and nothing is
    created on the older server."""
    source = install(pg18_databases, tmp_path, templates)
    store = local_case.store
    entry = get_backup(store, source.backup(store).backup_id)
    old = pg15_databases
    platform = old.create()
    old.execute(platform, "CREATE TABLE kept (id int)", "INSERT INTO kept VALUES (15)")
    destinations = [
        DatabaseTarget("platform", old.url(platform)),
        DatabaseTarget("mlflow", old.url(f"{platform}_mlflow")),
    ]

    for target, confirm in (("scratch", None), (LIVE, platform)):
        with pytest.raises(RestoreRefused) as refused:
            restore_backup(store, entry, destinations, target=target, confirm=confirm)
        message = str(refused.value)
        assert "PostgreSQL 18" in message and "PostgreSQL 15" in message, message
        assert "same or a newer major version" in refused.value.hint
    assert database_names(old, platform) == [platform]
    assert old.scalar(platform, "SELECT id FROM kept") == 15


def test_backup_from_an_older_server_restores_onto_a_newer_one(pg15_databases, pg18_databases, local_case, tmp_path,
                                                                  templates, installations):
    """A PostgreSQL 15 backup (production servers are older) restores onto PostgreSQL 18
    with every row, and its manifest's checks still compare there."""
    source = install(pg15_databases, tmp_path, templates)
    store = local_case.store
    manifest = source.backup(store)
    new = pg18_databases
    platform = new.create()
    new.names += [f"{platform}_mlflow", f"{platform}_dagster"]  # created by the restore, dropped after
    settings = Settings(home=tmp_path, database_url=new.server.libpq_url(platform),
                        dagster_database_url=new.server.libpq_url(f"{platform}_dagster"))
    target = Installation(new, platform, f"{platform}_mlflow", f"{platform}_dagster", settings, new.location(platform))
    installations.append(target)
    destinations = target.destinations()

    report = restore_backup(store, get_backup(store, manifest.backup_id), destinations, target=LIVE, confirm=platform)

    assert report.ok, report.problems
    assert report.steps[0].detail == "platform: PostgreSQL 15 -> 18; mlflow: PostgreSQL 15 -> 18; dagster: PostgreSQL 15 -> 18"
    for restored, name in zip(report.databases, source.names):
        assert contents(new, restored.live, schema=False) == contents(source.dbs, name, schema=False)
