"""AWS KMS as the key-encryption key: data keys are wrapped by KMS Encrypt and unwrapped by
KMS Decrypt, with the data key's id as encryption context (a wrapped key moved to another id
does not decrypt). The key material never leaves KMS; Maestro holds only the key id.

boto3 finds credentials and the endpoint itself (AWS_* variables, AWS_ENDPOINT_URL_KMS for a
KMS-compatible server such as moto's), as the S3 store's SDK does.
"""

from __future__ import annotations

from maestro_pipelines.crypto.keys import (
    KMS_PREFIX,
    BackupKeyError,
    BackupKeyWrong,
    KeyEncryptionKey,
    KeyServiceUnavailable,
)

CONTEXT_NAME = "maestro-data-key"


class AwsKmsKey(KeyEncryptionKey):
    def __init__(self, key_id: str, source: str, client=None):
        if not key_id:
            raise BackupKeyError(f"{source} names no KMS key", "Give the key id, ARN or alias/<name> of the KMS key")
        self.key_id = key_id
        self.id = KMS_PREFIX + key_id
        self.source = source
        self._client = client

    def __repr__(self) -> str:
        return f"AwsKmsKey({self.key_id})"

    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise BackupKeyError(f"{self.source} names an AWS KMS key and boto3 is not installed",
                                     "pip install 'maestro-pipelines[s3]'") from None
            from botocore.exceptions import BotoCoreError

            # Few, short attempts: an unreachable KMS should be one line in seconds, not minutes.
            config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})
            try:
                self._client = boto3.client("kms", region_name=self._region(), config=config)
            except BotoCoreError as exc:  # NoRegionError: no AWS_REGION, no profile region
                raise BackupKeyError(
                    f"AWS KMS key {self.key_id} ({self.source}) cannot be reached: no AWS region is set ({type(exc).__name__})",
                    "Set AWS_REGION to the key's region, or give the key's ARN (it names its region)",
                ) from None
        return self._client

    def _region(self) -> str | None:
        """The region a key ARN names (arn:aws:kms:REGION:ACCOUNT:key/ID); None: boto3's own."""
        parts = self.key_id.split(":")
        return (parts[3] or None) if self.key_id.startswith("arn:") and len(parts) > 4 else None

    def _call(self, action: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        try:
            return getattr(client, action)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise BackupKeyWrong(
                    f"AWS KMS key {self.key_id} does not open this data key (the envelope was altered, or "
                    "it was wrapped by another key)",
                    "Do not restore from this backup: use another restore point",
                ) from None
            if code in ("NotFoundException", "DisabledException", "KMSInvalidStateException"):
                raise BackupKeyError(f"AWS KMS key {self.key_id} ({self.source}) is missing or disabled ({code})",
                                     "Enable the key or set the variable to the key backups are wrapped by") from None
            if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
                # A Decrypt refused: no permission, or (moto, and AWS for another account's key)
                # a data key wrapped by another key than the one the envelope names.
                also = " (or the data key was wrapped by another key)" if action == "decrypt" else ""
                raise BackupKeyError(f"AWS KMS refused {action} with key {self.key_id} ({code}){also}",
                                     "Give Maestro's AWS credentials kms:Encrypt and kms:Decrypt on that key") from None
            raise KeyServiceUnavailable(f"AWS KMS failed {action} with key {self.key_id} ({code or exc})",
                                        "Try again; if it persists, check the KMS service's health") from None
        except BotoCoreError as exc:
            endpoint = getattr(client.meta, "endpoint_url", "AWS KMS")
            raise KeyServiceUnavailable(
                f"AWS KMS at {endpoint} is unreachable ({type(exc).__name__}), so key {self.key_id} cannot be used",
                "Check the network and AWS_REGION / AWS_ENDPOINT_URL_KMS, then run the command again",
            ) from None

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        answer = self._call("encrypt", KeyId=self.key_id, Plaintext=data_key,
                            EncryptionContext={CONTEXT_NAME: context.decode()})
        return answer["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        answer = self._call("decrypt", KeyId=self.key_id, CiphertextBlob=wrapped,
                            EncryptionContext={CONTEXT_NAME: context.decode()})
        return answer["Plaintext"]
