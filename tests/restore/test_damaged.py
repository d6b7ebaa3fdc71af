"""A damaged or incomplete backup is refused before any database is touched: every dump is
downloaded and checked (size, sha256, zstd) before the first CREATE DATABASE."""

from __future__ import annotations

import pytest

from maestro_pipelines.backup import LIVE, RestoreError, get_backup, restore_backup, running_activities
from tests.backup.conftest import read_raw, replace_raw
from tests.restore.conftest import contents, database_names


def flip_middle_byte(case, key: str) -> None:
    """Bit rot in the middle of the object, behind the store's back (its record kept)."""
    data = bytearray(read_raw(case, key))
    data[len(data) // 2] ^= 0x01
    replace_raw(case, key, bytes(data))


def truncate(case, key: str) -> None:
    replace_raw(case, key, read_raw(case, key)[:-64])


def delete(case, key: str) -> None:
    case.store.delete(key)


@pytest.mark.parametrize("damage", [flip_middle_byte, truncate, delete])
def test_damaged_dump_is_refused_before_anything_is_touched(pg18_installation, case, damage):
    """One of the backup's dumps (the last one, so the others download fine first) has a
    flipped byte, is truncated or is gone: a live restore fails with a RestoreError naming
    the object, no database was created on the server and the live databases hold what
    they held."""
    inst = pg18_installation
    dbs = inst.dbs
    store = case.store
    manifest = inst.backup(store)
    entry = get_backup(store, manifest.backup_id)
    damaged = manifest.database("dagster").key
    damage(case, damaged)
    before = {name: contents(dbs, name, schema=False) for name in inst.names}

    with pytest.raises(RestoreError) as failed:
        restore_backup(store, entry, inst.destinations(), target=LIVE, confirm=inst.platform)

    assert damaged in str(failed.value)
    assert "Nothing was restored" in failed.value.hint
    assert database_names(dbs, inst.platform) == sorted(inst.names), "the failed restore left a database"
    assert inst.leftovers() == []
    assert {name: contents(dbs, name, schema=False) for name in inst.names} == before
    assert running_activities(store) == [], "the failed restore left its activity marker"
