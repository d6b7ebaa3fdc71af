"""The names restores give the databases they create: `<live>_restore_<stamp>` and
`<live>_pre_restore_<stamp>`, with a one-second stamp. Whatever names already exist on the
server and however long the live names are, a restore must neither collide with them nor
lose track of what it created (`restore_leftovers` is how an operator finds it again)."""

from __future__ import annotations

from datetime import timedelta

from maestro_pipelines.backup import (
    LIVE,
    RestoreError,
    get_backup,
    restore_backup,
    restore_cleanup,
    run_drill,
    verify_backup,
)
from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.platform_db.admin import quote_ident
from maestro_pipelines.settings import Settings
from tests.restore.conftest import Installation, database_names, fresh_suffix, tenants

WINDOW_S = 6


def occupy(inst: Installation, live: str, kind: str) -> list[str]:
    """Create `<live>_<kind>_<stamp>` for every second of the next WINDOW_S seconds: what an
    earlier restore (or a drill running concurrently) started in the same second leaves."""
    now = utcnow()
    names = [f"{live}_{kind}_{(now + timedelta(seconds=s)):%Y%m%dt%H%M%S}" for s in range(WINDOW_S)]
    for name in names:
        inst.dbs.execute("postgres", f"CREATE DATABASE {quote_ident(name)}")
        inst.dbs.names.append(name)
    inst.dbs.execute(names[0], "CREATE TABLE precious (id int)")
    return names


def test_scratch_restore_beside_one_from_the_same_second(pg18_installation, local_case):
    """A scratch restore started in the same second as an earlier one (whose database is
    still there) restores under another name and leaves the earlier one alone."""
    inst = pg18_installation
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)
    taken = occupy(inst, inst.platform, "restore")

    report = restore_backup(store, entry, inst.destinations())

    assert f"{report.started_at:%Y%m%dt%H%M%S}" in {name.rsplit("_", 1)[1] for name in taken}, "test too slow"
    assert report.ok
    assert report.databases[0].restored_as not in taken
    assert tenants(inst.dbs, report.databases[0].restored_as) == ["acme", "globex", "initech"]
    assert inst.dbs.scalar(taken[0], "SELECT count(*) FROM precious") == 0


def test_drill_beside_a_restore_from_the_same_second(pg18_mlflow_installation, local_case):
    """A drill started in the same second as a scratch restore (a scheduled drill while an
    operator restores) still runs; at worst it reports a problem: it never raises."""
    inst = pg18_mlflow_installation
    store = local_case.store
    manifest = inst.backup(store)
    assert verify_backup(store, manifest.backup_id).ok
    taken = occupy(inst, inst.mlflow, "restore")
    started = utcnow()

    report = run_drill(store, inst.destinations())

    assert f"{started:%Y%m%dt%H%M%S}" in {name.rsplit("_", 1)[1] for name in taken}, "test too slow"
    assert report.ok, report.failures()
    assert sorted(database_names(inst.dbs, f"{inst.mlflow}_restore_")) == taken


def test_long_live_database_names_are_restored_and_cleaned_up(pg18_databases, installations, templates, local_case,
                                                              tmp_path):
    """A live database whose name is close to PostgreSQL's 63-byte limit: the restore either
    refuses up front or the names it reports are the databases it created, and
    `restore_cleanup` finds and drops them (PostgreSQL silently truncates longer names; the
    restore may shorten them its own way, so they need not start with the live name)."""
    dbs = pg18_databases
    long_name = f"maestro_production_platform_{fresh_suffix()}"  # 36 characters
    templates.clone(dbs, "platform", long_name)
    settings = Settings(home=tmp_path, database_url=dbs.server.libpq_url(long_name))
    inst = Installation(dbs, long_name, f"{long_name}_mlflow", None, settings, dbs.location(long_name))
    installations.append(inst)
    dbs.create(inst.mlflow)
    dbs.execute(inst.mlflow, "CREATE TABLE experiments (id int PRIMARY KEY)", "INSERT INTO experiments VALUES (1)")
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)

    try:
        report = restore_backup(store, entry, inst.destinations(), target=LIVE, confirm=long_name)
    except RestoreError as refused:
        assert "63" in str(refused) or "too long" in str(refused)
        assert database_names(dbs, long_name) == sorted(inst.names)
        return
    this_tests = "maestro_production_"  # no other test's databases start so
    on_server = database_names(dbs, this_tests)
    for restored in report.databases:
        assert restored.kept_as in on_server, f"reported {restored.kept_as}, the server has {on_server}"
        assert len(restored.kept_as.encode()) <= 63
    cleaned = restore_cleanup(inst.destinations(), confirm=long_name)
    assert sorted(i.leftover.name for i in cleaned if i.leftover.configured and i.action == "dropped") == sorted(
        d.kept_as for d in report.databases
    )
    assert database_names(dbs, this_tests) == sorted(inst.names)
    assert tenants(dbs, long_name) == ["acme", "globex", "initech"]


def test_restore_names_fit_postgres_and_stay_apart():
    """Without a server: names of restores of long live databases (multi-byte characters
    included) fit in 63 bytes, begin with as much of the live name as fits, and two live
    databases that share a long prefix get different names."""
    from maestro_pipelines.backup.restore import LEFTOVER, restore_database_name

    stamp = "20261127t031500"
    short = restore_database_name("maestro", "pre_restore", stamp)
    assert short == f"maestro_pre_restore_{stamp}"
    first, second = ("données_plateforme_production_" * 2) + "a", ("données_plateforme_production_" * 2) + "b"
    names = {restore_database_name(live, kind, stamp) for live in (first, second) for kind in ("restore", "pre_restore")}
    assert len(names) == 4
    for name in names:
        assert len(name.encode()) <= 63
        assert first.startswith(name[:20])
        match = LEFTOVER.match(name)
        assert match and match.group("stamp") == stamp
