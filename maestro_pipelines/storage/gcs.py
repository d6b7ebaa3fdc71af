"""Google Cloud Storage: `gs://bucket/prefix`.

**How sha256 is recorded, atomically.** GCS takes metadata when an upload starts, before
the hash is known. So:

- an object that fits in one 8 MiB chunk is hashed first and sent in one request with
  `sha256` and `size` in its metadata: atomic;
- a bigger one goes through a resumable upload session (8 MiB chunks, sent in order, each
  resumed from the byte the server confirms after a failure) to a temporary object
  `<prefix>/.maestro-tmp/<uuid>`, which is then published onto the final key by a
  one-source `compose` whose destination resource carries `sha256` and `size`, and the
  temporary object is deleted. Compose writes the destination atomically with the given
  metadata and, within a bucket, without copying data (it is a metadata operation on real
  GCS), so the final key never holds an object without its sha256 and an existing good
  object stays until replaced. (A rewrite with new destination metadata would do too on
  real GCS, but the emulator ignores the destination metadata of a rewrite, so compose is
  the scheme verified here. Patching metadata after the upload would expose an unmarked
  object under the key.) Composite objects carry a crc32c but no md5: our sha256 covers it.

If a write fails, its resumable session is cancelled (DELETE on the session URI; the
emulator does not implement that, real GCS does) and the temporary object, if finalized,
deleted.

Honours STORAGE_EMULATOR_HOST (then anonymous credentials and a placeholder project);
otherwise Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud auth,
the metadata server). The SDK's own retries are off for the calls made here so that
`RetryPolicy` bounds every request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from maestro_pipelines.storage.backends import Backend, Container, bucket_opener, missing_sdk, mlflow_artifacts_beside
from maestro_pipelines.storage.base import (
    CHUNK_SIZE,
    DEFAULT_SOURCE,
    SIZE_KEY,
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
_TIMEOUT = (10, 120)
_CREDENTIALS_HINT = (
    "Check the Google credentials Maestro runs with (GOOGLE_APPLICATION_CREDENTIALS or "
    "`gcloud auth application-default login`) and that they may read, write and list this bucket"
)


class _HTTPStatus(Exception):
    """A resumable-upload request answered with an unexpected status."""

    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"HTTP {status}: {text[:200]}")


class GCSObjectStore(PrefixedStore):
    scheme = "gs"
    max_parts = None
    part_concurrency = 1  # a resumable upload takes its chunks in order

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        source: str = DEFAULT_SOURCE,
        *,
        client: Any = None,
        project: str | None = None,
        endpoint_url: str | None = None,
        emulator_host: str | None = None,
        anonymous: bool | None = None,
        retry: RetryPolicy | None = None,
        list_page_size: int = 1000,
    ):
        """`endpoint_url` or `emulator_host` (STORAGE_EMULATOR_HOST) point at another server;
        `anonymous` (default: when either is set) skips credentials."""
        super().__init__("gs", bucket, prefix, source, retry)
        try:
            import google.api_core.exceptions as api_exceptions
            import google.auth.exceptions as auth_exceptions
            import google.cloud.storage as storage
            import requests
        except ImportError:
            raise missing_sdk("gs", self.url, source) from None
        self._api = api_exceptions
        self._auth = auth_exceptions
        self._requests = requests
        self.list_page_size = list_page_size
        if client is None:
            endpoint = endpoint_url or emulator_host
            if endpoint and "://" not in endpoint:
                endpoint = f"http://{endpoint}"
            if anonymous is None:
                anonymous = bool(endpoint)
            kwargs: dict[str, Any] = {}
            if endpoint:
                kwargs["client_options"] = {"api_endpoint": endpoint}
            if anonymous:
                from google.auth.credentials import AnonymousCredentials

                kwargs["credentials"] = AnonymousCredentials()
                project = project or "maestro"
            try:
                client = storage.Client(project=project, **kwargs)
            except auth_exceptions.DefaultCredentialsError:
                raise self.access_denied("find Google credentials", "none configured", _CREDENTIALS_HINT) from None
        self.client = client
        self._bucket = client.bucket(bucket)
        self._http = requests.Session()

    # ---- errors --------------------------------------------------------------------------

    def classify(self, exc: BaseException) -> str | None:
        api, r = self._api, self._requests.exceptions
        if isinstance(exc, (api.TooManyRequests, api.InternalServerError, api.BadGateway, api.ServiceUnavailable,
                            api.GatewayTimeout)):
            return TRANSIENT
        if isinstance(exc, api.GoogleAPICallError) and (exc.code or 0) >= 500:
            return TRANSIENT
        if isinstance(exc, _HTTPStatus) and (exc.status >= 500 or exc.status in (408, 429)):
            return TRANSIENT
        if isinstance(exc, (r.ConnectionError, r.Timeout, r.ChunkedEncodingError, self._auth.TransportError,
                            ConnectionError, TimeoutError)):
            return TRANSIENT
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            return TRANSIENT
        return None

    def _bucket_missing(self) -> bool:
        try:
            return not self._bucket.exists(retry=None, timeout=_TIMEOUT)
        except Exception:
            return False

    def translate(self, exc: BaseException, key: str | None, action: str) -> BaseException:
        api = self._api
        if isinstance(exc, api.NotFound):
            if self._bucket_missing():
                return self.missing_container()
            if key:
                return self.not_found(key)
        if isinstance(exc, (api.Forbidden, api.Unauthorized, self._auth.RefreshError,
                            self._auth.DefaultCredentialsError)):
            return self.access_denied(action, short_cause(exc), _CREDENTIALS_HINT)
        if isinstance(exc, api.PreconditionFailed):
            return ObjectChanged(
                f"Object {key!r} at {self.source} ({self.url}) was replaced while being read", "Read it again"
            )
        if isinstance(exc, (api.GoogleAPICallError, _HTTPStatus)):
            return StoreError(
                f"GCS refused to {action} at {self.source} ({self.url}): {short_cause(exc)}",
                "Check the bucket's configuration and the endpoint",
            )
        return exc

    # ---- objects -------------------------------------------------------------------------

    def _info(self, key: str, blob: Any) -> ObjectInfo:
        sha, _size, user = split_metadata(blob.metadata)
        return ObjectInfo(key, int(blob.size or 0), sha, blob.updated, user)

    def _put_single(self, key: str, data: bytes, metadata: dict[str, str]) -> datetime | None:
        blob = self._bucket.blob(self._name(key))
        blob.metadata = metadata
        blob.upload_from_string(data, content_type=CONTENT_TYPE, retry=None, timeout=_TIMEOUT)
        return blob.updated

    def _begin_upload(self, key: str, metadata: dict[str, str]) -> PartUpload:
        temp = self._bucket.blob(self._temp_name(key))
        session = temp.create_resumable_upload_session(
            content_type=CONTENT_TYPE, checksum=None, retry=None, timeout=_TIMEOUT
        )
        return _GCSUpload(self, self._name(key), temp, session)

    def _open(self, key: str):
        blob = self._bucket.blob(self._name(key))
        blob.reload(retry=None, timeout=_TIMEOUT)
        info = self._info(key, blob)
        generation = blob.generation
        # Download through the client's endpoint, not the mediaLink the server stored.
        download = self._bucket.blob(blob.name)

        def reopen(offset: int) -> _RangedReader:
            return _RangedReader(download, generation, offset, info.size)

        return info, reopen(0), reopen

    def head(self, key: str) -> ObjectInfo:
        key = self._key(key)
        blob = self._bucket.blob(self._name(key))
        self._call("look up an object", lambda: blob.reload(retry=None, timeout=_TIMEOUT), key)
        return self._info(key, blob)

    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix, self.url, self.source)
        full = self._name(prefix) if prefix else self._base
        token = None
        while True:
            def page(token=token):
                iterator = self.client.list_blobs(
                    self._bucket, prefix=full or None, page_size=self.list_page_size, page_token=token,
                    retry=None, timeout=_TIMEOUT,
                )
                first = next(iterator.pages, None)
                return (list(first) if first is not None else []), iterator.next_page_token

            blobs, token = self._call("list objects", page)
            for blob in blobs:
                key = self._key_of(blob.name)
                if key is None:
                    continue
                info = self._info(key, blob)
                yield info if with_metadata else ObjectInfo(key, info.size, None, info.last_modified, {})
            if not token:
                return

    def delete(self, key: str) -> None:
        key = self._key(key)
        blob = self._bucket.blob(self._name(key))
        try:
            self._call("delete", lambda: blob.delete(retry=None, timeout=_TIMEOUT), key)
        except ObjectNotFound:
            pass  # deleting what is not there is fine

    def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        source_key = self._key(source_key)
        dest_key = self._key(dest_key)
        source = self._bucket.blob(self._name(source_key))
        # copyTo without a destination resource keeps the source's metadata (sha256, size, user).
        self._call(
            "copy",
            lambda: self._bucket.copy_blob(source, self._bucket, self._name(dest_key), retry=None, timeout=_TIMEOUT),
            source_key,
        )
        return self.head(dest_key)


    def discard_unfinished(self, prefix: str = "", started_before: datetime | None = None) -> list[str]:
        # A resumable session's object exists only once its last byte is in: what a write
        # killed before then left is a session GCS expires after a week, not listable here.
        search = self._temp_search(prefix)
        removed = []
        token = None
        while True:
            def page(token=token):
                iterator = self.client.list_blobs(self._bucket, prefix=search, page_size=self.list_page_size,
                                                  page_token=token, retry=None, timeout=_TIMEOUT)
                first = next(iterator.pages, None)
                return (list(first) if first is not None else []), iterator.next_page_token

            blobs, token = self._call("list temporary objects", page)
            for blob in blobs:
                created = blob.time_created
                if started_before is not None and (created is None or created >= started_before):
                    continue
                try:
                    self._call("delete a temporary object", lambda: blob.delete(retry=None, timeout=_TIMEOUT), blob.name)
                except ObjectNotFound:
                    continue
                removed.append(f"temporary object {blob.name}")
            if not token:
                return removed


class _RangedReader:
    """Reads a GCS object generation in 8 MiB ranged requests (one chunk in memory)."""

    def __init__(self, blob: Any, generation: int | None, offset: int, size: int):
        self._blob = blob
        self._generation = generation
        self._position = offset
        self._size = size
        self._buffer = memoryview(b"")

    def read(self, n: int) -> bytes:
        if not self._buffer:
            if self._position >= self._size:
                return b""
            end = min(self._position + CHUNK_SIZE, self._size) - 1
            data = self._blob.download_as_bytes(
                start=self._position, end=end, if_generation_match=self._generation, checksum=None,
                raw_download=True, retry=None, timeout=_TIMEOUT,
            )
            if not data:
                return b""
            self._buffer = memoryview(data)
            self._position += len(data)
        piece, self._buffer = self._buffer[:n], self._buffer[n:]
        return bytes(piece)

    def close(self) -> None:
        self._buffer = memoryview(b"")


class _GCSUpload(PartUpload):
    """A resumable upload session driven chunk by chunk: Content-Range PUTs; after a failure,
    a status query tells which byte the server has, and the chunk is resent from there."""

    def __init__(self, store: GCSObjectStore, final: str, temp: Any, session_url: str):
        self.store = store
        self.final = final
        self.temp = temp
        self.session_url = session_url
        self.uncertain = False
        self.finalized = False
        self.composed = False

    def _put(self, headers: dict[str, str], body: bytes = b"") -> Any:
        return self.store._http.put(self.session_url, data=body, headers=headers, timeout=_TIMEOUT)

    def _received(self) -> int | None:
        """Bytes the server holds, or None when the upload is already finalized."""
        response = self._put({"Content-Range": "bytes */*"})
        if response.status_code in (200, 201):
            return None
        if response.status_code != 308:
            raise _HTTPStatus(response.status_code, response.text)
        confirmed = response.headers.get("Range")
        return int(confirmed.rsplit("-", 1)[1]) + 1 if confirmed else 0

    def upload_part(self, index: int, offset: int, data: bytes, last: bool) -> int:
        start = offset
        if self.uncertain:  # an earlier attempt failed somewhere: ask where the server is
            received = self._received()
            if received is None:
                self.finalized, self.uncertain = True, False
                return index
            if not offset <= received <= offset + len(data):
                raise StoreError(
                    f"The resumable upload to {self.store.url} lost its place (server has {received} bytes, "
                    f"part starts at {offset})",
                    "Write the object again",
                )
            start = received
        end = offset + len(data)  # exclusive
        self.uncertain = True
        while True:
            body = data[start - offset:] if start > offset else data
            if not body:
                headers = {"Content-Range": f"bytes */{end}"}
            else:
                headers = {"Content-Range": f"bytes {start}-{end - 1}/{end if last else '*'}"}
            response = self._put(headers, body)
            if response.status_code in (200, 201):
                if not last:
                    raise _HTTPStatus(response.status_code, "upload finalized before its last chunk")
                self.finalized = True
                break
            if response.status_code != 308:
                raise _HTTPStatus(response.status_code, response.text)
            confirmed = response.headers.get("Range")
            received = int(confirmed.rsplit("-", 1)[1]) + 1 if confirmed else 0
            if received >= end and not last:
                break
            if received < start:
                raise StoreError(
                    f"The resumable upload to {self.store.url} went backwards (server has {received} bytes)",
                    "Write the object again",
                )
            start = received  # the server kept only part of the chunk: send the rest
        self.uncertain = False
        return index

    def commit(self, tokens: list[Any], metadata: dict[str, str]) -> datetime | None:
        store = self.store
        if not self.finalized:  # the stream ended exactly on a chunk boundary
            response = self._put({"Content-Range": f"bytes */{metadata[SIZE_KEY]}"})
            if response.status_code not in (200, 201):
                raise _HTTPStatus(response.status_code, response.text)
            self.finalized = True
        final = store._bucket.blob(self.final)
        if not self.composed:
            final.metadata = metadata
            final.content_type = CONTENT_TYPE
            final.compose([self.temp], retry=None, timeout=_TIMEOUT)
            self.composed = True
        try:
            self.temp.delete(retry=None, timeout=_TIMEOUT)
        except store._api.NotFound:
            pass
        return final.updated

    def abort(self) -> None:
        try:
            if not self.finalized:
                self.store._http.delete(self.session_url, timeout=_TIMEOUT)  # cancels the session
        except Exception:
            pass
        try:
            self.store._call("clean up an upload", lambda: self.temp.delete(retry=None, timeout=_TIMEOUT))
        except Exception:
            pass  # never created, or already gone


# ---- the backend ----------------------------------------------------------------------------


BACKEND = Backend(
    name="gs",
    schemes=("gs",),
    example="gs://bucket/prefix",
    open=bucket_opener(GCSObjectStore),
    sdk="google-cloud-storage",
    extra="gcs",
    artifact_uri=mlflow_artifacts_beside,
    container=Container(
        "bucket", re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
        "Bucket names are 3-63 lowercase letters, digits and '-' (and '.', '_')",
    ),
    credentials="GOOGLE_APPLICATION_CREDENTIALS",
    # The SDK reads GOOGLE_APPLICATION_CREDENTIALS itself; the emulator's address is ours to pass.
    environment={"emulator_host": "STORAGE_EMULATOR_HOST"},
    resource_options={"gcs_project": "project", "gcs_endpoint_url": "endpoint_url"},
)
