"""Dagster resources: thin, typed wrappers over the Dagster-free libraries.

Which concrete resources a deployment gets is decided in one place,
`maestro_pipelines.environment`.
"""

from maestro_pipelines.resources.alerts import AlertResource
from maestro_pipelines.resources.cache import CacheResource
from maestro_pipelines.resources.mlflow import MLflowRegistry
from maestro_pipelines.resources.object_store import ObjectStoreResource
from maestro_pipelines.resources.platform_database import PlatformDatabase

__all__ = ["AlertResource", "CacheResource", "MLflowRegistry", "ObjectStoreResource", "PlatformDatabase"]
