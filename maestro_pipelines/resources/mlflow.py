"""`MLflowRegistry`: the MLflow tracking server and model registry as a Dagster resource."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from maestro_pipelines.resources.secret_fields import SECRET_FIELD
from maestro_pipelines.settings import DEFAULT_HOME, Settings

if TYPE_CHECKING:
    from maestro_pipelines.ml.registry import ModelRegistry


class MLflowRegistry(dg.ConfigurableResource):
    """MLflow tracking and registry.

    With no `tracking_uri`, MLflow's backend store is a database beside the platform
    database (`maestro_mlflow` on the embedded server) and artifacts go to the object store.
    """

    tracking_uri: Optional[str] = Field(
        default=None,
        description=(
            "MLflow tracking/registry URI (an http(s) server or a SQLAlchemy database URL), from "
            "MLFLOW_TRACKING_URI. Empty: a database next to the platform database."
        ),
        json_schema_extra=SECRET_FIELD,
    )
    artifact_root: Optional[str] = Field(
        default=None,
        description=(
            "Where new experiments keep artifacts (models, pictures): file://, s3://, gs:// URI. "
            "Empty: the `mlflow-artifacts` folder of the object store (MAESTRO_STORE_URL)."
        ),
    )
    database_url: Optional[str] = Field(
        default=None,
        description="MAESTRO_DATABASE_URL, to place MLflow's database next to the platform's. Empty: embedded.",
        json_schema_extra=SECRET_FIELD,
    )
    home: str = Field(default=DEFAULT_HOME, description="MAESTRO_HOME (embedded server data, local store).")
    store_url: Optional[str] = Field(default=None, description="MAESTRO_STORE_URL, for the default artifact root.")

    _registry: Optional["ModelRegistry"] = PrivateAttr(default=None)

    def registry(self) -> "ModelRegistry":
        if self._registry is None:
            from maestro_pipelines.ml.registry import ModelRegistry

            settings = Settings(
                home=Path(self.home).expanduser().resolve(),
                database_url=self.database_url or None,
                store_url=self.store_url or None,
            )
            tracking_uri = self.tracking_uri or embedded_tracking_uri(settings)
            self._registry = ModelRegistry(tracking_uri, self.artifact_root or artifact_root_for(settings))
        return self._registry


def embedded_tracking_uri(settings: Settings) -> str:
    """MLflow's backend: a database next to the platform database, created when missing."""
    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.platform_db.connection import ensure_database

    location = locate_platform_database(settings)
    name = location.mlflow_database
    ensure_database(location.admin_url, name, location.source)
    return location.url_for(name).render_as_string(hide_password=False)


def artifact_root_for(settings: Settings) -> str:
    """MLflow's artifact URI for the configured object store."""
    store = settings.effective_store_url.rstrip("/")
    if store.startswith(("file://", "s3://", "gs://")):
        return f"{store}/mlflow-artifacts"
    if store.startswith("az://"):
        return _azure_artifact_root(store)
    return f"{Path(store).resolve().as_uri()}/mlflow-artifacts"


def _azure_artifact_root(store: str) -> str:
    """az://container/prefix -> wasbs://container@ACCOUNT.blob.SUFFIX/prefix/mlflow-artifacts,
    the account (and cloud) from AZURE_STORAGE_CONNECTION_STRING, which MLflow's Azure
    artifact repository also connects with (its BlobEndpoint included, so Azurite works)."""
    import os

    from maestro_pipelines.errors import MaestroError
    from maestro_pipelines.storage.azure import CONNECTION_STRING_VARIABLE

    container, _, prefix = store[len("az://"):].partition("/")
    fields = dict(
        part.split("=", 1) for part in os.environ.get(CONNECTION_STRING_VARIABLE, "").split(";") if "=" in part
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
    path = f"{prefix.strip('/')}/mlflow-artifacts" if prefix.strip("/") else "mlflow-artifacts"
    return f"wasbs://{container}@{account}.blob.{suffix}/{path}"
