"""Verification: a good backup is marked verified, and any damage to any of its objects is
found, named, and takes the mark away, on a local folder and on S3."""

from __future__ import annotations

import json

import pytest

from maestro_pipelines.backup import DatabaseTarget, create_backup, get_backup, list_backups, verify_backup
from maestro_pipelines.backup.manifest import ARTIFACTS_NAME, MANIFEST_NAME
from tests.backup.conftest import ARTIFACTS, read_raw, replace_raw


def small_backup(dbs, case):
    database = dbs.create()
    dbs.execute(
        database,
        "CREATE TABLE tenants (id int PRIMARY KEY, name text)",
        "INSERT INTO tenants SELECT g, 'tenant ' || g FROM generate_series(1, 300) g",
        "CREATE TABLE predictions (id bigint, score float8, payload text)",
        "INSERT INTO predictions SELECT g, g / 9.0, md5(g::text) FROM generate_series(1, 20000) g",
    )
    case.store.put_bytes(f"{ARTIFACTS}1/run/artifacts/model.pkl", b"model bytes" * 100)
    return create_backup(case.store, [DatabaseTarget("platform", dbs.url(database))])


def flip_middle(case, key):
    data = bytearray(read_raw(case, key))
    data[len(data) // 2] ^= 0x01
    replace_raw(case, key, bytes(data))


def truncate(case, key):
    replace_raw(case, key, read_raw(case, key)[:-100])


def tampered_through_store(case, key):
    """An edit made with the store's API: the store's recorded sha256 matches the new bytes."""
    body = json.loads(read_raw(case, key))
    body["databases"][0]["tables"][0]["rows"] += 1
    case.store.put_bytes(key, json.dumps(body, indent=2, sort_keys=True).encode())


def tampered_raw(case, key):
    """An edit behind the store's back: the recorded sha256 is the original bytes'."""
    replace_raw(case, key, read_raw(case, key).replace(b'"rows": 300', b'"rows": 301'))


DAMAGE = {
    "dump-first-byte-flipped": ("platform.dump.zst", lambda case, key: case.corrupt(key)),
    "dump-middle-byte-flipped": ("platform.dump.zst", flip_middle),
    "dump-truncated": ("platform.dump.zst", truncate),
    "dump-missing": ("platform.dump.zst", lambda case, key: case.store.delete(key)),
    "artifact-manifest-flipped": (ARTIFACTS_NAME, lambda case, key: case.corrupt(key)),
    "manifest-edited-through-store": (MANIFEST_NAME, tampered_through_store),
    "manifest-edited-raw": (MANIFEST_NAME, tampered_raw),
}


def test_a_good_backup_verifies(pg18_databases, case):
    """Verify reads every object back (sizes, sha256, zstd, pg_restore --list) and marks the
    backup verified, which is what `list_backups` and `latest` then trust."""
    manifest = small_backup(pg18_databases, case)
    assert list_backups(case.store)[0].verified is False

    report = verify_backup(case.store, manifest.backup_id)
    assert report.ok and report.problems == []
    assert report.objects == 2  # the dump and the artifact manifest
    assert report.bytes_read == manifest.stored_bytes
    assert report.toc_entries == {"platform": 2}
    [entry] = list_backups(case.store)
    assert entry.verified is True
    assert get_backup(case.store, "latest").backup_id == manifest.backup_id


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_finds_damage_and_withdraws_the_verified_mark(pg18_databases, case, damage):
    """A flipped byte, a truncated or missing object, or an edited manifest (through the
    store or behind its back) makes verify fail with a problem naming the object; the
    backup stops counting as verified, so `latest` never picks it for a restore."""
    manifest = small_backup(pg18_databases, case)
    assert verify_backup(case.store, manifest.backup_id).ok
    name, damage_it = DAMAGE[damage]
    root = f"backups/{manifest.backup_id}"
    damage_it(case, f"{root}/{name}")

    report = verify_backup(case.store, manifest.backup_id)
    assert not report.ok
    assert any(f"{root}/{name}" in problem for problem in report.problems), report.problems
    [entry] = list_backups(case.store)
    assert entry.verified is False
    # The failure replaced the earlier success: the backup is known BAD, not merely unverified.
    assert entry.bad is not None and f"{root}/{name}" in entry.bad
    if name != MANIFEST_NAME:
        assert entry.verification_failed
    if name == MANIFEST_NAME:
        assert entry.manifest is None and f"{root}/{MANIFEST_NAME}" in entry.problem
    with pytest.raises(Exception, match="no verified backup"):
        get_backup(case.store, "latest")
