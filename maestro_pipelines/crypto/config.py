"""The keyring as configured: MAESTRO_BACKUP_KEY or MAESTRO_BACKUP_KMS_KEY_ID (the current
key), MAESTRO_BACKUP_OLD_KEYS (rotated away, read-only), MAESTRO_BACKUP_ENCRYPTION. The values
are read by settings.py; this only interprets them."""

from __future__ import annotations

from maestro_pipelines.crypto.keys import (
    ENCRYPTION_VARIABLE,
    KEY_VARIABLE,
    KMS_PREFIX,
    KMS_VARIABLE,
    OLD_KEYS_VARIABLE,
    BackupKeyError,
    KeyEncryptionKey,
    Keyring,
    parse_local_key,
)
from maestro_pipelines.crypto.kms import AwsKmsKey


def kek_from_value(value: str, source: str, kms_client=None) -> KeyEncryptionKey:
    """A KEK as configured: `aws-kms:<key id>` or a base64 local key."""
    text = value.strip()
    if text.startswith(KMS_PREFIX):
        return AwsKmsKey(text.removeprefix(KMS_PREFIX), source, client=kms_client)
    return parse_local_key(text, source)


def keyring_from_values(key: str | None, old_keys: str | None, kms_key_id: str | None, encryption: str | None,
                        kms_client=None) -> Keyring:
    """The keyring the variables describe (values as read by settings.py); one line per mistake."""
    mode = (encryption or "auto").strip().lower()
    if mode not in ("auto", "required"):
        raise BackupKeyError(f"{ENCRYPTION_VARIABLE} is '{mode}', which is neither auto nor required",
                             f"Set {ENCRYPTION_VARIABLE} to required (refuse backups without a key) or unset it")
    if key and kms_key_id:
        raise BackupKeyError(
            f"both {KEY_VARIABLE} and {KMS_VARIABLE} are set: new backups can be wrapped by only one",
            f"Keep the one new backups should use and move the other into {OLD_KEYS_VARIABLE}, then `maestro backup rekey`",
        )
    current = None
    if kms_key_id:
        current = kek_from_value(KMS_PREFIX + kms_key_id.strip().removeprefix(KMS_PREFIX), KMS_VARIABLE, kms_client)
    elif key:
        current = parse_local_key(key, KEY_VARIABLE)
    old = tuple(
        kek_from_value(part, f"{OLD_KEYS_VARIABLE} (entry {n})", kms_client)
        for n, part in enumerate((old_keys or "").replace(",", " ").split(), start=1)
    )
    return Keyring(current, tuple(k for k in old if current is None or k.id != current.id), mode == "required")


def keyring_from_settings(settings) -> Keyring:
    """The keyring of `settings` (settings.Settings): what the CLI, the store resource and the
    WAL pusher give the store they open."""
    return keyring_from_values(settings.backup_key, settings.backup_old_keys, settings.backup_kms_key_id,
                               settings.backup_encryption)
