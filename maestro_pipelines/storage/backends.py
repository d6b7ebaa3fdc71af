"""The store backends, each declared once, and the registry that finds one by URL scheme.

A backend is one `Backend` value, `BACKEND`, in its own module: the URL schemes it serves,
the pip extra its SDK comes with, how its URLs are checked, the environment variables it
takes options from, MLflow's artifact URI for one of its stores, and how to open one.
Maestro's own are listed in `BUILT_IN`; another package adds one with an entry point in the
group `maestro_pipelines.storage.backends` naming its Backend (pyproject.toml):

    [project.entry-points."maestro_pipelines.storage.backends"]
    mystore = "mypackage.mystore:BACKEND"

`urls.py` (parse and open a URL), `ObjectStoreResource`, MLflow's artifact root and
`environment.py` all ask this registry; nothing else knows a scheme. Importing this module
imports no backend; the first lookup imports them all, and still no SDK (a backend imports
its SDK when a store is opened, and reports a missing one with `missing_sdk`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import SplitResult, unquote

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage.base import InvalidStoreURL, ObjectStore

ENTRY_POINT_GROUP = "maestro_pipelines.storage.backends"
BUILT_IN = (
    "maestro_pipelines.storage.local:BACKEND",
    "maestro_pipelines.storage.s3:BACKEND",
    "maestro_pipelines.storage.gcs:BACKEND",
    "maestro_pipelines.storage.azure:BACKEND",
)
"""Maestro's own backends, in the order messages list them."""

