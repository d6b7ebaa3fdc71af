"""Azure Blob Storage: `az://container/prefix`, with a connection string (option
`connection_string`, or AZURE_STORAGE_CONNECTION_STRING).

**How sha256 is recorded, atomically.** A block blob is built from staged blocks and
becomes visible only when its block list is committed, and Put Block List takes the
blob's metadata. So:

- an object that fits in one 8 MiB block is hashed first and sent with one Put Blob that
  carries `sha256` and `size`: atomic;
- a bigger one is staged block by block (8 MiB, a few in flight, hashed in order as read)
  and committed with one Put Block List whose metadata holds `sha256` and `size`: the blob
  and its checksum appear together, and an existing good blob stays until the commit.

Staged blocks of an upload that fails are not visible (not listed, not readable) and cannot
be deleted through the API: Azure discards uncommitted blocks after a week. Block ids are
unique per upload, so an abandoned upload never mixes with another.

The SDK's own retries are off (`retry_total=0`) so that `RetryPolicy` bounds every request;
one exception: the SDK's downloader re-fetches a chunk whose body was cut short (up to 3
times) before the store's own resume-from-offset takes over.
"""

from __future__ import annotations

import base64
import io
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage.backends import Backend, Container, StoreLocation, bucket_opener, missing_sdk
from maestro_pipelines.storage.base import (
    CHUNK_SIZE,
    DEFAULT_SOURCE,
    TRANSIENT,
    InvalidStoreURL,
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
CONNECTION_STRING_VARIABLE = "AZURE_STORAGE_CONNECTION_STRING"
_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}
_CREDENTIALS_HINT = (
    f"Check the account name and key (or SAS) in {CONNECTION_STRING_VARIABLE} and that they may "
    "read, write and list this container"
)


