"""Rotation by rewrapping (backup/rekey.py) on a local store of encrypted backups written the
way the backup library writes them (tests/backup/sealed_records.py): every record under an
old key rewrapped, nothing else touched, what cannot be rewrapped named; and the encryption
status `backup info` shows. The CLI, killed at many points, is in tests/test_cli_rekey.py."""

from __future__ import annotations

import json

import pytest

from maestro_pipelines.backup import sealing
from maestro_pipelines.backup.info import backup_info, encryption_status
from maestro_pipelines.backup.rekey import key_census, record_digest, rekey_store
from maestro_pipelines.crypto import BackupKeyMissing, BackupKeyWrong, generate_key
from maestro_pipelines.storage import open_store
from tests.stores.conftest import AWS, LocalCase, fresh_name

from .sealed_records import DRILL_FIELDS, check_backup, keyring, write_backup

K1, K2, K3 = generate_key(), generate_key(), generate_key()
RECORDS_K1 = ["backups/20261201T020000Z-aaaaaa/manifest.json", "backups/20261201T020000Z-aaaaaa/verified.json",
              "monthly/2026-11/20261130T020000Z-bbbbbb/manifest.json", "pitr/7312345678901234567/base/20261201T021000Z-cccccc/base.json",
              "pitr/7312345678901234567/keys/20261201T021500Z-dddddd.json", "drills/20261201T030000000000Z-eeeeee.json"]
RECORD_K2 = "backups/20261202T020000Z-ffffff/manifest.json"
PLAIN = "backups/20261130T020000Z-000000/manifest.json"


def kek_id(key: str) -> str:
    return keyring(key).current.id


@pytest.fixture
def store(tmp_path):
    """Six records under K1 in every place records live, one under K2, one plaintext backup,
    a non-JSON `.json` object and an activity marker (no envelope: never touched)."""
    store = LocalCase(tmp_path / "store").store
    store.keyring = keyring(K1)
    for key in RECORDS_K1:
        write_backup(store, key, DRILL_FIELDS if key.startswith("drills/") else None, digest="verified" not in key)
    store.keyring = keyring(K2)
    write_backup(store, RECORD_K2)
    store.keyring = None
    write_backup(store, PLAIN)
    store.put_bytes("backups/20261201T020000Z-aaaaaa/sealed.json", b"MSEAL\x00\x01\nnot json")
    store.put_bytes("activity/backup-20261203T020000Z-111111.json", b'{"kind": "backup"}')
    return store


def snapshot(store) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list("")}


def snapshot_unverified(store) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key, verify=False) for info in store.list("")}


def test_rekey_rewraps_every_old_record_and_touches_nothing_else(store):
    before = snapshot(store)
    store.keyring = keyring(K2, K1)
    report = rekey_store(store)
    assert sorted(report.rewrapped) == sorted(RECORDS_K1) and report.current == [RECORD_K2]
    assert report.ok and report.plain == 1 and report.needs_key == {} and report.problems == {}
    after = snapshot(store)
    assert {k for k in after if after[k] != before[k]} == set(RECORDS_K1)      # only the records, no data
    for key in RECORDS_K1 + [RECORD_K2]:
        assert check_backup(store, key, keyring(K2)) == kek_id(K2)               # the new key alone opens all
        assert store.head(key).metadata == {"source": "test"}
        old, new = json.loads(before[key]), json.loads(after[key])
        assert old["encryption"]["key_id"] == new["encryption"]["key_id"] and old["mac"] == new["mac"]
        assert list(old) == list(new)                                             # same fields, same order
    assert check_backup(store, PLAIN, keyring(K2)) is None
    with pytest.raises(BackupKeyWrong):
        check_backup(store, RECORDS_K1[0], keyring(K1))                           # K1 no longer opens it
    again = rekey_store(store)                                                    # idempotent
    assert again.rewrapped == [] and len(again.current) == len(RECORDS_K1) + 1 and snapshot(store) == after


def test_a_dry_run_says_what_it_would_do_and_writes_nothing(store):
    before = snapshot(store)
    store.keyring = keyring(K2, K1)
    report = rekey_store(store, dry_run=True)
    assert sorted(report.rewrapped) == sorted(RECORDS_K1) and report.dry_run and snapshot(store) == before


