"""Amazon S3 (and S3-compatible servers): `s3://bucket/prefix`.

**How sha256 is recorded, atomically.** S3 takes an object's metadata when the upload
starts, before the bytes (and so their hash) are known, and a multipart upload cannot
change it at completion. So:

- an object that fits in one 8 MiB part is hashed first and sent with one PutObject that
  carries `sha256` and `size`: atomic;
- a bigger one is uploaded as a multipart upload to a temporary object
  `<prefix>/.maestro-tmp/<uuid>` (parts of 8 MiB, a few in flight, hashed in order as they
  are read), completed, then published with one server-side copy onto the final key with
  `MetadataDirective=REPLACE` adding `sha256` and `size` (boto3's managed copy: one
  CopyObject, or UploadPartCopy parts above `copy_multipart_threshold`; both atomic), and
  the temporary object is deleted.

The final key therefore only ever holds a complete object with its sha256: a crash
leaves at most a temporary object (never listed; expire `.maestro-tmp/` with a lifecycle
rule) or an incomplete multipart upload (AbortIncompleteMultipartUpload rule), and an
existing good object under the key stays good until the copy replaces it. Copying onto the
key itself instead would briefly expose an object without a sha256 and could replace a good
object with an unmarked one if the process died in between.

Retries: botocore's own are switched off so that `RetryPolicy` bounds every request
(PutObject, each part, complete, copy, each list page, each ranged re-read).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.utils import parsedate_to_datetime
import re
from typing import Any

from maestro_pipelines.storage.backends import Backend, Container, bucket_opener, missing_sdk, mlflow_artifacts_beside
from maestro_pipelines.storage.base import (
    DEFAULT_SOURCE,
    MiB,
    TRANSIENT,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    PartUpload,
    PrefixedStore,
    RetryPolicy,
    StoreError,
    check_prefix,
    short_cause,
    split_metadata,
)

CONTENT_TYPE = "application/octet-stream"
PART_CHECKSUM = "CRC32"
"""S3 checks each part's CRC32 on arrival and keeps a composite checksum, as `aws s3 cp` does
(without one, S3 and moto compute a full-object CRC64NVME at completion)."""
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
    "500", "502", "503", "504",
}
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "403", "401",
}
_CREDENTIALS_HINT = (
    "Check the AWS credentials Maestro runs with (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
    "or the instance role) and that they may read, write and list this bucket"
)


def s3_client(
    region_name: str | None = None,
    endpoint_url: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
    profile_name: str | None = None,
    use_ssl: bool = True,
    verify: bool | str | None = None,
    max_pool_connections: int = 16,
) -> Any:
    """A boto3 S3 client without botocore retries (the store retries). Field names are
    dagster-aws's `S3Resource`'s. Without `endpoint_url`, boto3 honours AWS_ENDPOINT_URL."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=profile_name)
    return session.client(
        "s3",
        region_name=region_name,
        endpoint_url=endpoint_url,
        use_ssl=use_ssl,
        verify=verify,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
        aws_session_token=aws_session_token,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
        ),
    )


