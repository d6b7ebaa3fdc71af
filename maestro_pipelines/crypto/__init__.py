"""Client-side encryption of what Maestro writes to the store for backups (Dagster-free).

Envelope encryption, as the cloud SDKs' client-side encryption does it:

- a **key-encryption key** (KEK, `keys.py`) is configured, never stored: MAESTRO_BACKUP_KEY
  (32 random bytes, base64; `maestro backup keygen`) or an AWS KMS key
  (MAESTRO_BACKUP_KMS_KEY_ID, `kms.py`); the old ones a rotation retires in
  MAESTRO_BACKUP_OLD_KEYS. Together they are the `Keyring`;
- each backup gets its own random **data key**, stored only wrapped by the KEK, in an
  `Envelope` inside the backup's record (its manifest, a base backup's base.json, a WAL key
  record): rotating the KEK rewraps envelopes and never rewrites data (`maestro backup rekey`);
- objects are sealed with the data key in chunks (`stream.py`: AES-256-GCM from
  `cryptography`, the STREAM construction age uses: a chunk counter and a last-chunk flag in
  each nonce, so truncation, reordering and splicing fail authentication), after compression;
- records (manifests, verification records) carry a MAC keyed from the data key
  (`records.py`), so whoever can write the bucket but holds no key cannot forge one.
"""

from maestro_pipelines.crypto.keys import (
    CIPHER,
    BackupKeyError,
    BackupKeyMissing,
    BackupKeyWrong,
    DataKey,
    Envelope,
    Keyring,
    KeyEncryptionKey,
    KeyServiceUnavailable,
    LocalKey,
    generate_key,
)
from maestro_pipelines.crypto.config import keyring_from_settings, keyring_from_values
from maestro_pipelines.crypto.records import record_mac, record_mac_valid, signed_part
from maestro_pipelines.crypto.stream import (
    open_sealed_or_plain,
    SEAL_MAGIC,
    SealBroken,
    SealedReader,
    is_sealed,
    seal_chunks,
    sealed_key_id,
    sealed_size,
)

__all__ = [
    "CIPHER", "BackupKeyError", "BackupKeyMissing", "BackupKeyWrong", "DataKey", "Envelope", "Keyring",
    "KeyEncryptionKey", "KeyServiceUnavailable", "LocalKey", "generate_key", "keyring_from_settings", "keyring_from_values",
    "record_mac", "record_mac_valid", "signed_part", "SEAL_MAGIC", "SealBroken", "SealedReader", "is_sealed",
    "seal_chunks", "sealed_key_id", "sealed_size", "open_sealed_or_plain",
]
