"""Tenants: the rows every per-tenant partition, model and prediction hangs from."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.objectives import DEFAULT_GATES, DEFAULT_REGRESSION_TOLERANCE

# The same rule as the tenants_name_format CHECK constraint: tenant names become Dagster
# partition keys, MLflow model names (maestro-<tenant>) and object key prefixes.
TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

SHOWN_NAME = 40
"""Characters of a refused name echoed back: enough to recognise it, never a screenful."""


def validate_tenant_name(name: object) -> str:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        if not isinstance(name, str):
            shown = f"a {type(name).__name__}"
        elif len(name) > SHOWN_NAME:
            shown = f"'{name[:SHOWN_NAME]}...' ({len(name):,} characters)"
        else:
            shown = f"'{name}'"
        raise MaestroError(
            f"{shown} is not a valid tenant name",
            "Use 1 to 63 characters: a lowercase letter first, then lowercase letters, digits, '-' or '_'",
        )
    return name


def _fraction(value: object, what: str, option: str, example: float) -> float:
    """A number from 0 to 1: metrics (accuracy, F1, ROC AUC) and their drops live there."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or not 0 <= number <= 1:
        raise MaestroError(
            f"{what} {value!r} is not a number from 0 to 1",
            f"Give {option} a fraction, e.g. {option} {example:g}",
        )
    return float(number)


def validate_tenant_settings(settings: dict | None) -> dict:
    """The quality gates and regression tolerance of `settings`, checked: each a number in
    [0, 1] (a gate of 1.5 could never pass, -3 always would, NaN is not JSON)."""
    settings = dict(settings or {})
    gates = settings.get("gates", {})
    if not isinstance(gates, dict):
        raise MaestroError("the tenant's gates are not a mapping", f"Give gates as {{{', '.join(DEFAULT_GATES)}}}")
    if "gates" in settings:
        gates = settings["gates"] = dict(gates)
    for metric, floor in gates.items():
        if metric not in DEFAULT_GATES:
            raise MaestroError(f"'{str(metric)[:SHOWN_NAME]}' is not a quality gate", f"Use {', '.join(DEFAULT_GATES)}")
        gates[metric] = _fraction(floor, f"the {metric} gate", f"--min-{metric.replace('_', '-')}", DEFAULT_GATES[metric])
    if "regression_tolerance" in settings:
        settings["regression_tolerance"] = _fraction(
            settings["regression_tolerance"], "the regression tolerance", "--regression-tolerance",
            DEFAULT_REGRESSION_TOLERANCE,
        )
    return settings


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
    settings = validate_tenant_settings(settings)
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
        {"n": validate_tenant_name(name), "s": json.dumps(validate_tenant_settings(settings))},
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
        raise MaestroError(f"tenant '{name}' does not exist", f"Add it with `maestro tenants add {name}`")
    return Tenant(*row)


@dataclass(frozen=True)
class TenantModels:
    """What `maestro tenants list` shows of a tenant's models: read from the ML records."""

    production_version: int | None
    deployed_at: datetime | None
    last_training_status: str | None
    """running, failed, succeeded (fit and registered), or `not registered`: fit, but no version
    came of it (the gates refused it, or the run is still on its way to registration)."""
    last_training_at: datetime | None  # when it finished, or started while it runs
    last_training_run_id: str | None  # the Dagster run
    model_versions: int = 0  # registered versions: 0 until a first training got through its gates


OVERVIEW_SQL = """
SELECT t.name, prod.version, prod.deployed_at,
       -- A fit that registered no version: its gates refused it (or the run is still registering).
       CASE WHEN last.status = 'succeeded' AND NOT EXISTS (SELECT 1 FROM model_versions v WHERE v.experiment_id = last.id)
            THEN 'not registered' ELSE last.status END,
       coalesce(last.finished_at, last.started_at), last.dagster_run_id,
       (SELECT count(*) FROM model_versions v WHERE v.tenant_id = t.id)
FROM tenants t
LEFT JOIN LATERAL (
    SELECT v.version, d.deployed_at FROM deployments d JOIN model_versions v ON v.id = d.model_version_id
    WHERE d.tenant_id = t.id AND d.environment = 'production' AND d.status = 'active'
    ORDER BY d.deployed_at DESC LIMIT 1
) prod ON true
LEFT JOIN LATERAL (
    SELECT e.id, e.status, e.started_at, e.finished_at, e.dagster_run_id FROM experiments e
    WHERE e.tenant_id = t.id ORDER BY e.started_at DESC, e.id DESC LIMIT 1
) last ON true
"""


def tenant_models(conn: Connection) -> dict[str, TenantModels]:
    """Per tenant name: its production version and its last training (one read-only query)."""
    return {row[0]: TenantModels(*row[1:]) for row in conn.execute(text(OVERVIEW_SQL))}
