"""Store URLs: parse them, explain what is wrong with them, and open the store they name.

    file:///abs/path   (or a plain path)    the local folder store
    s3://bucket/prefix                      Amazon S3 or an S3-compatible server
    gs://bucket/prefix                      Google Cloud Storage
    az://container/prefix                   Azure Blob Storage (connection string separately)

Only the scheme's module is imported, and only when a store is opened, so parsing a URL
costs nothing and a missing SDK is reported as the pip extra to install.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from maestro_pipelines.storage.base import DEFAULT_SOURCE, InvalidStoreURL, ObjectStore

SCHEMES = {
    "file": "file:///absolute/folder",
    "s3": "s3://bucket/prefix",
    "gs": "gs://bucket/prefix",
    "az": "az://container/prefix",
}
EXTRAS = {"s3": "s3", "gs": "gcs", "az": "azure"}
_BUCKET = {
    "s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
    "az": re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"),
}
_CONTAINER_WORD = {"s3": "bucket", "gs": "bucket", "az": "container"}
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL: `scheme` (file, s3, gs, az), `bucket` (bucket or container; for
    file the absolute folder) and `prefix` (no leading or trailing '/')."""

    scheme: str
    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return Path(self.bucket).as_uri()
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def _forms() -> str:
    return ", ".join(SCHEMES.values())


def _redact(raw: str) -> str:
    """The URL as it may appear in a message: user:password@ removed, query dropped."""
    return re.sub(r"//[^/@]*@", "//…@", raw.split("?", 1)[0])


def parse_store_url(raw: str, source: str = DEFAULT_SOURCE) -> StoreLocation:
    """Parse a store URL; a malformed one raises one clear InvalidStoreURL naming `source`."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidStoreURL(f"{source} is empty", f"Set it to a store URL: {_forms()}")
    text = raw.strip()
    shown = _redact(text)

    def bad(problem: str, hint: str | None = None) -> InvalidStoreURL:
        return InvalidStoreURL(f"{source} ({shown}) {problem}", hint or f"Write it as one of {_forms()}")

    if "://" not in text:
        if ":" in text.split("/", 1)[0] and not _WINDOWS_PATH.match(text):
            raise bad("is not a URL (write scheme://...)")
        # A plain path: the local folder store.
        return StoreLocation("file", str(Path(text).expanduser().resolve()))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme or not re.match(r"^[a-z][a-z0-9+.-]*$", scheme):
        raise bad("has no valid scheme before '://'")
    if scheme not in SCHEMES:
        raise bad(
            f"uses the unknown scheme '{scheme}://'",
            f"Supported schemes: {', '.join(s + '://' for s in SCHEMES)} (e.g. {_forms()})",
        )
    if parts.query or parts.fragment:
        raise bad("has a '?query' or '#fragment'", "Remove it: options are not passed in the URL")
    if "@" in parts.netloc:
        raise bad(
            "contains credentials",
            "Remove them from the URL; give credentials through the environment "
            "(AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING)",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise bad(
                f"names the host '{parts.netloc}'",
                "A file URL needs three slashes and an absolute path: file:///absolute/folder",
            )
        path = unquote(parts.path)
        if not path or not os.path.isabs(path) and not _WINDOWS_PATH.match(path.lstrip("/")):
            raise bad("has no absolute path", "Write it as file:///absolute/folder")
        return StoreLocation("file", str(Path(path).resolve()))
    word = _CONTAINER_WORD[scheme]
    bucket = parts.netloc
    if not bucket:
        raise bad(f"names no {word}", f"Write it as {SCHEMES[scheme]}")
    if not _BUCKET[scheme].match(bucket):
        raise bad(
            f"names the {word} '{bucket}', which is not a valid {word} name",
            f"{word.capitalize()} names are 3-63 lowercase letters, digits and '-'"
            + (" (and '.')" if scheme == "s3" else " (and '.', '_')" if scheme == "gs" else ""),
        )
    prefix = unquote(parts.path).strip("/")
    if prefix:
        segments = prefix.split("/")
        if any(s in ("", ".", "..") for s in segments) or re.search(r"[\x00-\x1f\x7f]", prefix):
            raise bad("has an empty, '.' or '..' segment or a control character in its prefix")
    return StoreLocation(scheme, bucket, prefix)


def _store_environment(scheme: str) -> dict[str, str]:
    """Options a store takes from the environment when not given explicitly.

    The SDKs read most of their own variables (AWS_ENDPOINT_URL, AWS_* credentials,
    STORAGE_EMULATOR_HOST, GOOGLE_APPLICATION_CREDENTIALS); this is the one place the
    storage library reads any itself.
    """
    if scheme == "az":
        value = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
        return {"connection_string": value} if value else {}
    if scheme == "gs":
        value = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
        return {"emulator_host": value} if value else {}
    return {}


def open_store(url: str, source: str = DEFAULT_SOURCE, **options) -> ObjectStore:
    """The store `url` names. `source` names where the URL came from (an environment
    variable), for messages. Options go to the implementation:

    - file: `create` (make the folder if missing; default False), `retry`.
    - s3: `client` (a boto3 S3 client, e.g. from dagster-aws's S3Resource), or `region_name`,
      `endpoint_url`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
      `profile_name`, `use_ssl`, `verify`; `retry`, `part_concurrency`, `list_page_size`.
    - gs: `client`, or `project`, `endpoint_url`, `anonymous`; `retry`, `list_page_size`.
    - az: `connection_string` (default: AZURE_STORAGE_CONNECTION_STRING); `retry`,
      `part_concurrency`, `list_page_size`.
    """
    location = parse_store_url(url, source)
    options = {k: v for k, v in options.items() if v is not None}
    for name, value in _store_environment(location.scheme).items():
        options.setdefault(name, value)
    if location.scheme == "file":
        from maestro_pipelines.storage.local import LocalObjectStore

        return LocalObjectStore(location.bucket, source=source, **options)
    if location.scheme == "s3":
        from maestro_pipelines.storage.s3 import S3ObjectStore

        return S3ObjectStore(location.bucket, location.prefix, source=source, **options)
    if location.scheme == "gs":
        from maestro_pipelines.storage.gcs import GCSObjectStore

        return GCSObjectStore(location.bucket, location.prefix, source=source, **options)
    from maestro_pipelines.storage.azure import AzureObjectStore

    return AzureObjectStore(location.bucket, location.prefix, source=source, **options)


def missing_sdk(scheme: str, package: str, url: str, source: str) -> InvalidStoreURL:
    extra = EXTRAS[scheme]
    return InvalidStoreURL(
        f"{source} ({url}) needs the Python package {package}, which is not installed",
        f"Install it: pip install 'maestro-pipelines[{extra}]'",
    )
