"""Keys as the variables give them (crypto/config.py) and as envelopes use them (keys.py),
and record MACs across a rewrap (records.py): one line per mistake, naming the variable or
the key id, never a key."""

from __future__ import annotations

import base64
import os

import pytest

from maestro_pipelines.crypto import (
    BackupKeyError,
    BackupKeyMissing,
    BackupKeyWrong,
    Envelope,
    Keyring,
    LocalKey,
    generate_key,
    keyring_from_values,
    record_mac,
    record_mac_valid,
)
from maestro_pipelines.crypto.keys import KEY_VARIABLE, OLD_KEYS_VARIABLE, RUNBOOK

K1, K2 = generate_key(), generate_key()


def ring(current: str | None, old: str | None = None, mode: str | None = None) -> Keyring:
    return keyring_from_values(current, old, None, mode)


def assert_secret_free(message: str, *keys: str) -> None:
    for key in keys:
        assert key not in message and key.rstrip("=") not in message
        assert base64.b64decode(key).hex() not in message


def test_generated_keys_are_32_random_bytes_in_base64():
    assert len(base64.b64decode(K1, validate=True)) == 32 and len(K1) == 44 and K1 != K2
    assert ring(K1).current.id == ring(K1).current.id != ring(K2).current.id
    assert ring(K1).current.id.startswith("key:")


# Fixed values, not random ones: pytest-xdist's workers must collect the same test ids.
@pytest.mark.parametrize("value", ["not base64 at all!", "c2hvcnQ=", base64.b64encode(bytes(range(31))).decode(),
                                   base64.b64encode(bytes(range(33))).decode(), K1 + "AAAA", ""],
                         ids=["not-base64", "short", "31-bytes", "33-bytes", "trailing-garbage", "empty"])
def test_a_malformed_key_is_one_line_naming_the_variable_never_the_value(value):
    with pytest.raises(BackupKeyError) as caught:
        ring(value or " ")
    message = str(caught.value)
    assert message.startswith(f"{KEY_VARIABLE} is not a backup key (it must be 32 random bytes in base64")
    assert "maestro backup keygen" in message and "\n" not in message
    if value.strip():
        assert value not in message


def test_keys_are_read_with_or_without_padding_and_url_safe():
    raw = base64.b64decode(K1)
    for spelling in (K1, K1.rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("="), f"  {K1}\n"):
        assert ring(spelling).current.id == ring(K1).current.id


def test_old_keys_by_comma_or_space_and_a_bad_one_named_by_position():
    keyring = ring(K2, f"{K1}, {generate_key()}  {K2}")
    assert len(keyring.old) == 2 and keyring.current.id not in [k.id for k in keyring.old]
    with pytest.raises(BackupKeyError) as caught:
        ring(K2, f"{K1} nonsense")
    assert str(caught.value).startswith(f"{OLD_KEYS_VARIABLE} (entry 2) is not a backup key")
    assert_secret_free(str(caught.value), K1, K2)


def test_both_a_key_and_a_kms_key_is_refused():
    with pytest.raises(BackupKeyError) as caught:
        keyring_from_values(K1, None, "alias/maestro", None)
    assert "both MAESTRO_BACKUP_KEY and MAESTRO_BACKUP_KMS_KEY_ID are set" in str(caught.value)
    assert OLD_KEYS_VARIABLE in str(caught.value)
    assert_secret_free(str(caught.value), K1)


def test_encryption_modes():
    assert ring(None).new_data_key() is None                   # auto, no key: plaintext, as before
    assert ring(None, mode="auto").encrypts is False
    with pytest.raises(BackupKeyMissing) as caught:
        ring(None, mode="REQUIRED").new_data_key("backup 20261201T020000Z-abcdef")
    assert "MAESTRO_BACKUP_ENCRYPTION=required and no backup key is configured, so backup 20261201T020000Z-abcdef was not taken" in str(caught.value)
    assert ring(K1, mode="required").new_data_key() is not None
    with pytest.raises(BackupKeyError, match="MAESTRO_BACKUP_ENCRYPTION is 'yes', which is neither auto nor required"):
        ring(K1, mode="yes")