BadURL = Callable[..., InvalidStoreURL]
"""bad(problem, hint=None) -> the one-line error naming the URL and where it came from."""


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL: `scheme`, `bucket` (bucket or container; for file the absolute
    folder) and `prefix` (no leading or trailing '/')."""

    scheme: str
    bucket: str
    prefix: str = ""

    @property
    def backend(self) -> "Backend":
        return backend_for_scheme(self.scheme)

    @property
    def url(self) -> str:
        """The URL in its one canonical form, as messages and manifests show it."""
        return self.backend.url_of(self)


def prefixed_url(location: StoreLocation) -> str:
    return f"{location.scheme}://{location.bucket}/{location.prefix}".rstrip("/")


def mlflow_artifacts_beside(location: StoreLocation, environment: Mapping[str, str]) -> str:
    """The default artifact URI: the folder `mlflow-artifacts` of the store, for backends whose
    URL MLflow reads as it is (file://, s3://, gs://)."""
    return f"{location.url}/mlflow-artifacts"


def bucket_opener(store_class: Callable[..., ObjectStore]) -> Callable[..., ObjectStore]:
    """The `open` of a backend whose store takes (bucket, prefix, source=..., **options)."""

    def open_bucket(location: StoreLocation, source: str, **options: Any) -> ObjectStore:
        return store_class(location.bucket, location.prefix, source=source, **options)

    return open_bucket


@dataclass(frozen=True)
class Container:
    """The bucket (or container) rule of a `scheme://bucket/prefix` URL."""

    word: str
    """'bucket' or 'container', as messages say it."""
    pattern: re.Pattern
    rule: str
    """The hint when a name breaks it: "Bucket names are 3-63 lowercase letters, ..."."""


def parse_bucket_url(backend: "Backend", scheme: str, parts: SplitResult, bad: BadURL) -> StoreLocation:
    """`scheme://bucket/prefix` by the backend's `container` rule."""
    word = backend.container.word
    bucket = parts.netloc
    if not bucket:
        raise bad(f"names no {word}", f"Write it as {backend.example}")
    if not backend.container.pattern.match(bucket):
        raise bad(f"names the {word} '{bucket}', which is not a valid {word} name", backend.container.rule)
    prefix = unquote(parts.path).strip("/")
    if prefix:
        segments = prefix.split("/")
        if any(s in ("", ".", "..") for s in segments) or re.search(r"[\x00-\x1f\x7f]", prefix):
            raise bad("has an empty, '.' or '..' segment or a control character in its prefix")
    return StoreLocation(scheme, bucket, prefix)


@dataclass(frozen=True, eq=False)
class Backend:
    """Everything Maestro knows about one kind of store; see the module docstring."""

    name: str
    """Short name, for messages and the registry: 's3'."""
    schemes: tuple[str, ...]
    """URL schemes it serves, lowercase, without '://'."""
    example: str
    """The URL form messages show: 's3://bucket/prefix'."""
    open: Callable[..., ObjectStore]
    """open(location, source, **options) -> the store. Imports the SDK; raises `missing_sdk`
    when it is not installed. Options are the caller's, then the `environment` defaults."""
    sdk: str | None = None
    """The Python package (distribution) its SDK is, as `missing_sdk` names it: 'boto3'."""
    extra: str | None = None
    """The pip extra that installs its SDK: pip install 'maestro-pipelines[EXTRA]'."""
    container: Container | None = None
    """For `scheme://bucket/prefix` URLs: the bucket rule (see parse_bucket_url)."""
    parse: Callable[["Backend", str, SplitResult, BadURL], StoreLocation] = parse_bucket_url
    """parse(backend, scheme, parts, bad) -> the location, after the checks every URL gets
    (scheme known, no query, no credentials)."""
    url_of: Callable[[StoreLocation], str] = prefixed_url
    """url_of(location) -> the canonical URL (default scheme://bucket/prefix)."""
    credentials: str = ""
    """Where its credentials come from instead of the URL, for that message: 'AWS_* variables'."""
    environment: Mapping[str, str] = field(default_factory=dict)
    """open option -> the environment variable it defaults from (read by settings.py only)."""
    resource_options: Mapping[str, str] = field(default_factory=dict)
    """ObjectStoreResource field -> the open option it feeds. A credential field whose option
    has an `environment` variable is passed to the resource as dg.EnvVar of that variable."""
    artifact_uri: Callable[[StoreLocation, Mapping[str, str]], str] | None = None
    """artifact_uri(location, environment) -> MLflow's artifact root for a store there (models,
    pictures). None: MLflow has no artifact repository for this scheme, and training refuses
    with one line instead of failing in MLflow; `mlflow_artifacts_beside` for a URL MLflow reads
    as it is (file://, s3://, gs://)."""


_backends: list[Backend] = []
"""In registration order: built-in ones first, as messages list them."""
_by_scheme: dict[str, Backend] = {}
_loaded: set[str] = set()
"""The BUILT_IN and entry-point references imported so far."""


def register(backend: Backend) -> Backend:
    """Make `backend` answer for its schemes. Registering the same backend again is a no-op;
    a second backend claiming a scheme is refused."""
    if backend.parse is parse_bucket_url and backend.container is None:
        raise MaestroError(f"The store backend {backend.name} declares neither a container rule nor a parser",
                           "Give it container=Container(...) for scheme://bucket/prefix URLs, or parse=...")
    for scheme in backend.schemes:
        existing = _by_scheme.get(scheme)
        if existing is not None and existing is not backend:
            raise MaestroError(
                f"Two store backends claim the scheme '{scheme}://': {existing.name} and {backend.name}",
                "Uninstall one of the packages providing them, or give the new backend another scheme",
            )
    if backend not in _backends:
        _backends.append(backend)
    for scheme in backend.schemes:
        _by_scheme[scheme] = backend
    return backend


def _load(reference: str, what: str) -> Backend:
    module_name, _, attribute = reference.partition(":")
    try:
        backend = getattr(importlib.import_module(module_name), attribute or "BACKEND")
    except (ImportError, AttributeError) as exc:
        raise MaestroError(
            f"The store backend {what} ({reference}) cannot be loaded: {type(exc).__name__}: {exc}",
            "Reinstall the package that provides it, or uninstall it",
        ) from None
    if not isinstance(backend, Backend):
        raise MaestroError(f"The store backend {what} ({reference}) is not a Backend",
                           "Point the entry point at the module's Backend value, e.g. mypackage.mystore:BACKEND")
    return backend


def _load_backends() -> None:
    """Import the built-in backends once, and any entry point not seen yet (installed since)."""
    for reference in BUILT_IN:
        if reference not in _loaded:
            register(_load(reference, "built in"))
            _loaded.add(reference)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.value not in _loaded:
            register(_load(point.value, f"'{point.name}'"))
            _loaded.add(point.value)


def registered_backends() -> list[Backend]:
    """Every backend, built-in ones first, each once."""
    _load_backends()
    return list(_backends)


def backend_for_scheme(scheme: str) -> Backend | None:
    """The backend serving `scheme` (lowercase, no '://'), or None."""
    if scheme not in _by_scheme:
        _load_backends()
    return _by_scheme.get(scheme)


def environment_variables() -> tuple[str, ...]:
    """The variables backends take options from: what settings.py reads for them."""
    names = (variable for backend in registered_backends() for variable in backend.environment.values())
    return tuple(dict.fromkeys(names))


def missing_sdk(scheme: str, url: str, source: str, package: str | None = None) -> InvalidStoreURL:
    """The one-line error for a store whose SDK (the backend's `sdk`, or `package`) is not
    installed: which extra to install."""
    backend = backend_for_scheme(scheme)
    package = package or (backend.sdk if backend is not None else None) or "its SDK"
    extra = backend.extra if backend is not None and backend.extra else None
    return InvalidStoreURL(
        f"{source} ({url}) needs the Python package {package}, which is not installed",
        f"Install it: pip install 'maestro-pipelines[{extra}]'" if extra else f"Install it: pip install {package}",
    )


def options_from_environment(backend: Backend, options: Mapping[str, Any], environment: Mapping[str, str]) -> dict:
    """`options` without the None ones, completed by the backend's `environment` defaults."""
    merged = {name: value for name, value in options.items() if value is not None}
    for option, variable in backend.environment.items():
        if environment.get(variable):
            merged.setdefault(option, environment[variable])
    return merged
