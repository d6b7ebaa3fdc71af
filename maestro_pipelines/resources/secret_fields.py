"""Which resource fields hold credentials, and why Dagster is not told which.

A credential reaches a resource only as `dg.EnvVar("NAME")` (`maestro_pipelines.environment`
passes nothing else): the resources page then shows the variable's name, the Launchpad
pre-fills `{env: NAME}`, and a run reads the value in its own process.

These fields are deliberately not marked `dagster__is_secret`. Dagster 1.13 pre-fills the
Launchpad with a literal `'********'` for every default of such a field, an EnvVar and an
unset (None) field alike, and Launch Run then hands `'********'` to the resource as the URL
or key: every job using these resources failed when launched from the UI ("... is not a
valid database URL"). The marker below drives Maestro's own masking (`repr()`) and the check
that no plain value ever sits in such a field of the deployment's resources.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from maestro_pipelines.errors import MaestroError

SECRET_FIELD = {"maestro__secret": True}
"""`json_schema_extra` of a field that holds a credential (a password in a URL, a key)."""


def is_secret_field(field: Any) -> bool:
    """Whether a pydantic FieldInfo carries SECRET_FIELD."""
    extra = getattr(field, "json_schema_extra", None)
    return isinstance(extra, dict) and bool(extra.get("maestro__secret"))


def secret_field_names(resource_cls: type) -> set[str]:
    return {name for name, field in resource_cls.model_fields.items() if is_secret_field(field)}


def check_secrets_by_name(key: str, resource: dg.ConfigurableResource) -> None:
    """Refuse a resource whose credential field holds a plain value instead of a dg.EnvVar:
    the UI would show that value (nothing masks it there)."""
    for name in sorted(secret_field_names(type(resource))):
        value = getattr(resource, name, None)
        if value is not None and not isinstance(value, dg.EnvVar):
            raise MaestroError(
                f"resource {key}: {name} holds a plain value, which the Dagster UI would show",
                "Pass it as dg.EnvVar('VARIABLE') so only the variable's name is shown",
            )
