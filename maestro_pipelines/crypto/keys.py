"""Key-encryption keys, data keys and the envelope that ties them (no Dagster, no store).

A `KeyEncryptionKey` wraps and unwraps data keys; its `id` is stored beside each wrapped key
so a reader knows which KEK it needs without trying them all, and can say so in one line when
it is not configured. Local keys are named by a fingerprint (an HMAC of the key, not the key),
KMS keys by their key id. GCP KMS or Azure Key Vault would be one more subclass with `id`,
`wrap` and `unwrap`, and one more branch in `kek_from_value`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from maestro_pipelines.errors import MaestroError, TransientError

CIPHER = "aes-256-gcm-stream/v1"
"""What sealed objects and envelopes are: AES-256-GCM chunks (stream.py), keys wrapped by
AES-256-GCM (local) or the KMS. Readers refuse a cipher they do not know."""
KEY_BYTES = 32
KEY_VARIABLE = "MAESTRO_BACKUP_KEY"
OLD_KEYS_VARIABLE = "MAESTRO_BACKUP_OLD_KEYS"
KMS_VARIABLE = "MAESTRO_BACKUP_KMS_KEY_ID"
ENCRYPTION_VARIABLE = "MAESTRO_BACKUP_ENCRYPTION"
KMS_PREFIX = "aws-kms:"
RUNBOOK = "docs/runbooks/lost-or-leaked-backup-key.md"


class BackupKeyError(MaestroError):
    """A backup key is missing, malformed, not the right one, or its service refused."""


class BackupKeyMissing(BackupKeyError):
    """Encryption is needed (an encrypted backup to read, or MAESTRO_BACKUP_ENCRYPTION=required)
    and no key is configured."""


class BackupKeyWrong(BackupKeyError):
    """None of the configured keys is the one an encrypted object was sealed under."""


class KeyServiceUnavailable(BackupKeyError, TransientError):
    """The key service (AWS KMS) did not answer."""


class KeyEncryptionKey(ABC):
    """A key that wraps data keys. `id` names it in envelopes and messages (never the key)."""

    id: str
    source: str
    """Where it was configured (a variable name), for messages."""

    @abstractmethod
    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """`data_key` encrypted and authenticated, bound to `context` (the data key's id)."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key back; BackupKeyWrong when `wrapped` was not made by this key for `context`."""


def _fingerprint(key: bytes) -> str:
    return "key:" + hmac.new(key, b"maestro backup key id v1", hashlib.sha256).hexdigest()[:16]


class LocalKey(KeyEncryptionKey):
    """32 bytes given in the environment; wraps with AES-256-GCM (random nonce, the data key's
    id as associated data)."""

    def __init__(self, key: bytes, source: str = KEY_VARIABLE):
        if len(key) != KEY_BYTES:
            raise ValueError("a backup key is 32 bytes")
        self._key = key
        self.id = _fingerprint(key)
        self.source = source

    def __repr__(self) -> str:
        return f"LocalKey({self.id})"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        return nonce + AESGCM(self._key).encrypt(nonce, data_key, b"maestro data key v1|" + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            return AESGCM(self._key).decrypt(wrapped[:12], wrapped[12:], b"maestro data key v1|" + context)
        except (InvalidTag, ValueError):
            raise BackupKeyWrong(
                f"a data key named for backup key {self.id} does not open with it (the envelope was altered)",
                "Do not restore from this backup: use another restore point, or `maestro backup verify` to find sound ones",
            ) from None


def generate_key() -> str:
    """A new backup key as MAESTRO_BACKUP_KEY takes it: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_local_key(value: str, source: str) -> LocalKey:
    """A base64 key from `source`; one line naming the variable (never the value) when malformed."""
    text = value.strip()
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None,
                               validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise BackupKeyError(
            f"{source} is not a backup key (it must be 32 random bytes in base64, 44 characters)",
            "Make one with `maestro backup keygen` and keep it outside the store (a secret manager)",
        )
    return LocalKey(raw, source)


@dataclass(frozen=True)
class Envelope:
    """A data key as stored: wrapped by the KEK `kek_id`. Rotation replaces `kek_id` and
    `wrapped_key` and nothing else: `key_id` is what sealed objects and MACs name."""

    key_id: str
    kek_id: str
    wrapped_key: str
    cipher: str = CIPHER

    def to_dict(self) -> dict[str, str]:
        return {"cipher": self.cipher, "key_id": self.key_id, "kek_id": self.kek_id, "wrapped_key": self.wrapped_key}

    @classmethod
    def from_dict(cls, body: object, what: str) -> "Envelope":
        try:
            envelope = cls(**body)  # type: ignore[arg-type]
            base64.b64decode(envelope.wrapped_key, validate=True)
            bytes.fromhex(envelope.key_id)
        except (TypeError, ValueError, binascii.Error):
            raise BackupKeyError(f"the encryption record of {what} is malformed",
                                 "Do not restore from it: use another restore point") from None
        if envelope.cipher != CIPHER:
            raise BackupKeyError(f"{what} is sealed with '{envelope.cipher}', which this Maestro does not read",
                                 "Restore it with the Maestro version that wrote it")
        return envelope


@dataclass(frozen=True, repr=False)
class DataKey:
    """One backup's key, unwrapped. Never logged: its repr names only its id."""

    key_id: str
    secret: bytes = field(repr=False)
    envelope: Envelope

    def __repr__(self) -> str:
        return f"DataKey({self.key_id})"

    def subkey(self, purpose: bytes, salt: bytes = b"") -> bytes:
        """A key for one purpose (an object's chunks, record MACs) derived by HKDF-SHA256."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None, info=b"maestro " + purpose).derive(self.secret)


@dataclass(frozen=True)
class Keyring:
    """The configured KEKs: `current` wraps new data keys; `old` (MAESTRO_BACKUP_OLD_KEYS) only
    unwrap, until `maestro backup rekey` has rewrapped everything under `current`. `required`:
    MAESTRO_BACKUP_ENCRYPTION=required, a backup without a key is refused."""

    current: KeyEncryptionKey | None = None
    old: tuple[KeyEncryptionKey, ...] = ()
    required: bool = False
    _opened: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Envelope -> DataKey already unwrapped: listing the store asks KMS once per backup, not per read."""

    @property
    def encrypts(self) -> bool:
        return self.current is not None

    @property
    def ids(self) -> list[str]:
        return [k.id for k in ((self.current,) if self.current else ()) + self.old]

    def kek(self, kek_id: str) -> KeyEncryptionKey | None:
        return next((k for k in ((self.current,) if self.current else ()) + self.old if k.id == kek_id), None)

    def new_data_key(self, what: str = "the backup") -> DataKey | None:
        """A fresh data key wrapped by `current`; None without a key (plaintext), unless required."""
        if self.current is None:
            if self.required:
                raise BackupKeyMissing(
                    f"{ENCRYPTION_VARIABLE}=required and no backup key is configured, so {what} was not taken",
                    f"Set {KEY_VARIABLE} (make one with `maestro backup keygen`) or {KMS_VARIABLE}",
                )
            return None
        secret = secrets.token_bytes(KEY_BYTES)
        key_id = secrets.token_hex(16)
        wrapped = self.current.wrap(secret, key_id.encode())
        envelope = Envelope(key_id, self.current.id, base64.b64encode(wrapped).decode())
        return DataKey(key_id, secret, envelope)

    def open(self, envelope: Envelope, what: str) -> DataKey:
        """The data key of `envelope`; one line naming the KEK it needs when that is not configured."""
        kek = self.kek(envelope.kek_id)
        if kek is None:
            if not self.ids:
                raise BackupKeyMissing(
                    f"{what} is encrypted with backup key {envelope.kek_id} and no backup key is configured",
                    f"Set {KEY_VARIABLE} (or {KMS_VARIABLE}) to that key; lost it? see {RUNBOOK}",
                )
            raise BackupKeyWrong(
                f"{what} is encrypted with backup key {envelope.kek_id}, not with the configured "
                f"{', '.join(self.ids)} (a key of another store, or one rotated away)",
                f"Set {KEY_VARIABLE} to that key, or add it to {OLD_KEYS_VARIABLE}; see {RUNBOOK}",
            )
        if envelope not in self._opened:
            secret = kek.unwrap(base64.b64decode(envelope.wrapped_key), envelope.key_id.encode())
            self._opened[envelope] = DataKey(envelope.key_id, secret, envelope)
        return self._opened[envelope]

    def rewrap(self, envelope: Envelope, what: str) -> Envelope:
        """`envelope` under `current` (unchanged when it already is)."""
        if self.current is None:
            raise BackupKeyMissing(f"rewrapping {what} needs the new key", f"Set {KEY_VARIABLE} or {KMS_VARIABLE}")
        if envelope.kek_id == self.current.id:
            return envelope
        secret = self.open(envelope, what).secret
        wrapped = self.current.wrap(secret, envelope.key_id.encode())
        return Envelope(envelope.key_id, self.current.id, base64.b64encode(wrapped).decode(), envelope.cipher)
