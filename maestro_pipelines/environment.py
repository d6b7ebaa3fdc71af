"""The one place that decides which resources this deployment gets.

Embedded default (nothing configured): the embedded PostgreSQL under MAESTRO_HOME.
Production: the same resources pointed at real services by environment variables, passed as
`dg.EnvVar` so their values (passwords) are resolved at run time and never shown in the UI.
"""

from __future__ import annotations

import dagster as dg

from maestro_pipelines.resources import PlatformDatabase
from maestro_pipelines.settings import Settings, load_settings


def platform_database(settings: Settings) -> PlatformDatabase:
    if settings.uses_embedded_database:
        return PlatformDatabase(home=str(settings.home))
    return PlatformDatabase(database_url=dg.EnvVar("MAESTRO_DATABASE_URL"), home=str(settings.home))


def resources_for_environment(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    settings = settings or load_settings()
    return {"platform_db": platform_database(settings)}
