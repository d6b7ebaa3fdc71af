"""Tenants: the rows every per-tenant partition, model and prediction hangs from."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from maestro_pipelines.errors import MaestroError

# The same rule as the tenants_name_format CHECK constraint: tenant names become Dagster
# partition keys, MLflow model names (maestro-<tenant>) and object key prefixes.
TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

DEFAULT_GATES = {"accuracy": 0.70, "f1": 0.65, "roc_auc": 0.70}
DEFAULT_REGRESSION_TOLERANCE = 0.02


def validate_tenant_name(name: object) -> str:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        shown = name if isinstance(name, str) else type(name).__name__
        raise MaestroError(
            f"'{shown}' is not a valid tenant name",
            "Use 1 to 63 characters: a lowercase letter first, then lowercase letters, digits, '-' or '_'",
        )
    return name


@dataclass
class Tenant:
    id: int
    name: str
    display_name: str
    status: str
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def gates(self) -> dict[str, float]:
        """Metric floors a new model must reach (tenant settings override the defaults)."""
        return {**DEFAULT_GATES, **{k: float(v) for k, v in self.settings.get("gates", {}).items()}}

    @property
    def regression_tolerance(self) -> float:
        return float(self.settings.get("regression_tolerance", DEFAULT_REGRESSION_TOLERANCE))

    @property
    def registry_name(self) -> str:
        return f"maestro-{self.name}"


_COLUMNS = "id, name, display_name, status, settings, created_at"


def add_tenant(conn: Connection, name: str, display_name: str = "", settings: dict | None = None) -> Tenant:
    validate_tenant_name(name)
    try:
        with conn.begin_nested():
            row = conn.execute(
                text(
                    f"INSERT INTO tenants (name, display_name, settings) VALUES (:name, :display, CAST(:settings AS jsonb)) "
                    f"RETURNING {_COLUMNS}"
                ),
                {"name": name, "display": display_name, "settings": json.dumps(settings or {})},
            ).one()
    except IntegrityError:
        raise MaestroError(f"tenant '{name}' already exists", "Pick another name, or see `maestro tenants list`") from None
    return Tenant(*row)


def update_tenant_settings(conn: Connection, name: str, settings: dict) -> Tenant:
    row = conn.execute(
        text(f"UPDATE tenants SET settings = settings || CAST(:s AS jsonb), updated_at = now() WHERE name = :n RETURNING {_COLUMNS}"),
        {"n": validate_tenant_name(name), "s": json.dumps(settings)},
    ).one_or_none()
    if row is None:
        raise MaestroError(f"tenant '{name}' does not exist", "See `maestro tenants list`")
    return Tenant(*row)


def list_tenants(conn: Connection, include_inactive: bool = False) -> list[Tenant]:
    where = "" if include_inactive else "WHERE status = 'active'"
    return [Tenant(*row) for row in conn.execute(text(f"SELECT {_COLUMNS} FROM tenants {where} ORDER BY id"))]


def get_tenant(conn: Connection, name: str) -> Tenant:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM tenants WHERE name = :n"), {"n": validate_tenant_name(name)}
    ).one_or_none()
    if row is None:
        raise MaestroError(f"tenant '{name}' does not exist", "Add it with `maestro tenants add NAME`")
    return Tenant(*row)
