"""`ObjectStoreResource`: the object store (MAESTRO_STORE_URL) as a Dagster resource.

Importing this module imports Dagster and pydantic only; the storage library and the
cloud SDKs (dagster-aws/boto3, google-cloud-storage, azure-storage-blob) are imported by
`get_store()`, for the one backend the URL names. Which fields a backend takes is the
backend's declaration (`resource_options`, see `maestro_pipelines.storage.backends`), so a
new backend needs nothing here unless it wants a field of its own (or, as S3 with dagster-aws,
a client a Dagster integration builds). The store is opened by the function the CLI uses too
(`storage.open_configured_store`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from maestro_pipelines.resources.secret_fields import SECRET_FIELD
from maestro_pipelines.settings import DEFAULT_HOME

if TYPE_CHECKING:
    from maestro_pipelines.storage import ObjectStore

STORE_URL_VARIABLE = "MAESTRO_STORE_URL"


class ObjectStoreResource(dg.ConfigurableResource):
    """Where Maestro keeps backups, MLflow artifacts, asset values (`values/`, through the
    `io_manager`) and exports: a local folder, S3, GCS or Azure.

    Every object written records its sha256, computed while streaming, and reads verify it.
    With no `url` it is the folder `store` under `home` (created on first write).
    """

    url: Optional[str] = Field(
        default=None,
        description=(
            "Store URL from MAESTRO_STORE_URL: file:///abs/folder, s3://bucket/prefix, "
            "gs://bucket/prefix or az://container/prefix. Empty: the folder `store` under `home`."
        ),
    )
    home: str = Field(default=DEFAULT_HOME, description="MAESTRO_HOME: holds the default local store.")
    region_name: Optional[str] = Field(default=None, description="S3: AWS region (AWS_REGION if empty).")
    endpoint_url: Optional[str] = Field(
        default=None,
        description="S3: endpoint of an S3-compatible server (MinIO, Ceph). Empty: AWS_ENDPOINT_URL or AWS.",
    )
    aws_access_key_id: Optional[str] = Field(
        default=None, description="S3: access key id. Empty: the default AWS credential chain."
    )
    aws_secret_access_key: Optional[str] = Field(
        default=None,
        description="S3: secret access key, as dg.EnvVar('AWS_SECRET_ACCESS_KEY'). Empty: the default chain.",
        json_schema_extra=SECRET_FIELD,
    )
    aws_session_token: Optional[str] = Field(
        default=None, description="S3: session token for temporary credentials.", json_schema_extra=SECRET_FIELD
    )
    profile_name: Optional[str] = Field(default=None, description="S3: AWS profile (AWS_PROFILE if empty).")
    gcs_project: Optional[str] = Field(
        default=None, description="GCS: project for the client. Empty: from the credentials."
    )
    gcs_endpoint_url: Optional[str] = Field(
        default=None, description="GCS: another endpoint (an emulator). Empty: STORAGE_EMULATOR_HOST or Google."
    )
    azure_connection_string: Optional[str] = Field(
        default=None,
        description=(
            "Azure: storage account connection string, as dg.EnvVar('AZURE_STORAGE_CONNECTION_STRING'). "
            "Empty: that environment variable."
        ),
        json_schema_extra=SECRET_FIELD,
    )
    retry_attempts: int = Field(
        default=5, description="Tries per request on transient errors (network, 5xx, throttling), at least 1."
    )
    retry_backoff_s: float = Field(
        default=0.25, description="First wait between tries in seconds; doubles each time (at most 8 s)."
    )
    part_concurrency: int = Field(
        default=4, description="Upload parts (8 MiB) in flight at once; memory is about (this + 2) x 8 MiB."
    )

    _store: Optional["ObjectStore"] = PrivateAttr(default=None)

    def get_store(self) -> "ObjectStore":
        """The store, opened on first call (SDK imported then)."""
        if self._store is None:
            self._store = self._open()
        return self._store

    def _open(self) -> "ObjectStore":
        from maestro_pipelines.crypto import keyring_from_settings
        from maestro_pipelines.settings import load_settings, read_store_environment
        from maestro_pipelines.storage import RetryPolicy, open_configured_store

        retry = RetryPolicy(attempts=self.retry_attempts, backoff_s=self.retry_backoff_s)
        options = self._backend_options() if self.url else {}
        # The backup keys come from the run's environment (MAESTRO_BACKUP_KEY and the others),
        # never from the resource's config: a key typed into the Launchpad would be stored in the run.
        return open_configured_store(self.url, self.home, read_store_environment(), retry=retry,
                                     keyring=keyring_from_settings(load_settings()), **options)

    def _backend_options(self) -> dict[str, Any]:
        """The fields the URL's backend takes (its `resource_options`), as its open options."""
        from maestro_pipelines.storage.urls import backend_for

        backend = backend_for(self.url, STORE_URL_VARIABLE)
        unknown = sorted(set(backend.resource_options) - set(type(self).model_fields))
        if unknown:
            from maestro_pipelines.errors import MaestroError

            raise MaestroError(
                f"The store backend {backend.name} takes ObjectStoreResource fields it does not have: {', '.join(unknown)}",
                "Add the fields to ObjectStoreResource, or remove them from the backend's resource_options",
            )
        options = {option: getattr(self, name) for name, option in backend.resource_options.items()}
        build_client = _CLIENTS.get(backend.name)
        return build_client(self.url, options) if build_client else options


def _s3_client_through_dagster_aws(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """dagster-aws builds the boto3 client (credential chain, endpoint, SSL options); its
    retries are off (max_attempts=0) because the store retries each request."""
    from maestro_pipelines.storage.backends import missing_sdk
    from maestro_pipelines.storage.urls import parse_store_url

    try:
        from dagster_aws.s3 import S3Resource
    except ImportError:
        shown = parse_store_url(url, STORE_URL_VARIABLE).url
        raise missing_sdk("s3", shown, STORE_URL_VARIABLE, package="dagster-aws") from None
    client_fields = ("region_name", "endpoint_url", "aws_access_key_id", "aws_secret_access_key",
                     "aws_session_token", "profile_name")
    client = S3Resource(**{name: options.pop(name) for name in client_fields}, max_attempts=0).get_client()
    return {**options, "client": client}


_CLIENTS = {"s3": _s3_client_through_dagster_aws}
"""Backends whose client a Dagster integration builds, by backend name. Only here, because
the storage library never imports Dagster; any other backend gets its options as they are."""
