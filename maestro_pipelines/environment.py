"""The one place that decides what this deployment gets: its resources, whether its schedules
and sensors start running, and their time zone (read in `settings.py`, decided here).

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
from maestro_pipelines.resources.object_store import STORE_URL_VARIABLE
from maestro_pipelines.resources.values_io import StoredValuesIOManager
from maestro_pipelines.resources.secret_fields import check_secrets_by_name, secret_field_names
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
    return ObjectStoreResource(url=settings.store_url, home=str(settings.home), **_store_secrets(settings.store_url))


def _store_secrets(store_url: str | None) -> dict[str, dg.EnvVar]:
    """The resource's credential fields its backend fills from an environment variable
    (Azure's connection string), passed by name so the UI shows the variable, not the key."""
    from maestro_pipelines.storage import InvalidStoreURL
    from maestro_pipelines.storage.urls import backend_for

    if store_url is None:
        return {}
    try:
        backend = backend_for(store_url, STORE_URL_VARIABLE)
    except InvalidStoreURL:
        return {}  # the definitions load; opening the store says what is wrong with the URL
    secret = secret_field_names(ObjectStoreResource)
    return {
        name: dg.EnvVar(backend.environment[option])
        for name, option in backend.resource_options.items()
        if name in secret and option in backend.environment
    }


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
    store = object_store(settings)
    resources = {
        "platform_db": platform_database(settings),
        "mlflow": mlflow_registry(settings),
        "source": data_source(settings),
        "store": store,
        # Asset values in the same store (values/), not on the disk of whichever machine ran the step.
        "io_manager": StoredValuesIOManager(store=store),
        "alerts": alerts(settings),
        "cache": cache(settings),
    }
    for key, resource in resources.items():
        # The UI shows a credential field's value unless it is an EnvVar (see secret_fields).
        check_secrets_by_name(key, resource)
    return resources


def run_settings(platform_db: PlatformDatabase, mlflow: MLflowRegistry) -> Settings:
    """The settings a run's library calls take (`backup_targets`, `database_targets`): the run
    process's environment (Dagster's own storage) with the home and databases of the run's
    resources, which a test or the Launchpad may have pointed elsewhere."""
    import dataclasses
    from pathlib import Path

    return dataclasses.replace(
        load_settings(),
        home=Path(platform_db.home).expanduser().resolve(),
        database_url=platform_db.database_url or None,
        mlflow_tracking_uri=mlflow.tracking_uri or None,
    )


def schedule_timezone(settings: Settings) -> str:
    """MAESTRO_TIMEZONE, checked: the schedules' clock and the default month of `monthly_archive`."""
    from maestro_pipelines.clock import checked_timezone

    return checked_timezone(settings.timezone)


def automation_on_by_default(settings: Settings) -> bool:
    """Backup schedules and sensors start RUNNING in production (MAESTRO_DATABASE_URL set) and
    STOPPED on the embedded default (a laptop): see `maestro_pipelines.schedules.backups`."""
    return not settings.uses_embedded_database


_DEPLOYMENT_DECISIONS = {
    "BACKUP_TIMEZONE": schedule_timezone,
    "AUTOMATION_ON_BY_DEFAULT": automation_on_by_default,
}
"""Constants the schedules and sensors are defined with, decided from this process's settings
when first imported (not when this module is: the CLI imports it without a schedule)."""


def __getattr__(name: str):
    if name in _DEPLOYMENT_DECISIONS:
        value = _DEPLOYMENT_DECISIONS[name](load_settings())
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
