"""What the backup writer, the restore, the verification and the drill share: the database a
backup or restore is about, byte progress, and the size unit. Nothing here does work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

MiB = 1024 * 1024

Progress = Callable[[str, int, "int | None"], None]
"""progress(label, bytes_done, bytes_expected_or_None): called as a backup or download advances."""


@dataclass(frozen=True)
class DatabaseTarget:
    """One database to back up or restore into. `role` names it in the backup (platform,
    mlflow, dagster); `source` names the setting its URL came from, for error messages;
    `client_programs` the folder of the pg_dump and pg_restore to use (MAESTRO_PG_BIN; None:
    the wheel's, else PATH's)."""

    role: str
    url: URL
    source: str = "MAESTRO_DATABASE_URL"
    client_programs: Path | None = None

    @property
    def database(self) -> str:
        return self.url.database or "postgres"
