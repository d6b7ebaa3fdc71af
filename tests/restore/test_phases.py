"""Each phase of a restore on its own, over one RestoreState, against the embedded server:
plan reads only, fetch refuses a damaged dump before any database exists, restore and verify
make a checked scratch database without a swap, swap takes a prepared scratch database
into place, clean up drops what a failed restore made. The same phases `restore_backup`
runs in order (tests/restore/test_scratch.py, test_live.py test them together)."""

from __future__ import annotations

import pytest

from maestro_pipelines.backup import LIVE, get_backup, running_activities
from maestro_pipelines.backup.journal import read_journals
from maestro_pipelines.backup.restore import (
    RestoreError,
    RestoreRefused,
    clean_up,
    fetch,
    plan_restore,
    restore_database,
    restore_database_name,
    swap,
    verify_database,
)
from maestro_pipelines.platform_db.admin import quote_ident
from tests.restore.conftest import contents, database_names, tenants
from tests.restore.test_damaged import flip_middle_byte


def test_plan_reads_only_and_refuses_an_unconfirmed_live_restore(pg18_installation, local_case):
    """Planning names each database's scratch copy `<live>_restore_<stamp>` and creates
    nothing: no database on the server, no activity marker in the store, no step run. An
    unconfirmed live restore is refused at this phase, with the confirmation to type."""
    inst = pg18_installation
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)

    state = plan_restore(store, entry, inst.destinations())

    assert [p.role for p in state.databases] == ["platform", "mlflow", "dagster"]
    assert [p.scratch for p in state.databases] == [restore_database_name(n, "restore", state.stamp) for n in inst.names]
    assert [d.restored_as for d in state.report.databases] == [p.scratch for p in state.databases]
    assert state.report.steps == [] and state.created == [] and state.workdir is None
    assert database_names(inst.dbs, inst.platform) == sorted(inst.names), "planning created a database"
    assert running_activities(store) == []
    with pytest.raises(RestoreRefused) as refused:
        plan_restore(store, entry, inst.destinations(), target=LIVE, confirm="yes")
    assert f"--confirm {inst.platform}" in refused.value.hint


def test_fetch_refuses_a_damaged_dump_before_any_database_exists(pg18_installation, local_case):
    """A flipped byte in the MLflow dump: fetch downloads the platform dump whole, then fails
    naming the damaged object; no database was created. Clean up removes the work folder
    with the decompressed dump in it."""
    inst = pg18_installation
    store = local_case.store
    manifest = inst.backup(store)
    flip_middle_byte(local_case, manifest.database("mlflow").key)
    state = plan_restore(store, get_backup(store, manifest.backup_id), inst.destinations())

    with pytest.raises(RestoreError) as damaged:
        fetch(state)

    assert manifest.database("mlflow").key in str(damaged.value) and "damaged" in str(damaged.value)
    platform = state.databases[0]
    assert platform.file is not None and platform.file.stat().st_size == manifest.database("platform").dump_bytes
    assert database_names(inst.dbs, inst.platform) == sorted(inst.names)
    folder = state.workdir
    clean_up(state, failed=True)
    assert state.own_workdir and not folder.exists(), "clean up left the decompressed dumps"


def test_restore_and_verify_into_scratch_without_a_swap(pg18_installation, local_case):
    """Fetch, restore and verify for the platform database alone: a scratch database equal
    to the backup, the live one untouched, no swap journal; clean up after a failure drops it."""
    inst = pg18_installation
    dbs = inst.dbs
    store = local_case.store
    manifest = inst.backup(store)
    at_backup = contents(dbs, inst.platform, schema=False)
    dbs.execute(inst.platform, "INSERT INTO tenants (name) VALUES ('after-the-backup')")
    state = plan_restore(store, get_backup(store, manifest.backup_id), inst.destinations(), roles=["platform"])
    platform = state.databases[0]

    fetch(state)
    restore_database(state, platform)
    verify_database(state, platform)

    assert [s.name for s in state.report.steps] == ["download and check", "pg_restore platform", "verify platform"]
    assert contents(dbs, platform.scratch, schema=False) == at_backup
    assert platform.result.rows == manifest.database("platform").rows and platform.result.problems == []
    assert tenants(dbs, inst.platform)[-1] == "after-the-backup", "restoring into scratch touched the live database"
    assert read_journals(store) == []
    clean_up(state, failed=True)
    assert database_names(dbs, inst.platform) == sorted(inst.names), "clean up left the scratch database"


def test_swap_takes_a_prepared_scratch_database_into_place(pg18_installation, local_case):
    """A live restore's state whose scratch database was made by hand (a copy of the live one
    with one more tenant): swap alone puts it in the live database's place, keeps the old
    one as `<live>_pre_restore_<stamp>` and leaves no journal."""
    inst = pg18_installation
    dbs = inst.dbs
    store = local_case.store
    entry = get_backup(store, inst.backup(store).backup_id)
    state = plan_restore(store, entry, inst.destinations(), target=LIVE, confirm=inst.platform, roles=["platform"])
    platform = state.databases[0]
    dbs.execute("postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{inst.platform}'",
                f"CREATE DATABASE {quote_ident(platform.scratch)} TEMPLATE {quote_ident(inst.platform)}")
    dbs.execute(platform.scratch, "INSERT INTO tenants (name) VALUES ('from-the-scratch-copy')")

    swap(state)

    kept = restore_database_name(inst.platform, "pre_restore", state.stamp)
    assert tenants(dbs, inst.platform)[-1] == "from-the-scratch-copy"
    assert "from-the-scratch-copy" not in tenants(dbs, kept)
    assert (platform.result.restored_as, platform.result.kept_as) == (inst.platform, kept)
    assert [s.name for s in state.report.steps] == ["swap"]
    assert read_journals(store) == []
    assert platform.scratch not in database_names(dbs, inst.platform)
