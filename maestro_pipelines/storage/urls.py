"""Store URLs: parse them, explain what is wrong with them, and open the store they name.

    file:///abs/path   (or a plain path)    the local folder store
    s3://bucket/prefix                      Amazon S3 or an S3-compatible server
    gs://bucket/prefix                      Google Cloud Storage
    az://container/prefix                   Azure Blob Storage (connection string separately)

and whatever other backend is registered (`backends.py`). The checks every URL gets are
here; each backend checks the rest of its own form. Only the backend's SDK is imported, and
only when a store is opened, so parsing a URL costs nothing and a missing SDK is reported
as the pip extra to install.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from maestro_pipelines.storage.backends import (
    Backend,
    StoreLocation,
    backend_for_scheme,
    options_from_environment,
    registered_backends,
)
from maestro_pipelines.storage.base import DEFAULT_SOURCE, InvalidStoreURL, ObjectStore
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage.local import WINDOWS_PATH

STORE_URL_VARIABLE = "MAESTRO_STORE_URL"

__all__ = ["StoreLocation", "backend_for", "default_store_url", "open_configured_store", "open_store",
           "parse_store_url", "artifact_uri_for"]


def _forms() -> str:
    return ", ".join(backend.example for backend in registered_backends())


def printable_store_url(raw: str) -> str:
    """The URL as it may appear in a message: user:password@ removed, query dropped."""
    return re.sub(r"//[^/@]*@", "//…@", raw.split("?", 1)[0])


def _credential_sources() -> str:
    return ", ".join(backend.credentials for backend in registered_backends() if backend.credentials)


def parse_store_url(raw: str, source: str = DEFAULT_SOURCE) -> StoreLocation:
    """Parse a store URL; a malformed one raises one clear InvalidStoreURL naming `source`."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidStoreURL(f"{source} is empty", f"Set it to a store URL: {_forms()}")
    text = raw.strip()
    shown = printable_store_url(text)

    def bad(problem: str, hint: str | None = None) -> InvalidStoreURL:
        return InvalidStoreURL(f"{source} ({shown}) {problem}", hint or f"Write it as one of {_forms()}")

    if "://" not in text:
        if ":" in text.split("/", 1)[0] and not WINDOWS_PATH.match(text):
            raise bad("is not a URL (write scheme://...)")
        text = Path(text).expanduser().resolve().as_uri()  # a plain path: the local folder store
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme or not re.match(r"^[a-z][a-z0-9+.-]*$", scheme):
        raise bad("has no valid scheme before '://'")
    backend = backend_for_scheme(scheme)
    if backend is None:
        supported = ", ".join(f"{s}://" for b in registered_backends() for s in b.schemes)
        raise bad(f"uses the unknown scheme '{scheme}://'", f"Supported schemes: {supported} (e.g. {_forms()})")
    if parts.query or parts.fragment:
        raise bad("has a '?query' or '#fragment'", "Remove it: options are not passed in the URL")
    if "@" in parts.netloc:
        raise bad(
            "contains credentials",
            f"Remove them from the URL; give credentials through the environment ({_credential_sources()})",
        )
    return backend.parse(backend, scheme, parts, bad)


def backend_for(url: str, source: str = DEFAULT_SOURCE) -> Backend:
    """The backend of the store `url` names (the URL checked as `parse_store_url` does)."""
    return parse_store_url(url, source).backend


def open_store(
    url: str, source: str = DEFAULT_SOURCE, *, environment: Mapping[str, str] | None = None, **options
) -> ObjectStore:
    """The store `url` names. `source` names where the URL came from (an environment
    variable), for messages. `environment` holds the values of the variables backends take
    defaults from (`Settings.store_environment`); nothing here reads the process environment.
    Options go to the backend (None ones are dropped):

    - file: `create` (make the folder if missing; default False), `retry`.
    - s3: `client` (a boto3 S3 client, e.g. from dagster-aws's S3Resource), or `region_name`,
      `endpoint_url`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
      `profile_name`, `use_ssl`, `verify`; `retry`, `part_concurrency`, `list_page_size`.
    - gs: `client`, or `project`, `endpoint_url`, `emulator_host` (STORAGE_EMULATOR_HOST),
      `anonymous`; `retry`, `list_page_size`.
    - az: `connection_string` (AZURE_STORAGE_CONNECTION_STRING); `retry`, `part_concurrency`,
      `list_page_size`.
    """
    location = parse_store_url(url, source)
    backend = location.backend
    return backend.open(location, source, **options_from_environment(backend, options, environment or {}))


def default_store_url(home: str | os.PathLike) -> str:
    """The store when MAESTRO_STORE_URL is unset: the folder `store` in MAESTRO_HOME."""
    return (Path(home).expanduser().resolve() / "store").as_uri()


def open_configured_store(
    store_url: str | None, home: str | os.PathLike, environment: Mapping[str, str], *, keyring=None, **options
) -> ObjectStore:
    """The configured store, for the CLI, ObjectStoreResource and whatever else opens "the"
    store: MAESTRO_STORE_URL's, or with none the folder `store` in `home`, created on first
    write. Values as in Settings (`store_url`, `home`, `store_environment`); `keyring`: the
    backup keys (`crypto.keyring_from_settings`) the backup library seals with."""
    if not store_url:
        store = open_store(default_store_url(home), f"{STORE_URL_VARIABLE} (default)", create=True, **options)
    else:
        store = open_store(store_url, STORE_URL_VARIABLE, environment=environment, **options)
    store.keyring = keyring
    return store


def artifact_uri_for(store_url: str, environment: Mapping[str, str], source: str = STORE_URL_VARIABLE) -> str:
    """MLflow's artifact root for the store at `store_url`: its backend's `artifact_uri`."""
    location = parse_store_url(store_url, source)
    if location.backend.artifact_uri is None:
        raise MaestroError(
            f"the {location.backend.name} store ({source}) has no MLflow artifact location: MLflow cannot "
            "write models into it",
            "Give its backend an artifact_uri (docs/architecture.md, \"How to add ...\"), or set the "
            "MLflow resource's artifact_root to a file://, s3:// or gs:// URI",
        )
    return location.backend.artifact_uri(location, environment)