def test_the_wrong_key_names_the_key_it_needs_and_never_a_key():
    envelope = ring(K1).new_data_key().envelope
    k1_id, k2_id = ring(K1).current.id, ring(K2).current.id
    with pytest.raises(BackupKeyWrong) as caught:
        ring(K2).open(envelope, "backup 20261201T020000Z-abcdef")
    message = str(caught.value)
    assert f"backup 20261201T020000Z-abcdef is encrypted with backup key {k1_id}, not with the configured {k2_id}" in message
    assert RUNBOOK in message and OLD_KEYS_VARIABLE in message and "\n" not in message
    assert_secret_free(message, K1, K2)
    with pytest.raises(BackupKeyMissing) as caught:
        ring(None).open(envelope, "backup X")
    assert f"backup X is encrypted with backup key {k1_id} and no backup key is configured" in str(caught.value)
    assert_secret_free(str(caught.value), K1)


def test_an_altered_envelope_does_not_open():
    keyring = ring(K1)
    envelope = keyring.new_data_key().envelope
    wrapped = bytearray(base64.b64decode(envelope.wrapped_key))
    wrapped[-1] ^= 1
    for altered in (Envelope(envelope.key_id, envelope.kek_id, base64.b64encode(wrapped).decode()),
                    Envelope("00" * 16, envelope.kek_id, envelope.wrapped_key)):   # moved to another data key id
        with pytest.raises(BackupKeyWrong, match=f"a data key named for backup key {envelope.kek_id} does not open"):
            ring(K1).open(altered, "x")


@pytest.mark.parametrize("body", [None, "text", {"key_id": "zz", "kek_id": "k", "wrapped_key": "AA=="},
                                  {"key_id": "00", "kek_id": "k", "wrapped_key": "***"}, {"key_id": "00"}])
def test_a_malformed_envelope_is_one_line(body):
    with pytest.raises(BackupKeyError, match="the encryption record of the manifest is malformed"):
        Envelope.from_dict(body, "the manifest")


def test_an_unknown_cipher_is_refused():
    envelope = ring(K1).new_data_key().envelope.to_dict()
    with pytest.raises(BackupKeyError, match="sealed with 'chacha-stream/v9', which this Maestro does not read"):
        Envelope.from_dict({**envelope, "cipher": "chacha-stream/v9"}, "the manifest")


def test_rewrap_keeps_the_data_key_and_the_record_mac():
    old = ring(K1)
    data_key = old.new_data_key()
    record = {"backup_id": "b1", "encryption": data_key.envelope.to_dict()}
    record["mac"] = record_mac(record, data_key)
    rotated = ring(K2, K1)
    envelope = rotated.rewrap(data_key.envelope, "b1")
    assert envelope.kek_id == rotated.current.id and envelope.key_id == data_key.key_id
    assert rotated.rewrap(envelope, "b1") is envelope                            # already current
    reopened = ring(K2).open(envelope, "b1")                                     # the new key alone
    assert reopened.secret == data_key.secret
    assert record_mac_valid({**record, "encryption": envelope.to_dict()}, reopened)
    assert not record_mac_valid({**record, "backup_id": "b2"}, reopened)         # an edit
    other = old.new_data_key()                                                   # another record's envelope
    assert not record_mac_valid({**record, "encryption": other.envelope.to_dict()}, other)
    with pytest.raises(BackupKeyMissing):
        ring(None, K1).rewrap(data_key.envelope, "b1")


def test_keys_never_show_in_reprs():
    keyring = ring(K1)
    data_key = keyring.new_data_key()
    for shown in (repr(keyring), repr(data_key), repr(keyring.current), str(data_key)):
        assert_secret_free(shown, K1)
        assert data_key.secret.hex() not in shown and repr(data_key.secret) not in shown
    assert repr(LocalKey(base64.b64decode(K1))) == f"LocalKey({keyring.current.id})"