class AzureObjectStore(PrefixedStore):
    scheme = "az"
    container_word = "container"
    max_parts = 50_000

    def __init__(
        self,
        container: str,
        prefix: str = "",
        source: str = DEFAULT_SOURCE,
        *,
        connection_string: str | None = None,
        retry: RetryPolicy | None = None,
        part_concurrency: int = 4,
        list_page_size: int = 1000,
    ):
        super().__init__("az", container, prefix, source, retry)
        try:
            import azure.core.exceptions as azure_exceptions
            from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings
        except ImportError:
            raise missing_sdk("az", self.url, source) from None
        self._exc = azure_exceptions
        self._BlobBlock = BlobBlock
        self._content = ContentSettings(content_type=CONTENT_TYPE)
        self.part_concurrency = part_concurrency
        self.list_page_size = list_page_size
        if not connection_string:
            raise InvalidStoreURL(
                f"{source} ({self.url}) needs an Azure Storage connection string, and none is set",
                f"Set {CONNECTION_STRING_VARIABLE} (Azure portal: storage account > Access keys)",
            )
        try:
            service = BlobServiceClient.from_connection_string(
                connection_string,
                retry_total=0,
                max_single_put_size=CHUNK_SIZE,
                max_block_size=CHUNK_SIZE,
                max_single_get_size=CHUNK_SIZE,
                max_chunk_get_size=CHUNK_SIZE,
                connection_timeout=10,
                read_timeout=120,
            )
        except (ValueError, TypeError, KeyError):
            # Never echo the string: it holds the account key.
            raise InvalidStoreURL(
                f"The Azure connection string for {source} ({self.url}) is not valid",
                f"Copy it again into {CONNECTION_STRING_VARIABLE}: "
                "DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...;EndpointSuffix=core.windows.net",
            ) from None
        self.service = service
        self.container = service.get_container_client(container)

    # ---- errors --------------------------------------------------------------------------

    @staticmethod
    def _code(exc: BaseException) -> str:
        code = getattr(exc, "error_code", None)
        return str(getattr(code, "value", code) or "")

    def classify(self, exc: BaseException) -> str | None:
        e = self._exc
        if isinstance(exc, (e.ServiceRequestError, e.ServiceResponseError, e.IncompleteReadError)):
            return TRANSIENT
        if isinstance(exc, e.HttpResponseError):
            status = exc.status_code or 0
            if status >= 500 or status in (408, 429) or self._code(exc) in _TRANSIENT_CODES:
                return TRANSIENT
            return None
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return TRANSIENT
        return None

    def _container_missing(self) -> bool:
        try:
            return not self.container.exists()
        except Exception:
            return False

    def translate(self, exc: BaseException, key: str | None, action: str) -> BaseException:
        e = self._exc
        if isinstance(exc, e.ClientAuthenticationError) or (
            isinstance(exc, e.HttpResponseError) and exc.status_code in (401, 403)
        ):
            return self.access_denied(action, self._code(exc) or str(exc.status_code), _CREDENTIALS_HINT)
        if isinstance(exc, e.ResourceNotFoundError):
            code = self._code(exc)
            if code == "ContainerNotFound" or (code != "BlobNotFound" and self._container_missing()):
                return self.missing_container()
            if key:
                return self.not_found(key)
        if isinstance(exc, e.ResourceModifiedError) or (
            isinstance(exc, e.HttpResponseError) and exc.status_code == 412
        ):
            return ObjectChanged(
                f"Object {key!r} at {self.source} ({self.url}) was replaced while being read", "Read it again"
            )
        if isinstance(exc, e.AzureError):
            return StoreError(
                f"Azure refused to {action} at {self.source} ({self.url}): "
                f"{self._code(exc) or short_cause(exc)}",
                "Check the container's configuration and the endpoint in the connection string",
            )
        return exc

    # ---- objects -------------------------------------------------------------------------

    def _blob(self, key: str) -> Any:
        return self.container.get_blob_client(self._name(key))

    def _info(self, key: str, properties: Any) -> ObjectInfo:
        sha, _size, user = split_metadata(properties.metadata)
        return ObjectInfo(key, int(properties.size or 0), sha, properties.last_modified, user)

    def _put_single(self, key: str, data: bytes, metadata: dict[str, str]) -> datetime | None:
        response = self._blob(key).upload_blob(
            data, length=len(data), overwrite=True, metadata=metadata, content_settings=self._content,
            max_concurrency=1,
        )
        return response.get("last_modified")

    def _begin_upload(self, key: str, metadata: dict[str, str]) -> PartUpload:
        return _AzureUpload(self, self._blob(key))

    def _open(self, key: str):
        blob = self._blob(key)
        downloader = blob.download_blob(max_concurrency=1)
        info = self._info(key, downloader.properties)
        etag = downloader.properties.etag

        def reopen(offset: int):
            if offset >= info.size:
                return io.BytesIO(b"")
            from azure.core import MatchConditions

            return blob.download_blob(
                offset=offset, max_concurrency=1, etag=etag, match_condition=MatchConditions.IfNotModified
            )

        return info, downloader, reopen

    def head(self, key: str) -> ObjectInfo:
        key = self._key(key)
        properties = self._call("look up an object", lambda: self._blob(key).get_blob_properties(), key)
        return self._info(key, properties)

    def list(self, prefix: str = "", *, with_metadata: bool = True) -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix, self.url, self.source)
        full = self._name(prefix) if prefix else self._base
        token = None
        while True:
            def page(token=token):
                pages = self.container.list_blobs(
                    name_starts_with=full or None,
                    include=["metadata"] if with_metadata else None,
                    results_per_page=self.list_page_size,
                ).by_page(continuation_token=token)
                return list(next(pages)), pages.continuation_token

            blobs, token = self._call("list objects", page)
            for properties in blobs:
                key = self._key_of(properties.name)
                if key is None:
                    continue
                info = self._info(key, properties)
                yield info if with_metadata else ObjectInfo(key, info.size, None, info.last_modified, {})
            if not token:
                return

    def delete(self, key: str) -> None:
        key = self._key(key)
        try:
            self._call("delete", lambda: self._blob(key).delete_blob(delete_snapshots="include"), key)
        except ObjectNotFound:
            pass  # deleting what is not there is fine

    def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        source_key = self._key(source_key)
        dest_key = self._key(dest_key)
        self.head(source_key)  # ObjectNotFound names the source key
        source, dest = self._blob(source_key), self._blob(dest_key)
        # Copy Blob within the account (authorised by the same shared key) keeps the metadata.
        result = self._call("copy", lambda: dest.start_copy_from_url(source.url), dest_key)
        status = result.get("copy_status")
        waited = 0
        while status == "pending":  # large copies finish asynchronously on the server
            time.sleep(min(2.0, 0.05 * 2**waited))
            waited += 1
            properties = self._call("copy", dest.get_blob_properties, dest_key)
            status = properties.copy.status
        if status != "success":
            raise StoreError(
                f"Azure could not copy {source_key!r} to {dest_key!r} at {self.source} ({self.url}): {status}",
                "Retry the copy",
            )
        return self.head(dest_key)


