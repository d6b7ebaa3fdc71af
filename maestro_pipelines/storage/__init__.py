"""One streaming object-store interface over a local folder, S3, GCS and Azure Blob.

    from maestro_pipelines.storage import open_store

    store = open_store("s3://backups/maestro")          # or file:///..., gs://..., az://...
    info = store.put_stream("db/2026-01-01.dump", chunks)   # sha256 recorded while streaming
    with store.open_read("db/2026-01-01.dump") as reader:  # verified when the last byte is read
        ...

A library: no Dagster import (the backup/restore CLI uses it while the orchestrator is
down), and no cloud SDK import until a store of that kind is opened. Each kind of store is
a backend declared once in its own module (`backends.py` says how to add one).
`maestro_pipelines.resources.object_store.ObjectStoreResource` wraps it for Dagster.
"""

from maestro_pipelines.storage.base import (
    CHUNK_SIZE,
    ChecksumMismatch,
    ChecksumMissing,
    InvalidKey,
    InvalidStoreURL,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RetryPolicy,
    StoreAccessDenied,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from maestro_pipelines.storage.backends import Backend, StoreLocation, register
from maestro_pipelines.storage.urls import open_configured_store, open_store, parse_store_url

__all__ = [
    "Backend",
    "CHUNK_SIZE",
    "ChecksumMismatch",
    "ChecksumMissing",
    "InvalidKey",
    "InvalidStoreURL",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "RetryPolicy",
    "StoreAccessDenied",
    "StoreError",
    "StoreLocation",
    "StoreNotFound",
    "StoreUnavailable",
    "open_configured_store",
    "open_store",
    "parse_store_url",
    "register",
]