class S3ObjectStore(PrefixedStore):
    scheme = "s3"
    max_parts = 10_000

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        source: str = DEFAULT_SOURCE,
        *,
        client: Any = None,
        retry: RetryPolicy | None = None,
        part_concurrency: int = 4,
        list_page_size: int = 1000,
        copy_multipart_threshold: int = 1024 * MiB,
        **client_options: Any,
    ):
        """`client`: a boto3 S3 client (e.g. `S3Resource(...).get_client()`); without one, a
        client is made from `client_options` (S3Resource's field names: region_name,
        endpoint_url, aws_access_key_id, aws_secret_access_key, aws_session_token,
        profile_name, use_ssl, verify)."""
        super().__init__("s3", bucket, prefix, source, retry)
        try:
            import boto3  # noqa: F401
            import botocore.exceptions as botocore_exceptions
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            raise missing_sdk("s3", self.url, source) from None
        self._exc = botocore_exceptions
        self.part_concurrency = part_concurrency
        self.list_page_size = list_page_size
        if client is None:
            try:
                client = s3_client(**client_options)
            except botocore_exceptions.ProfileNotFound as exc:
                raise self.access_denied("load the AWS profile", short_cause(exc), _CREDENTIALS_HINT) from None
        elif client_options:
            raise TypeError(f"pass either client or client options, not both: {sorted(client_options)}")
        self.client = client
        self._copy_config = TransferConfig(
            multipart_threshold=copy_multipart_threshold,
            multipart_chunksize=128 * MiB,
            max_concurrency=8,
            preferred_transfer_client="classic",
        )

    # ---- errors --------------------------------------------------------------------------

    def _code(self, exc: BaseException) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code, status

    def classify(self, exc: BaseException) -> str | None:
        e = self._exc
        if isinstance(exc, e.ClientError):
            code, status = self._code(exc)
            return TRANSIENT if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES else None
        if isinstance(exc, (e.ConnectionError, e.HTTPClientError, e.IncompleteReadError, e.ResponseStreamingError)):
            return TRANSIENT
        import urllib3.exceptions

        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return TRANSIENT
        return None

    def _bucket_missing(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._exc.ClientError as exc:
            code, status = self._code(exc)
            return status == 404 or code in ("NoSuchBucket", "404", "NotFound")
        except Exception:
            return False
        return False

    def translate(self, exc: BaseException, key: str | None, action: str) -> BaseException:
        e = self._exc
        if isinstance(exc, e.ClientError):
            code, status = self._code(exc)
            if code == "NoSuchBucket":
                return self.missing_container()
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchUpload":
                if self._bucket_missing():
                    return self.missing_container()
                return self.not_found(key) if key else StoreError(
                    f"S3 found nothing to {action} at {self.source} ({self.url}): {code}", None
                )
            if code in _AUTH_CODES or status in (401, 403):
                detail = f"HTTP {status} (access denied)" if code in ("", "403", "401") else code
                return self.access_denied(action, detail, _CREDENTIALS_HINT)
            if code == "PreconditionFailed" or status == 412:
                return ObjectChanged(
                    f"Object {key!r} at {self.source} ({self.url}) was replaced while being read",
                    "Read it again",
                )
            return StoreError(
                f"S3 refused to {action} at {self.source} ({self.url}): {code or status}",
                "Check the bucket's configuration and the endpoint",
            )
        if isinstance(exc, (e.NoCredentialsError, e.PartialCredentialsError, e.CredentialRetrievalError)):
            return self.access_denied(action, "no usable AWS credentials found", _CREDENTIALS_HINT)
        if isinstance(exc, e.ProfileNotFound):
            return self.access_denied(action, short_cause(exc), _CREDENTIALS_HINT)
        return exc

    # ---- objects -------------------------------------------------------------------------

    def _info(self, key: str, response: dict[str, Any]) -> ObjectInfo:
        sha, _size, user = split_metadata(response.get("Metadata"))
        return ObjectInfo(key, int(response.get("ContentLength", 0)), sha, response.get("LastModified"), user)

    @staticmethod
    def _response_date(response: dict[str, Any]) -> datetime | None:
        try:
            return parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        except (KeyError, TypeError, ValueError):
            return None

    def _put_single(self, key: str, data: bytes, metadata: dict[str, str]) -> datetime | None:
        response = self.client.put_object(
            Bucket=self.bucket, Key=self._name(key), Body=data, Metadata=metadata, ContentType=CONTENT_TYPE
        )
        return self._response_date(response)

    def _begin_upload(self, key: str, metadata: dict[str, str]) -> PartUpload:
        temp = self._temp_name(key)
        response = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=temp, ContentType=CONTENT_TYPE, ChecksumAlgorithm=PART_CHECKSUM
        )
        return _S3Upload(self, self._name(key), temp, response["UploadId"])

    def _open(self, key: str):
        name = self._name(key)
        response = self.client.get_object(Bucket=self.bucket, Key=name)
        info = self._info(key, response)
        etag = response.get("ETag")

        def reopen(offset: int):
            if offset >= info.size:
                return io.BytesIO(b"")
            kwargs = {"IfMatch": etag} if etag else {}
            return self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={offset}-", **kwargs)["Body"]

        return info, response["Body"], reopen

    def head(self, key: str) -> ObjectInfo:
        key = self._key(key)
        response = self._call(
            "look up an object", lambda: self.client.head_object(Bucket=self.bucket, Key=self._name(key)), key
        )
        return self._info(key, response)

    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix, self.url, self.source)
        request = {"Bucket": self.bucket, "Prefix": self._name(prefix) if prefix else self._base,
                   "MaxKeys": self.list_page_size}

        def head_or_none(entry: tuple[str, dict]) -> ObjectInfo | None:
            key, _ = entry
            try:
                return self.head(key)
            except ObjectNotFound:
                return None  # deleted between the listing and the HEAD

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="maestro-list") as pool:
            token = None
            while True:
                page_request = {**request, **({"ContinuationToken": token} if token else {})}
                page = self._call("list objects", lambda: self.client.list_objects_v2(**page_request))
                entries = []
                for item in page.get("Contents", []):
                    key = self._key_of(item["Key"])
                    if key is not None:
                        entries.append((key, item))
                if with_metadata:
                    for info in pool.map(head_or_none, entries):
                        if info is not None:
                            yield info
                else:
                    for key, item in entries:
                        yield ObjectInfo(key, int(item["Size"]), None, item.get("LastModified"), {})
                if not page.get("IsTruncated"):
                    return
                token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        key = self._key(key)
        self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._name(key)), key)

    def _managed_copy(self, source_name: str, dest_name: str, extra: dict[str, Any] | None = None) -> None:
        self.client.copy(
            CopySource={"Bucket": self.bucket, "Key": source_name},
            Bucket=self.bucket,
            Key=dest_name,
            ExtraArgs={"ChecksumAlgorithm": PART_CHECKSUM, **(extra or {})},
            Config=self._copy_config,
        )

    def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        source_key = self._key(source_key)
        dest_key = self._key(dest_key)
        # CopyObject's default MetadataDirective=COPY (and the managed copy's preserved
        # metadata for multipart copies) keep sha256, size and the user metadata.
        self._call("copy", lambda: self._managed_copy(self._name(source_key), self._name(dest_key)), source_key)
        return self.head(dest_key)


    def discard_unfinished(self, prefix: str = "", started_before: datetime | None = None) -> list[str]:
        search = self._temp_search(prefix)
        removed = []
        request = {"Bucket": self.bucket, "Prefix": search}
        while True:
            page = self._call("list unfinished uploads", lambda: self.client.list_multipart_uploads(**request))
            for upload in page.get("Uploads", []):
                if started_before is not None and upload["Initiated"] >= started_before:
                    continue
                name, upload_id = upload["Key"], upload["UploadId"]

                def abort(name=name, upload_id=upload_id) -> bool:
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
                    except self._exc.ClientError as exc:
                        if self._code(exc)[0] == "NoSuchUpload":
                            return False  # completed or aborted meanwhile
                        raise
                    return True

                if not self._call("abort an unfinished upload", abort, name):
                    continue
                removed.append(f"open multipart upload {name} (started {upload['Initiated']:%Y-%m-%d %H:%M} UTC)")
            if not page.get("IsTruncated"):
                break
            request = {**request, "KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        token = None
        while True:
            listing = {"Bucket": self.bucket, "Prefix": search, **({"ContinuationToken": token} if token else {})}
            page = self._call("list temporary objects", lambda: self.client.list_objects_v2(**listing))
            for item in page.get("Contents", []):
                if started_before is not None and item["LastModified"] >= started_before:
                    continue
                name = item["Key"]
                self._call("delete a temporary object", lambda: self.client.delete_object(Bucket=self.bucket, Key=name))
                removed.append(f"temporary object {name}")
            if not page.get("IsTruncated"):
                return removed
            token = page["NextContinuationToken"]


class _S3Upload(PartUpload):
    def __init__(self, store: S3ObjectStore, final: str, temp: str, upload_id: str):
        self.store = store
        self.final = final
        self.temp = temp
        self.upload_id = upload_id
        self.completed = False
        self.published = False

    def upload_part(self, index: int, offset: int, data: bytes, last: bool) -> dict[str, Any]:
        response = self.store.client.upload_part(
            Bucket=self.store.bucket, Key=self.temp, UploadId=self.upload_id, PartNumber=index + 1, Body=data,
            ChecksumAlgorithm=PART_CHECKSUM,
        )
        return {"PartNumber": index + 1, "ETag": response["ETag"], "ChecksumCRC32": response["ChecksumCRC32"]}

    def commit(self, tokens: list[Any], metadata: dict[str, str]) -> datetime | None:
        store, client = self.store, self.store.client
        if not self.completed:
            try:
                client.complete_multipart_upload(
                    Bucket=store.bucket, Key=self.temp, UploadId=self.upload_id, MultipartUpload={"Parts": tokens}
                )
            except store._exc.ClientError as exc:
                # A retried complete whose first attempt succeeded: the upload is gone, the object is there.
                if store._code(exc)[0] != "NoSuchUpload":
                    raise
                client.head_object(Bucket=store.bucket, Key=self.temp)
            self.completed = True
        if not self.published:
            store._managed_copy(
                self.temp,
                self.final,
                {"Metadata": metadata, "MetadataDirective": "REPLACE", "ContentType": CONTENT_TYPE},
            )
            self.published = True
        client.delete_object(Bucket=store.bucket, Key=self.temp)
        return client.head_object(Bucket=store.bucket, Key=self.final).get("LastModified")

    def abort(self) -> None:
        store = self.store
        for action in (
            None if self.completed else lambda: store.client.abort_multipart_upload(
                Bucket=store.bucket, Key=self.temp, UploadId=self.upload_id
            ),
            lambda: store.client.delete_object(Bucket=store.bucket, Key=self.temp),
        ):
            if action is None:
                continue
            try:
                store._call("clean up an upload", action)
            except Exception:
                pass  # best effort: lifecycle rules collect what is left


# ---- the backend ----------------------------------------------------------------------------


BACKEND = Backend(
    name="s3",
    schemes=("s3",),
    example="s3://bucket/prefix",
    open=bucket_opener(S3ObjectStore),
    sdk="boto3",
    extra="s3",
    artifact_uri=mlflow_artifacts_beside,
    container=Container(
        "bucket", re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
        "Bucket names are 3-63 lowercase letters, digits and '-' (and '.')",
    ),
    credentials="AWS_* variables",
    # boto3 reads AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE and the credentials itself.
    resource_options={
        "region_name": "region_name",
        "endpoint_url": "endpoint_url",
        "aws_access_key_id": "aws_access_key_id",
        "aws_secret_access_key": "aws_secret_access_key",
        "aws_session_token": "aws_session_token",
        "profile_name": "profile_name",
        "part_concurrency": "part_concurrency",
    },
)