class _AzureUpload(PartUpload):
    def __init__(self, store: AzureObjectStore, blob: Any):
        self.store = store
        self.blob = blob
        self.upload_id = uuid.uuid4().hex  # block ids: unique per upload, all the same length

    def _block_id(self, index: int) -> str:
        return base64.b64encode(f"{self.upload_id}-{index:06d}".encode()).decode()

    def upload_part(self, index: int, offset: int, data: bytes, last: bool) -> str:
        block_id = self._block_id(index)
        self.blob.stage_block(block_id, data, length=len(data))
        return block_id

    def commit(self, tokens: list[Any], metadata: dict[str, str]) -> datetime | None:
        store = self.store
        response = self.blob.commit_block_list(
            [store._BlobBlock(block_id=block_id) for block_id in tokens],
            metadata=metadata,
            content_settings=store._content,
        )
        return response.get("last_modified")

    def abort(self) -> None:
        pass  # uncommitted blocks are invisible and expire on their own (see the module docstring)


# ---- the backend ----------------------------------------------------------------------------


def mlflow_artifact_uri(location: StoreLocation, environment: Mapping[str, str]) -> str:
    """az://container/prefix -> wasbs://container@ACCOUNT.blob.SUFFIX/prefix/mlflow-artifacts,
    the account (and cloud) from AZURE_STORAGE_CONNECTION_STRING, which MLflow's Azure
    artifact repository also connects with (its BlobEndpoint included, so Azurite works)."""
    fields = dict(
        part.split("=", 1) for part in environment.get(CONNECTION_STRING_VARIABLE, "").split(";") if "=" in part
    )
    account = fields.get("AccountName", "").strip()
    if not account:
        raise MaestroError(
            f"MLflow's artifact location for the az:// MAESTRO_STORE_URL needs the storage account, and "
            f"{CONNECTION_STRING_VARIABLE} names none",
            f"Set {CONNECTION_STRING_VARIABLE} (AccountName=...;AccountKey=...), or give the MLflowRegistry "
            "artifact_root as wasbs://CONTAINER@ACCOUNT.blob.core.windows.net/PATH",
        )
    suffix = fields.get("EndpointSuffix", "core.windows.net").strip()
    path = f"{location.prefix}/mlflow-artifacts" if location.prefix else "mlflow-artifacts"
    return f"wasbs://{location.bucket}@{account}.blob.{suffix}/{path}"


BACKEND = Backend(
    name="az",
    schemes=("az",),
    example="az://container/prefix",
    open=bucket_opener(AzureObjectStore),
    sdk="azure-storage-blob",
    extra="azure",
    container=Container(
        "container", re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"),
        "Container names are 3-63 lowercase letters, digits and '-'",
    ),
    credentials=CONNECTION_STRING_VARIABLE,
    environment={"connection_string": CONNECTION_STRING_VARIABLE},
    resource_options={"azure_connection_string": "connection_string", "part_concurrency": "part_concurrency"},
    artifact_uri=mlflow_artifact_uri,
)
