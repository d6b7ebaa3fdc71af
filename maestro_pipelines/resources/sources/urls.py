"""One URL, the way users write it, to the `DataSource` resource that reads it.

Which connector reads which URL, its rules and its driver are the connector's own
declaration (`maestro_pipelines.connectors.registry`); this module only picks the resource
class for that connector (the one naming it, else `URLDataSource`) and fills its fields.
Two ways in:

- `source_spec_for_url(url)` checks the URL and the driver now and returns the class plus
  the settings that are safe to show (host names, project, table; never a password), so
  `environment.py` can build the resource with `url=dg.EnvVar("MAESTRO_SOURCE_URL")`: the
  resource parses its own `url` again at run time, and the UI shows only the variable name.
- `source_from_url(url)` builds the resource straight from the URL text (scripts, tests).

Nothing here imports a driver: whether one is installed is looked up on sys.path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import dagster as dg

from maestro_pipelines.connectors.base import SOURCE_URL_VARIABLE
from maestro_pipelines.connectors.registry import checked_url_settings
from maestro_pipelines.resources.sources.base import DataSource, URLDataSource, resource_class_for


class SourceSpec(NamedTuple):
    """The resource class for a URL and its settings that are safe to show in the UI."""

    cls: type[DataSource]
    kwargs: dict[str, Any]
    password_variable: str | None = None
    """Set when the password is not in the URL and must come from this variable (Snowflake)."""

    def build(self, url: str | dg.EnvVar, **overrides: Any) -> DataSource:
        """The resource, `url` (text or `dg.EnvVar`) parsed again by the resource at run time."""
        secrets: dict[str, Any] = {}
        if self.password_variable and "password" not in overrides:
            secrets["password"] = dg.EnvVar(self.password_variable)
        return self.cls(url=url, **{**self.kwargs, **secrets, **overrides})


def source_spec_for_url(url: str, variable: str = SOURCE_URL_VARIABLE) -> SourceSpec:
    """Check `url` (form and driver) and return its class plus the non-secret settings."""
    declaration, settings = checked_url_settings(url, variable)
    cls = resource_class_for(declaration)
    if cls is URLDataSource:  # it has fields for Maestro's own settings only; the URL holds the rest
        settings = {key: value for key, value in settings.items() if key in cls.model_fields}
    kwargs = dict(settings)
    kwargs["url_variable"] = variable
    return SourceSpec(cls, kwargs, declaration.password_variable(url, variable))


def source_from_url(url: str, variable: str = SOURCE_URL_VARIABLE, **fields: Any) -> DataSource:
    """The resource for `url` (the URL text itself goes into its secret `url` field);
    `fields` override the settings read from the URL (`table=...`, `key_column=...`)."""
    return source_spec_for_url(url, variable).build(url, **fields)


def source_from_environment(value: str, variable: str = SOURCE_URL_VARIABLE, **fields: Any) -> DataSource:
    """For `environment.py`: `value` is the variable's current value (checked now), the
    resource gets `url=dg.EnvVar(variable)` so the secret is read at run time only."""
    return source_spec_for_url(value, variable).build(dg.EnvVar(variable), **fields)
