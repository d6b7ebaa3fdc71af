"""Amazon S3 (and S3-compatible servers): `s3://bucket/prefix`.

**How sha256 is recorded, atomically, with every byte written once.** S3 takes an object's
metadata when the upload starts, before the bytes (and so their hash) are known, and a
multipart upload cannot change it at completion. So:

- an object that fits in one 8 MiB part is hashed first and sent with one PutObject that
  carries `sha256` and `size`: atomic;
- a bigger one is uploaded as a multipart upload straight onto its key (parts of 8 MiB, a
  few in flight, each checked by S3 with its CRC32, hashed in order as they are read). S3
  shows it under the key only at CompleteMultipartUpload, whole. Its metadata, set when
  the upload starts, says `sha256_sidecar=<upload id>`: its sha256 lives in a sidecar.
  Right after completion a small sidecar object
  `<folder>/.maestro-sha256.<name>.<ETag>` is written with {sha256, size, etag, upload}
  (one PutObject, atomic), then sidecars of earlier versions of the key are removed.

The sidecar's name carries the ETag of the object it vouches for, so that a listing alone
tells which multipart objects are finished (`list(with_metadata=False)` needs no request
per object) and a sidecar can never vouch for another version of the key. A marked object
without the sidecar of its ETag is an unfinished write (killed between the completion and
the sidecar): `head`, `exists`, `list` and `open_read` treat it as absent, not corrupt,
and `discard_unfinished` removes it (with `If-Match` its ETag, so a newer write is kept).
An overwrite that dies there leaves the key absent, never showing a wrong sha256 (the old
object is gone at completion either way: that is S3's overwrite). Names starting with
`.maestro-` are reserved and never listed.

The earlier design (multipart upload to `.maestro-tmp/`, then a server-side copy onto the
key to record sha256 as metadata) wrote every big object twice: a second full write of a
100 GB dump on S3, a third of the upload time on moto. `discard_unfinished` still removes
what it left behind.

`copy()` is one server-side copy pinned to the source's ETag (`CopySourceIfMatch`); a
source whose sha256 is in a sidecar is copied with `MetadataDirective=REPLACE` recording
`sha256` and `size` in the copy's own metadata (atomic: one CopyObject, or a multipart copy
above `copy_multipart_threshold`). `delete()` removes the object and its sidecars.

Retries: botocore's own are switched off so that `RetryPolicy` bounds every request
(PutObject, each part, complete, sidecar, copy, each list page, each ranged re-read).
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from maestro_pipelines.storage.backends import Backend, Container, bucket_opener, missing_sdk, mlflow_artifacts_beside
from maestro_pipelines.storage.base import (
    DEFAULT_SOURCE,
    RESERVED_PREFIX,
    SHA256_KEY,
    SHA256_SIDECAR_KEY,
    SIZE_KEY,
    MiB,
    TRANSIENT,
    InvalidKey,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    PartUpload,
    PrefixedStore,
    RetryPolicy,
    StoreError,
    _close_quietly,
    check_prefix,
    recorded_sha256,
    short_cause,
    split_metadata,
)

CONTENT_TYPE = "application/octet-stream"
SIDECAR_PREFIX = f"{RESERVED_PREFIX}sha256."
_S3_KEY_BYTES = 1024
_ETAG_TEXT_MAX = 32 + 6  # an md5 in hex, '-', up to 10,000 parts
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

    # ---- sidecars: where a multipart object's sha256 is recorded ---------------------------

    def _checked_info(self, key: str, name: str, response: dict[str, Any]) -> ObjectInfo:
        """The object's info, its sha256 from its sidecar when it keeps it there; raises the
        (untranslated) 404 of the sidecar for an unfinished write: it counts as absent."""
        info = self._info(key, response)
        if SHA256_SIDECAR_KEY not in {k.lower() for k in (response.get("Metadata") or {})}:
            return info
        record = self.client.get_object(Bucket=self.bucket, Key=sidecar_name(name, response["ETag"]))["Body"].read()
        return replace(info, sha256=_sidecar_sha256(record, response["ETag"], info.size))

    def _sidecars_of(self, name: str) -> list[str]:
        """The names of every sidecar of the object `name` (any version)."""
        stem = sidecar_stem(name)
        found, token = [], None
        while True:
            request = {"Bucket": self.bucket, "Prefix": stem, **({"ContinuationToken": token} if token else {})}
            page = self.client.list_objects_v2(**request)
            found += [item["Key"] for item in page.get("Contents", [])
                      if (parse_sidecar_name(item["Key"]) or ("",))[0] == name]
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def _delete_names(self, names: list[str]) -> None:
        if len(names) == 1:
            self.client.delete_object(Bucket=self.bucket, Key=names[0])
            return
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in names], "Quiet": True}
        )
        errors = response.get("Errors") or []
        if errors:
            raise StoreError(
                f"S3 refused to delete {errors[0].get('Key')} at {self.source} ({self.url}): {errors[0].get('Code')}",
                "Check the bucket's configuration and the credentials' permissions",
            )

    # ---- objects -------------------------------------------------------------------------

    def _put_single(self, key: str, data: bytes, metadata: dict[str, str]) -> datetime | None:
        response = self.client.put_object(
            Bucket=self.bucket, Key=self._name(key), Body=data, Metadata=metadata, ContentType=CONTENT_TYPE
        )
        return self._response_date(response)

    def _begin_upload(self, key: str, metadata: dict[str, str]) -> PartUpload:
        name = self._name(key)
        if len(sidecar_stem(name).encode("utf-8")) + _ETAG_TEXT_MAX > _S3_KEY_BYTES:
            raise InvalidKey(
                f"Key {key!r} for the store at {self.source} ({self.url}) is too long for S3 to record its sha256 "
                f"beside it (the sidecar's name adds {len(SIDECAR_PREFIX) + _ETAG_TEXT_MAX} bytes)",
                "Use a shorter key (or a shorter store prefix)",
            )
        upload_id = uuid.uuid4().hex
        response = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=name, ContentType=CONTENT_TYPE, ChecksumAlgorithm=PART_CHECKSUM,
            Metadata={**metadata, SHA256_SIDECAR_KEY: upload_id},
        )
        return _S3Upload(self, name, response["UploadId"], upload_id)

    def _open(self, key: str):
        name = self._name(key)
        response = self.client.get_object(Bucket=self.bucket, Key=name)
        try:
            info = self._checked_info(key, name, response)
        except BaseException:
            _close_quietly(response["Body"])
            raise
        etag = response.get("ETag")

        def reopen(offset: int):
            if offset >= info.size:
                return io.BytesIO(b"")
            kwargs = {"IfMatch": etag} if etag else {}
            return self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={offset}-", **kwargs)["Body"]

        return info, response["Body"], reopen

    def head(self, key: str) -> ObjectInfo:
        key = self._key(key)
        name = self._name(key)

        def look_up() -> ObjectInfo:
            return self._checked_info(key, name, self.client.head_object(Bucket=self.bucket, Key=name))

        return self._call("look up an object", look_up, key)

    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix, self.url, self.source)
        request = {"Bucket": self.bucket, "Prefix": self._name(prefix) if prefix else self._base,
                   "MaxKeys": self.list_page_size}
        finished: set[tuple[str, str]] = set()  # (object name, ETag) of the sidecars listed so far

        def head_or_none(entry: tuple[str, dict]) -> ObjectInfo | None:
            key, _ = entry
            try:
                return self.head(key)
            except ObjectNotFound:
                return None  # deleted between the listing and the HEAD, or an unfinished write

        def plain(entry: tuple[str, dict]) -> ObjectInfo | None:
            """From the listing alone when it shows the object finished; else one HEAD."""
            key, item = entry
            etag = _etag_text(item.get("ETag", ""))
            if "-" in etag and (item["Key"], etag) not in finished:
                found = head_or_none(entry)  # a multipart object: ours unfinished, or someone else's
                if found is None:
                    return None
            return ObjectInfo(key, int(item["Size"]), None, item.get("LastModified"), {})

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="maestro-list") as pool:
            token = None
            while True:
                page_request = {**request, **({"ContinuationToken": token} if token else {})}
                page = self._call("list objects", lambda: self.client.list_objects_v2(**page_request))
                entries = []
                for item in page.get("Contents", []):
                    sidecar = parse_sidecar_name(item["Key"])
                    if sidecar is not None:
                        finished.add(sidecar)
                    key = self._key_of(item["Key"])
                    if key is not None:
                        entries.append((key, item))
                for info in pool.map(head_or_none if with_metadata else plain, entries):
                    if info is not None:
                        yield info
                if not page.get("IsTruncated"):
                    return
                token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        key = self._key(key)
        name = self._name(key)
        # One DeleteObjects for the object and its sidecars. Whatever a failure half-way
        # leaves is safe: a sidecar of nothing (it names an ETag, so it vouches for no other
        # version), or a marked object without its sidecar (absent); discard_unfinished
        # sweeps both.
        self._call("delete", lambda: self._delete_names([name, *self._sidecars_of(name)]), key)

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
        source_name = self._name(source_key)

        def look_up() -> tuple[ObjectInfo, dict[str, Any]]:
            response = self.client.head_object(Bucket=self.bucket, Key=source_name)
            return self._checked_info(source_key, source_name, response), response

        info, response = self._call("look up the object to copy", look_up, source_key)
        extra: dict[str, Any] = {"CopySourceIfMatch": response["ETag"]}  # the version just checked
        if SHA256_SIDECAR_KEY in {k.lower() for k in (response.get("Metadata") or {})}:
            # Record the sha256 in the copy's own metadata: no sidecar to write, atomic.
            recorded = {SHA256_KEY: info.sha256, SIZE_KEY: str(info.size)} if info.sha256 else {}
            extra |= {"Metadata": {**info.metadata, **recorded}, "MetadataDirective": "REPLACE",
                      "ContentType": response.get("ContentType") or CONTENT_TYPE}
        # Otherwise CopyObject's default MetadataDirective=COPY (and the managed copy's
        # preserved metadata for multipart copies) keep sha256, size and the user metadata.
        self._call("copy", lambda: self._managed_copy(source_name, self._name(dest_key), extra), source_key)
        return self.head(dest_key)

    def discard_unfinished(self, prefix: str = "", started_before: datetime | None = None) -> list[str]:
        """Open multipart uploads of keys under `prefix`, objects marked as keeping their
        sha256 in a sidecar that has none for their ETag (killed between completion and
        sidecar), sidecars of versions that are gone, and what the earlier temp+copy design
        left under `.maestro-tmp/`."""
        prefix = check_prefix(prefix, self.url, self.source)
        removed = self._abort_uploads(self._name(prefix) if prefix else self._base, started_before)
        if prefix:  # without one, the search above covered .maestro-tmp/ too
            removed += self._abort_uploads(self._temp_search(prefix), started_before)
        removed += self._delete_temporary_objects(self._temp_search(prefix), started_before)
        objects, sidecars = self._listed_with_sidecars(prefix)
        removed += self._discard_unrecorded(objects, sidecars, started_before)
        removed += self._discard_stale_sidecars(objects, sidecars, started_before)
        return removed

    def _abort_uploads(self, search: str, started_before: datetime | None) -> list[str]:
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
                return removed
            request = {**request, "KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _delete_temporary_objects(self, search: str, started_before: datetime | None) -> list[str]:
        removed, token = [], None
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

    def _listed_with_sidecars(self, prefix: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """(object name -> listing entry, object name -> its sidecars' entries) for the keys
        starting with `prefix`. The sidecars of keys right in the prefix's folder are
        outside a listing of a partial name (`a/b` lists `a/b...`, not `a/.maestro-sha256.b...`)."""
        full = self._name(prefix) if prefix else self._base
        folder, slash, partial = full.rpartition("/")
        searches = [full] + ([f"{folder}{slash}{SIDECAR_PREFIX}{partial}"] if partial else [])
        objects: dict[str, dict] = {}
        sidecars: dict[str, list[dict]] = {}
        for search in searches:
            token = None
            while True:
                listing = {"Bucket": self.bucket, "Prefix": search, **({"ContinuationToken": token} if token else {})}
                page = self._call("list objects", lambda: self.client.list_objects_v2(**listing))
                for item in page.get("Contents", []):
                    sidecar = parse_sidecar_name(item["Key"])
                    if sidecar is not None and sidecar[0].startswith(full):
                        sidecars.setdefault(sidecar[0], []).append({**item, "For": sidecar[1]})
                    elif sidecar is None and self._key_of(item["Key"]) is not None:
                        objects[item["Key"]] = item
                if not page.get("IsTruncated"):
                    break
                token = page["NextContinuationToken"]
        return objects, sidecars

    def _discard_unrecorded(self, objects: dict[str, dict], sidecars: dict[str, list[dict]],
                            started_before: datetime | None) -> list[str]:
        """Marked objects with no sidecar for their ETag; deleted only if still that version."""
        removed = []
        for name, item in objects.items():
            etag = _etag_text(item.get("ETag", ""))
            if "-" not in etag or any(s["For"] == etag for s in sidecars.get(name, [])):
                continue  # a single-part object (its sha256 is its metadata), or finished
            if started_before is not None and item["LastModified"] >= started_before:
                continue
            try:
                response = self._call("look up an object", lambda: self.client.head_object(Bucket=self.bucket, Key=name))
            except ObjectNotFound:
                continue
            if SHA256_SIDECAR_KEY not in {k.lower() for k in (response.get("Metadata") or {})}:
                continue  # someone else's multipart object (MLflow's artifacts): not ours to judge
            if self._delete_if_still(name, response["ETag"]):
                removed.append(f"unfinished write {name} (no sha256 recorded)")
        return removed

    def _delete_if_still(self, name: str, etag: str) -> bool:
        """Delete `name` only while it is still the version `etag` (If-Match)."""
        def delete() -> bool:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=name, IfMatch=etag)
            except self._exc.ClientError as exc:
                code, status = self._code(exc)
                if code in ("PreconditionFailed", "NoSuchKey") or status in (404, 412):
                    return False  # replaced by a newer write, or gone
                raise
            return True

        return self._call("delete an unfinished write", delete, name)

    def _discard_stale_sidecars(self, objects: dict[str, dict], sidecars: dict[str, list[dict]],
                                started_before: datetime | None) -> list[str]:
        removed = []
        for name, entries in sidecars.items():
            current = _etag_text(objects[name].get("ETag", "")) if name in objects else None
            for entry in entries:
                if entry["For"] == current:
                    continue
                if started_before is not None and entry["LastModified"] >= started_before:
                    continue
                sidecar = entry["Key"]
                self._call("delete a stale sha256 record",
                           lambda: self.client.delete_object(Bucket=self.bucket, Key=sidecar))
                removed.append(f"sha256 record of a version no longer there {sidecar}")
        return removed


class _S3Upload(PartUpload):
    """A multipart upload onto the final key; commit = complete, then the sidecar."""

    def __init__(self, store: S3ObjectStore, name: str, s3_upload_id: str, upload_id: str):
        self.store = store
        self.name = name
        self.s3_upload_id = s3_upload_id
        self.upload_id = upload_id
        self.etag: str | None = None
        self.completed_at: datetime | None = None

    def upload_part(self, index: int, offset: int, data: bytes, last: bool) -> dict[str, Any]:
        response = self.store.client.upload_part(
            Bucket=self.store.bucket, Key=self.name, UploadId=self.s3_upload_id, PartNumber=index + 1, Body=data,
            ChecksumAlgorithm=PART_CHECKSUM,
        )
        return {"PartNumber": index + 1, "ETag": response["ETag"], "ChecksumCRC32": response["ChecksumCRC32"]}

    def commit(self, tokens: list[Any], metadata: dict[str, str]) -> datetime | None:
        if self.etag is None:
            self.etag, self.completed_at = self.complete(tokens)
        self.record(metadata)
        self.drop_older_sidecars()
        return self.completed_at

    def complete(self, tokens: list[Any]) -> tuple[str, datetime | None]:
        """CompleteMultipartUpload: the object appears under its key, whole (ETag, when)."""
        store, client = self.store, self.store.client
        try:
            response = client.complete_multipart_upload(
                Bucket=store.bucket, Key=self.name, UploadId=self.s3_upload_id, MultipartUpload={"Parts": tokens}
            )
            return response["ETag"], store._response_date(response)
        except store._exc.ClientError as exc:
            if store._code(exc)[0] != "NoSuchUpload":
                raise
        # A retried complete whose first attempt succeeded: the upload is gone, the object
        # is there, if it is still this upload's (its id in the metadata), not another's.
        head = client.head_object(Bucket=store.bucket, Key=self.name)
        if (head.get("Metadata") or {}).get(SHA256_SIDECAR_KEY) != self.upload_id:
            raise StoreError(
                f"The upload of {self.name} at {store.source} ({store.url}) was aborted before it completed",
                "Write it again (another process may have discarded it as unfinished)",
            )
        return head["ETag"], head.get("LastModified")

    def record(self, metadata: dict[str, str]) -> None:
        """The sidecar: from now on the object counts, with this sha256."""
        record = {"sha256": metadata[SHA256_KEY], "size": int(metadata[SIZE_KEY]), "etag": _etag_text(self.etag),
                  "upload": self.upload_id}
        self.store.client.put_object(
            Bucket=self.store.bucket, Key=sidecar_name(self.name, self.etag), Body=json.dumps(record).encode(),
            ContentType="application/json",
        )

    def drop_older_sidecars(self) -> None:
        """Best effort: sidecars of earlier versions vouch for nothing (they name other ETags);
        what stays is swept by discard_unfinished."""
        store, mine = self.store, sidecar_name(self.name, self.etag)
        try:
            older = [n for n in store._call("list sha256 records", lambda: store._sidecars_of(self.name)) if n != mine]
            if older:
                store._call("delete stale sha256 records", lambda: store._delete_names(older))
        except Exception:
            pass

    def abort(self) -> None:
        store = self.store
        try:
            if self.etag is None:
                store._call("clean up an upload", lambda: store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=self.name, UploadId=self.s3_upload_id
                ))
            else:  # completed but not recorded: remove the unfinished object (this version only)
                store._delete_if_still(self.name, self.etag)
        except Exception:
            pass  # best effort: discard_unfinished and lifecycle rules collect what is left


# ---- sidecar names --------------------------------------------------------------------------


def _etag_text(etag: str) -> str:
    return etag.strip().strip('"')


def sidecar_stem(name: str) -> str:
    """`<folder>/.maestro-sha256.<base name>.`: every sidecar of the object `name` starts so."""
    folder, slash, base = name.rpartition("/")
    return f"{folder}{slash}{SIDECAR_PREFIX}{base}."


def sidecar_name(name: str, etag: str) -> str:
    """The sidecar vouching for the version `etag` of the object `name`."""
    return sidecar_stem(name) + _etag_text(etag)


def parse_sidecar_name(listed: str) -> tuple[str, str] | None:
    """(object name, ETag) of a listed sidecar's name, or None for any other name."""
    folder, slash, base = listed.rpartition("/")
    if not base.startswith(SIDECAR_PREFIX):
        return None
    object_base, dot, etag = base[len(SIDECAR_PREFIX):].rpartition(".")
    if not dot or not object_base or not etag:
        return None
    return f"{folder}{slash}{object_base}", etag


def _sidecar_sha256(record: bytes, etag: str, size: int) -> str | None:
    """The sha256 a sidecar records, if it is a record of this very version; None (not
    good: `ChecksumMissing` on a verified read) for anything else under its name."""
    try:
        body = json.loads(record)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("etag") != _etag_text(etag) or body.get("size") != size:
        return None
    return recorded_sha256(body.get("sha256"))


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
