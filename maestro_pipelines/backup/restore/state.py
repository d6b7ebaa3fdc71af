"""What one restore carries from phase to phase (`RestoreState`), what it reports, and the
names it gives the databases it makes. No phase logic here: every phase module reads and
fills a `RestoreState`, so each phase can be run (and tested) on its own."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.backup.catalog import BackupEntry
from maestro_pipelines.backup.consistency import TableChecksBeside
from maestro_pipelines.backup.manifest import BackupError, BackupManifest, DatabaseDump, utcnow
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.storage import ObjectStore

SCRATCH = "scratch"
LIVE = "live"
NAME_LIMIT = 63
"""PostgreSQL's identifier limit in bytes; longer names are silently truncated."""
MAX_JOBS = 32
"""pg_restore -j: each job is a process and a server connection; past this they only contend."""
STAMP_FORMAT = "%Y%m%dt%H%M%S"


class RestoreError(BackupError):
    """A restore that could not be done; the live databases are as they were."""


class RestoreRefused(RestoreError):
    """A restore refused before anything was touched (confirmation missing, version)."""


@dataclass
class RestoreStep:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class DatabaseRestore:
    role: str
    live: str
    """The live database's name (where it is restored to, or next to)."""
    restored_as: str
    """The database holding the restored data now: the live name after a swap."""
    kept_as: str | None = None
    """Where the old live database was renamed to (live restores whose live database existed)."""
    tables: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    url: URL | None = field(default=None, repr=False)


@dataclass
class RestoreReport:
    backup_id: str
    snapshot_at: datetime
    target: str
    started_at: datetime
    steps: list[RestoreStep] = field(default_factory=list)
    databases: list[DatabaseRestore] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    artifacts_checked: int = 0
    finished_at: datetime | None = None
    notes: list[str] = field(default_factory=list)
    """Worth knowing, not failures (an optional extension the user could not recreate)."""
    reached_time: datetime | None = None
    """A restore to a point (pitr/restore.py): the last replayed transaction's commit time."""
    reached_lsn: str | None = None
    """A restore to a point: the WAL position replay reached (pg_last_wal_replay_lsn())."""
    base_id: str | None = None
    """A restore to a point: the base backup it recovered from."""

    @property
    def duration_s(self) -> float:
        end = self.finished_at or utcnow()
        return (end - self.started_at).total_seconds()

    @property
    def problems(self) -> list[str]:
        return [f"{d.role}: {p}" for d in self.databases for p in d.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def step_seconds(self) -> dict[str, float]:
        return {s.name: round(s.seconds, 3) for s in self.steps}


@dataclass
class DatabasePlan:
    """One database of the restore: the backup's dump, where it goes, and what became of it."""

    dump: DatabaseDump
    dest: DatabaseTarget
    result: DatabaseRestore
    """Also in `report.databases`: what the report says of this database."""
    scratch: str
    """`<live>_restore_<stamp>`: where it is restored and verified (before any swap)."""
    file: Path | None = None
    """The decompressed dump on local disk, once fetched."""
    checks_beside: TableChecksBeside | None = field(default=None, repr=False)
    """The tables' checks taken while pg_restore loads the others (`restore_database` starts
    them, `verify_database` ends them)."""

    @property
    def role(self) -> str:
        return self.dump.role

    @property
    def scratch_url(self) -> URL:
        return self.dest.url.set(database=self.scratch)


def _quiet(message: str) -> None:
    pass


@dataclass
class RestoreState:
    """One restore: what `plan` decided, and what each later phase did (files fetched,
    databases created, swapped or not). Phases read and fill it; `restore_backup` runs them."""

    store: ObjectStore
    entry: BackupEntry
    target: str
    stamp: str
    report: RestoreReport
    databases: list[DatabasePlan]
    jobs: int = 2
    upgrade_platform: bool = True
    workdir: Path | None = None
    """Where dumps are decompressed; made by `fetch.open_workdir` unless the caller gave one."""
    own_workdir: bool = False
    """The work folder is this restore's own, removed by `clean_up` (a caller's is left)."""
    created: list[tuple[URL, str, str]] = field(default_factory=list)
    """(server URL, database, source) of every database this restore created: dropped on failure."""
    swapping: bool = False
    """From the swap on, the verified copies are kept whatever happens (a failed swap names them)."""
    artifact_list: dict | None = None
    """The backup's artifacts.json, read and checked by the fetch (None: none, or not fetched)."""
    progress: Progress | None = field(default=None, repr=False)
    phases: PhaseProgress | None = field(default=None, repr=False)
    log: Callable[[str], None] = field(default=_quiet, repr=False)

    @property
    def manifest(self) -> BackupManifest:
        return self.entry.manifest

    @property
    def destinations(self) -> list[DatabaseTarget]:
        return [plan.dest for plan in self.databases]

    def timed(self, name: str, fn: Callable[[], str | None]) -> None:
        timed(self.report, name, fn, self.phases)


def timed(report, name: str, fn: Callable[[], str | None], phases: PhaseProgress | None = None) -> None:
    """Run one step into `report.steps` (a RestoreReport or DrillReport), telling `phases` when it
    starts and ends."""
    started = time.monotonic()
    if phases is not None:
        phases(Phase(name))
    detail = fn()
    step = RestoreStep(name, time.monotonic() - started, detail or "")
    report.steps.append(step)
    if phases is not None:
        phases(Phase(name, finished=True, seconds=step.seconds, detail=step.detail))


def stamp_of(moment: datetime) -> str:
    return moment.strftime(STAMP_FORMAT)


def restore_database_name(live: str, kind: str, stamp: str) -> str:
    """`<live>_<kind>_<stamp>` (kind `restore` or `pre_restore`), kept within PostgreSQL's
    63 bytes: a longer live name is cut and followed by 8 hex digits of its hash, so the name
    is still unique to that live database (`restore_leftovers` recomputes it to match)."""
    suffix = f"_{kind}_{stamp}"
    name = f"{live}{suffix}"
    if len(name.encode()) <= NAME_LIMIT:
        return name
    tag = "_" + hashlib.sha256(live.encode()).hexdigest()[:8]
    room = NAME_LIMIT - len((tag + suffix).encode())
    prefix = live.encode()[:room].decode("utf-8", errors="ignore")  # never half a character
    return f"{prefix}{tag}{suffix}"