def test_records_under_a_key_not_configured_are_named_and_the_rest_done(store):
    store.keyring = keyring(K3, K2)                                               # K1 is not given
    report = rekey_store(store)
    assert not report.ok and report.needs_key == {kek_id(K1): RECORDS_K1}
    assert report.rewrapped == [RECORD_K2]
    assert check_backup(store, RECORD_K2, keyring(K3)) == kek_id(K3)
    assert check_backup(store, RECORDS_K1[0], keyring(K1)) == kek_id(K1)          # left as it was


def test_a_forged_or_edited_record_is_reported_and_not_rewritten(store):
    """Someone with write access but no key edits a manifest (keeping a valid digest) and
    breaks another's digest, and a third rots on the disk: rekey blesses none by rewriting it."""
    forged, edited, rotten = RECORDS_K1[0], RECORDS_K1[2], RECORDS_K1[3]
    body = json.loads(store.get_bytes(forged))
    body["format_version"] = 99
    body.pop("digest")
    body["digest"] = record_digest(body)
    store.put_bytes(forged, json.dumps(body).encode())
    store.put_bytes(edited, store.get_bytes(edited).replace(b'"format_version": 1', b'"format_version": 2'))
    path = store.root.joinpath(*rotten.split("/"))                              # bit rot: same size, same file
    data = bytearray(path.read_bytes())
    data[40] ^= 0x20
    with open(path, "r+b") as f:
        f.write(data)
    store.keyring = keyring(K2, K1)
    before = snapshot_unverified(store)
    report = rekey_store(store)
    assert set(report.problems) == {forged, edited, rotten} and not report.ok
    assert f"Object {rotten!r}" in report.problems[rotten] and "is corrupt" in report.problems[rotten]
    assert "does not match its signature" in report.problems[forged]
    assert "does not match its digest" in report.problems[edited]
    after = snapshot_unverified(store)
    assert all(after[key] == before[key] for key in (forged, edited, rotten))
    assert len(report.rewrapped) == len(RECORDS_K1) - 3


def test_rekey_needs_the_new_key(store):
    store.keyring = keyring(None, K1)
    with pytest.raises(BackupKeyMissing, match="rewraps backups under the key new backups use, and none is configured"):
        rekey_store(store)


def test_info_counts_records_by_key_and_says_which_old_key_can_go(store):
    retired = generate_key()
    store.keyring = keyring(K2, K1, retired)
    status = encryption_status(store)
    assert status.current == kek_id(K2) and status.source == "MAESTRO_BACKUP_KEY"
    assert status.records == {kek_id(K1): len(RECORDS_K1), kek_id(K2): 1} and status.plain == 1
    shown = status.as_dict()
    assert shown["old_keys"] == [{"id": kek_id(K1), "records": len(RECORDS_K1), "retire": False},
                                 {"id": kek_id(retired), "records": 0, "retire": True}]
    assert shown["unconfigured"] == [] and shown["warning"] is None
    rekey_store(store)
    assert encryption_status(store).as_dict()["old_keys"][0] == {"id": kek_id(K1), "records": 0, "retire": True}
    store.keyring = keyring(K3)                                                   # K2 lost
    info = backup_info(store)
    [finding] = [f for f in info.findings if "not configured" in f.message]
    assert finding.level == "warning" and f"{len(RECORDS_K1) + 1} records are encrypted with backup key {kek_id(K2)}" in finding.message
    assert "lost-or-leaked-backup-key.md" in finding.hint
    assert info.as_dict()["encryption"]["unconfigured"] == [{"id": kek_id(K2), "records": len(RECORDS_K1) + 1}]


def test_a_cloud_store_without_a_key_warns_that_it_is_unencrypted(moto_endpoint, tmp_path):
    import boto3

    bucket = fresh_name()
    boto3.client("s3", endpoint_url=moto_endpoint, **AWS).create_bucket(Bucket=bucket)
    cloud = open_store(f"s3://{bucket}/maestro", endpoint_url=moto_endpoint, **AWS)
    info = backup_info(cloud)
    [finding] = [f for f in info.findings if f.message.startswith("unencrypted:")]
    assert finding.level == "warning" and f"backups in {cloud.url} are not encrypted" in finding.message
    assert "MAESTRO_BACKUP_KEY" in finding.hint and info.status_line().startswith("error (no restorable backup; ")
    assert info.as_dict()["encryption"]["warning"] == sealing.unencrypted_warning(cloud)
    cloud.keyring = keyring(K1)
    assert encryption_status(cloud).warning is None
    local = LocalCase(tmp_path / "local").store
    assert encryption_status(local).warning is None                               # a folder on this machine: no warning
    assert key_census(local).by_kek == {}
