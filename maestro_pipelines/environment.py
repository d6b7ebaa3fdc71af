"""The one place that decides which resources this deployment gets.

Embedded default (nothing configured): the embedded PostgreSQL under MAESTRO_HOME holds the
platform database, MLflow's backend and the demo's training rows; the object store is
MAESTRO_HOME/store. Production: the same resources pointed at real services by environment
variables, passed as `dg.EnvVar` so their values (passwords) are resolved at run time and
never shown in the UI: the resources page shows the variable's name and the Launchpad pre-fills
`{env: NAME}`, which launches as it is. A variable that is not set leaves its field empty (None),
which the Launchpad leaves out; nothing here is ever a masked placeholder (see
`maestro_pipelines.resources.secret_fields`).
"""

from __future__ import annotations

import dagster as dg

from maestro_pipelines.resources import AlertResource, CacheResource, MLflowRegistry, ObjectStoreResource, PlatformDatabase
from maestro_pipelines.resources.secret_fields import check_secrets_by_name
from maestro_pipelines.settings import Settings, load_settings


def _env_or_none(value: str | None, variable: str):
    return dg.EnvVar(variable) if value is not None else None


def platform_database(settings: Settings) -> PlatformDatabase:
    return PlatformDatabase(
        database_url=_env_or_none(settings.database_url, "MAESTRO_DATABASE_URL"), home=str(settings.home)
    )


def mlflow_registry(settings: Settings) -> MLflowRegistry:
    return MLflowRegistry(
        tracking_uri=_env_or_none(settings.mlflow_tracking_uri, "MLFLOW_TRACKING_URI"),
        database_url=_env_or_none(settings.database_url, "MAESTRO_DATABASE_URL"),
        home=str(settings.home),
        store_url=settings.store_url,
    )


def object_store(settings: Settings) -> ObjectStoreResource:
    secrets = {}
    if settings.store_url and settings.store_url.startswith("az://"):
        secrets["azure_connection_string"] = dg.EnvVar("AZURE_STORAGE_CONNECTION_STRING")
    return ObjectStoreResource(url=settings.store_url, home=str(settings.home), **secrets)


def alerts(settings: Settings) -> AlertResource:
    # The webhook URL is the credential of a Slack webhook: passed by name, read at run time.
    return AlertResource(webhook_url=_env_or_none(settings.alert_webhook, "MAESTRO_ALERT_WEBHOOK"))


def cache(settings: Settings) -> CacheResource:
    # The URL may hold a password: passed by name, read at run time. Unset: the LRU alone.
    if settings.redis_url is not None:
        import importlib.util

        if importlib.util.find_spec("redis") is None:  # found without importing it
            from maestro_pipelines.errors import MaestroError

            raise MaestroError("MAESTRO_REDIS_URL is set but the redis package is not installed",
                               "pip install 'maestro-pipelines[redis]', or unset MAESTRO_REDIS_URL")
    return CacheResource(redis_url=_env_or_none(settings.redis_url, "MAESTRO_REDIS_URL"))


def data_source(settings: Settings):
    from maestro_pipelines.resources.sources import PostgresDataSource, source_from_environment

    if settings.source_url is None:
        # Embedded default: tenants' rows live in the platform database's `training_rows`.
        return PostgresDataSource(
            url=_env_or_none(settings.database_url, "MAESTRO_DATABASE_URL"),
            url_variable="MAESTRO_DATABASE_URL",
            home=str(settings.home),
        )
    # The URL's form and driver are checked now (a clear load error); the secret is read at run time.
    return source_from_environment(settings.source_url, "MAESTRO_SOURCE_URL")


def resources_for_environment(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    settings = settings or load_settings()
    resources = {
        "platform_db": platform_database(settings),
        "mlflow": mlflow_registry(settings),
        "source": data_source(settings),
        "store": object_store(settings),
        "alerts": alerts(settings),
        "cache": cache(settings),
    }
    for key, resource in resources.items():
        # The UI shows a credential field's value unless it is an EnvVar (see secret_fields).
        check_secrets_by_name(key, resource)
    return resources
