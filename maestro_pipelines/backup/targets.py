"""Which databases a backup holds: every stateful PostgreSQL database Maestro owns.

- `platform`: the platform database (MAESTRO_DATABASE_URL or the embedded server);
- `mlflow`: MLflow's backend, when it is a PostgreSQL database: the default `<platform>_mlflow`
  beside the platform database, or MLFLOW_TRACKING_URI when that is a postgresql:// URL (an
  http(s) tracking server's database belongs to whoever runs that server);
- `dagster`: Dagster's own storage, when MAESTRO_DAGSTER_DATABASE_URL names it
  (deploy/dagster.yaml reads the same variable).
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import text

from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.platform_db.connection import connect
from maestro_pipelines.platform_db.location import DatabaseLocation, locate_platform_database
from maestro_pipelines.platform_db.urls import parse_postgres_url
from maestro_pipelines.settings import Settings


def database_targets(settings: Settings, location: DatabaseLocation | None = None) -> tuple[list[DatabaseTarget], list[str]]:
    """Every database Maestro owns, whether or not it exists right now (a restore brings back
    a dropped one), with notes on what is not ours."""
    location = location or locate_platform_database(settings)
    targets = [DatabaseTarget("platform", location.platform_url, location.source)]
    notes: list[str] = []
    tracking = settings.mlflow_tracking_uri
    if tracking is None:
        targets.append(DatabaseTarget("mlflow", location.url_for(location.mlflow_database), location.source))
    elif tracking.startswith(("postgresql", "postgres:")):
        targets.append(DatabaseTarget("mlflow", parse_postgres_url(tracking, "MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"))
    else:
        notes.append("MLFLOW_TRACKING_URI is not a PostgreSQL database: its backend is backed up by whoever runs it")
    if settings.dagster_database_url:
        targets.append(
            DatabaseTarget(
                "dagster",
                parse_postgres_url(settings.dagster_database_url, "MAESTRO_DAGSTER_DATABASE_URL"),
                "MAESTRO_DAGSTER_DATABASE_URL",
            )
        )
    else:
        notes.append("Dagster's storage is not on PostgreSQL (MAESTRO_DAGSTER_DATABASE_URL unset): not backed up")
    if settings.pg_bin is not None:  # every database is dumped and restored with MAESTRO_PG_BIN's programs
        targets = [replace(target, client_programs=settings.pg_bin) for target in targets]
    return targets, notes


def backup_targets(settings: Settings, location: DatabaseLocation | None = None) -> tuple[list[DatabaseTarget], list[str]]:
    """(targets, notes) of a backup: `database_targets`, less MLflow's default database when
    it does not exist yet (no model trained); the notes say what was left out and why."""
    location = location or locate_platform_database(settings)
    targets, notes = database_targets(settings, location)
    if settings.mlflow_tracking_uri is None:
        name = location.mlflow_database
        with connect(location.admin_url, location.source) as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
        if not exists:
            targets = [t for t in targets if t.role != "mlflow"]
            notes.insert(0, f"MLflow's database '{name}' does not exist yet (no model trained): not backed up")
    return targets, notes
