"""`MLflowRegistry`: the MLflow tracking server and model registry as a Dagster resource."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from maestro_pipelines.resources.secret_fields import SECRET_FIELD
from maestro_pipelines.settings import DEFAULT_HOME, Settings

if TYPE_CHECKING:
    from maestro_pipelines.ml.registry import ModelRegistry
    from maestro_pipelines.platform_db.location import DatabaseLocation


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
            from maestro_pipelines.resources.platform_database import locate_configured_database
            from maestro_pipelines.settings import read_store_environment
            from maestro_pipelines.storage.urls import artifact_uri_for, default_store_url

            tracking_uri = self.tracking_uri or mlflow_database_uri(locate_configured_database(self.home, self.database_url))
            artifact_root = self.artifact_root or artifact_uri_for(
                self.store_url or default_store_url(self.home), read_store_environment()
            )
            self._registry = ModelRegistry(tracking_uri, artifact_root)
        return self._registry


def mlflow_database_uri(location: "DatabaseLocation") -> str:
    """MLflow's backend: a database next to the platform database, created when missing."""
    from maestro_pipelines.platform_db.connection import ensure_database

    name = location.mlflow_database
    ensure_database(location.admin_url, name, location.source)
    return location.url_for(name).render_as_string(hide_password=False)


def embedded_tracking_uri(settings: Settings) -> str:
    """MLflow's backend for `settings` when MLFLOW_TRACKING_URI is unset (`mlflow_database_uri`)."""
    from maestro_pipelines.platform_db import locate_platform_database

    return mlflow_database_uri(locate_platform_database(settings))


def artifact_root_for(settings: Settings) -> str:
    """MLflow's artifact URI for the configured object store (its backend's `artifact_uri`)."""
    from maestro_pipelines.storage.urls import artifact_uri_for

    return artifact_uri_for(settings.effective_store_url, settings.store_environment)
