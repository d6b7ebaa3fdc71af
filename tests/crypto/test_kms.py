"""AWS KMS as the key-encryption key, against moto's KMS (served on the same endpoint as its
S3: `moto_endpoint`): wrap and unwrap through a Keyring, rotation from a local key to KMS and
from one KMS key to another by `rekey`, and a KMS that does not answer or has no region."""

from __future__ import annotations

import re

import pytest

from maestro_pipelines.backup.rekey import rekey_store
from maestro_pipelines.crypto import BackupKeyError, BackupKeyWrong, Envelope, KeyServiceUnavailable, generate_key
from maestro_pipelines.crypto import keyring_from_values
from tests.backup.sealed_records import check_backup, keyring, write_backup
from tests.services import free_port
from tests.stores.conftest import LocalCase

from ..test_cli import run_maestro

CREDENTIALS = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture
def kms(moto_endpoint, monkeypatch):
    """moto's KMS for boto3 as Maestro finds it (AWS_ENDPOINT_URL_KMS); a client to make keys."""
    import boto3

    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL_KMS": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("kms")


def kms_ring(key_id: str | None, *old: str):
    return keyring_from_values(None, " ".join(old) or None, key_id, None)


def test_a_kms_key_wraps_and_unwraps_data_keys(kms):
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/maestro-test-wrap", TargetKeyId=key_id)
    for name in (key_id, "alias/maestro-test-wrap"):
        data_key = kms_ring(name).new_data_key()
        assert data_key.envelope.kek_id == f"aws-kms:{name}"
        assert kms_ring(name).open(data_key.envelope, "backup X").secret == data_key.secret   # a fresh keyring: KMS again
    moved = Envelope("00" * 16, data_key.envelope.kek_id, data_key.envelope.wrapped_key)   # the context binds the id
    with pytest.raises(BackupKeyWrong, match="AWS KMS key alias/maestro-test-wrap does not open this data key"):
        kms_ring("alias/maestro-test-wrap").open(moved, "backup X")


def test_rotation_from_a_local_key_to_kms_and_from_kms_key_to_kms_key(kms, tmp_path):
    a, b = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    local = generate_key()
    store = LocalCase(tmp_path / "store").store
    store.keyring = keyring(local)
    records = [f"backups/2026120{n}T020000Z-00000{n}/manifest.json" for n in range(1, 4)]
    for key in records:
        write_backup(store, key)

    store.keyring = kms_ring(a, local)                       # the local key moved to MAESTRO_BACKUP_OLD_KEYS
    assert len(rekey_store(store).rewrapped) == 3
    assert {check_backup(store, key, kms_ring(a)) for key in records} == {f"aws-kms:{a}"}

    store.keyring = kms_ring(b, f"aws-kms:{a}")
    report = rekey_store(store)
    assert report.ok and sorted(report.rewrapped) == records
    assert {check_backup(store, key, kms_ring(b)) for key in records} == {f"aws-kms:{b}"}
    with pytest.raises(BackupKeyWrong, match=f"encrypted with backup key aws-kms:{b}, not with the configured aws-kms:{a}"):
        check_backup(store, records[0], kms_ring(a))


def test_an_unreachable_kms_is_one_clear_line_from_the_cli(tmp_path, monkeypatch):
    old = generate_key()
    store = LocalCase(tmp_path / "store").store
    store.keyring = keyring(old)
    write_backup(store, "backups/20261201T020000Z-000001/manifest.json")
    port = free_port()                                       # nothing listens there
    env = {**CREDENTIALS, "MAESTRO_STORE_URL": store.root.as_uri(), "MAESTRO_HOME": str(tmp_path / "home"),
           "MAESTRO_BACKUP_KMS_KEY_ID": "1234abcd-12ab-34cd-56ef-1234567890ab", "MAESTRO_BACKUP_OLD_KEYS": old,
           "AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{port}"}
    done = run_maestro("backup", "rekey", env=env)
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert re.fullmatch(rf"error: AWS KMS at http://127\.0\.0\.1:{port} is unreachable \(EndpointConnectionError\), "
                        r"so key 1234abcd-12ab-34cd-56ef-1234567890ab cannot be used\. Check the network and "
                        r"AWS_REGION / AWS_ENDPOINT_URL_KMS, then run the command again\n", done.stderr), done.stderr
    assert old not in done.stderr
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KeyServiceUnavailable):               # the library's error: a TransientError, retried by Dagster
        kms_ring("1234abcd-12ab-34cd-56ef-1234567890ab").new_data_key()


def test_a_kms_key_without_a_region_is_one_line_and_an_arn_brings_its_own(monkeypatch, tmp_path):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with pytest.raises(BackupKeyError, match=r"AWS KMS key alias/x \(MAESTRO_BACKUP_KMS_KEY_ID\) cannot be reached: "
                                             r"no AWS region is set .*Set AWS_REGION"):
        kms_ring("alias/x").new_data_key()
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert kms_ring(arn).current.client().meta.region_name == "eu-west-1"
