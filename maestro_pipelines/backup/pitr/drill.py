"""The point-in-time recovery drill: prove, end to end, that the archive gives back the data
up to a minute ago, and measure the RTO and the RPO it really gives.

    write markers    a marker row (the drill's id, the time) committed in `<platform>_pitr_drill`,
                     the time just after it taken as the recovery target, then a later marker
    wait for WAL     until the segments holding both markers are in the store (archive_timeout,
                     the spool's pusher): the seconds from the first marker's commit to its WAL in
                     the store is the measured RPO (the data a crash at the marker would lose)
    recover          a temporary server from the newest base backup before the target plus the
                     archived WAL (recover.recovered_server), on a private socket
    check markers    the first marker is there, the later one is not: recovery stopped at the point
    pg_amcheck       every table and btree index of every database of the recovered server
                     RTO = the start of `recover` to the end of `pg_amcheck`

No Dagster: the `pitr_drill` asset wraps it. The marker database lives on the platform
database's server (a small table; its rows are what a drill leaves behind, never the
platform's own tables), so the drill needs no write access to the platform's schema.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.phases import PhaseProgress
from maestro_pipelines.backup.pgtools import libpq_environment, program
from maestro_pipelines.backup.pitr.layout import parse_lsn, segment_name, wal_key
from maestro_pipelines.backup.restore.state import RestoreStep, timed
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.objectives import PITR_RPO_TARGET, PITR_RTO_TARGET
from maestro_pipelines.platform_db.admin import ensure_database
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.storage import ObjectStore

MARKER_DATABASE_SUFFIX = "_pitr_drill"
MARKER_TABLE = "pitr_markers"
ARCHIVE_GRACE_S = 120.0
"""How long past the server's archive_timeout the drill waits for the markers' WAL in the store."""


class PitrDrillError(MaestroError):
    """The drill could not run (archiving off, no base backup): nothing was proved."""


@dataclass
class PitrDrillReport:
    drill_id: str
    started_at: datetime
    rto_target_s: float
    rpo_target_s: float
    system_id: str | None = None
    marker_at: datetime | None = None
    """The first marker's commit (the server's clock)."""
    target_time: datetime | None = None
    """The recovery target: just after the first marker, before the later one."""
    marker_wal: str | None = None
    rpo_s: float | None = None
    """Measured: the first marker's commit to its WAL segment in the store."""
    rto_s: float | None = None
    reached_time: datetime | None = None
    reached_lsn: str | None = None
    base_id: str | None = None
    relations_checked: int = 0
    steps: list[RestoreStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> bool:
        return self.rto_s is not None

    @property
    def rto_ok(self) -> bool:
        return self.rto_s is not None and self.rto_s <= self.rto_target_s

    @property
    def rpo_ok(self) -> bool:
        return self.rpo_s is not None and self.rpo_s <= self.rpo_target_s

    @property
    def ok(self) -> bool:
        return not self.problems and self.rto_ok and self.rpo_ok

    def as_dict(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {
            "ok": self.ok, "drill_id": self.drill_id, "started_at": iso(self.started_at),
            "system_id": self.system_id, "marker_at": iso(self.marker_at), "target_time": iso(self.target_time),
            "marker_wal": self.marker_wal, "base_id": self.base_id,
            "rpo_s": None if self.rpo_s is None else round(self.rpo_s, 1), "rpo_target_s": self.rpo_target_s,
            "rto_s": None if self.rto_s is None else round(self.rto_s, 2), "rto_target_s": self.rto_target_s,
            "reached_time": iso(self.reached_time), "reached_lsn": self.reached_lsn,
            "relations_checked": self.relations_checked,
            "steps": {s.name: round(s.seconds, 3) for s in self.steps},
            "problems": self.problems, "notes": self.notes,
        }


def marker_database(platform: DatabaseTarget) -> str:
    return f"{platform.database}{MARKER_DATABASE_SUFFIX}"[:63]


def run_pitr_drill(store: ObjectStore, platform: DatabaseTarget, workdir: Path | None = None,
                   rto_target: timedelta = PITR_RTO_TARGET, rpo_target: timedelta = PITR_RPO_TARGET,
                   log=None, phases: PhaseProgress | None = None) -> PitrDrillReport:
    """Run the drill against the server of `platform` (the platform database's): see the module."""
    say = log or (lambda message: None)
    report = PitrDrillReport(f"{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}", utcnow(),
                             rto_target.total_seconds(), rpo_target.total_seconds())
    markers = _Markers(platform, report.drill_id)
    timed(report, "write markers", lambda: markers.write(report), phases)
    say(f"markers written at {report.marker_at:%H:%M:%S} UTC; waiting for their WAL in {store.url}")
    timed(report, "wait for WAL", lambda: _wait_for_wal(store, markers, report), phases)
    started = time.monotonic()
    _recover_and_check(store, report, marker_database(platform), workdir, say, phases)
    report.rto_s = time.monotonic() - started
    if report.rpo_s is not None and not report.rpo_ok:
        report.notes.append(f"measured RPO {report.rpo_s:.0f} s is over the target of {report.rpo_target_s:.0f} s")
    if not report.rto_ok:
        report.notes.append(f"RTO {report.rto_s:.1f} s is over the target of {report.rto_target_s:.0f} s")
    return report


def _recover_and_check(store: ObjectStore, report: PitrDrillReport, markers_in: str, workdir: Path | None,
                       say, phases) -> None:
    from maestro_pipelines.backup.pitr.recover import TIME, RecoveryTarget, recovered_server

    target = RecoveryTarget(TIME, time=report.target_time)
    with _workdir(workdir) as folder, recovered_server(store, report.system_id, target, folder, log=say,
                                                        phases=phases) as server:
        report.reached_time, report.reached_lsn = server.reached_time, server.reached_lsn
        report.base_id = server.base.base_id
        timed(report, "check markers", lambda: _check_markers(server.url(markers_in), report), phases)
        timed(report, "pg_amcheck", lambda: _amcheck(server.url(), report), phases)


@contextmanager
def _workdir(workdir: Path | None):
    import shutil
    import tempfile

    if workdir is not None:
        yield Path(workdir)
        return
    folder = Path(tempfile.mkdtemp(prefix="maestro-pitr-drill-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Markers:
    """The drill's two marker rows on the platform database's server."""

    def __init__(self, platform: DatabaseTarget, drill_id: str):
        self.platform = platform
        self.drill_id = drill_id
        self.url = platform.url.set(database=marker_database(platform))
        self.lsns: list[str] = []

    def write(self, report: PitrDrillReport) -> str:
        ensure_database(self.platform.url.set(database="postgres"), self.url.database, self.platform.source)
        with psycopg_connect(self.url, autocommit=True, source=self.platform.source) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (drill text, kind text, "
                         "written_at timestamptz NOT NULL DEFAULT clock_timestamp())")
            report.system_id = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
            timeline, timeout = conn.execute(
                "SELECT timeline_id, current_setting('archive_timeout') FROM pg_control_checkpoint()").fetchone()
            self.timeline, self.archive_timeout = int(timeline), _seconds(timeout)
            report.marker_at = self._insert(conn, "first")
            report.target_time = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            self._insert(conn, "later")
        report.marker_wal = segment_name(self.timeline, parse_lsn(self.lsns[0]))
        return f"drill {self.drill_id}: first marker at LSN {self.lsns[0]}, a later one at {self.lsns[1]}"

    def _insert(self, conn, kind: str) -> datetime:
        written = conn.execute(f"INSERT INTO {MARKER_TABLE} (drill, kind) VALUES (%s, %s) RETURNING written_at",
                               [self.drill_id, kind]).fetchone()[0]
        self.lsns.append(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        return written


def _seconds(setting: str) -> float:
    """archive_timeout as current_setting gives it: `60`, `1min`, `30s` or `0`."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    number = setting.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number) * units.get(setting[len(number):] or "s", 1)


def _wait_for_wal(store: ObjectStore, markers: _Markers, report: PitrDrillReport) -> str:
    """Until the segments of both markers are in the store; the first marker's RPO is measured
    when its segment appears (polled once a second: the measure is to the second)."""
    if markers.archive_timeout <= 0:
        raise PitrDrillError(
            "archive_timeout is 0 on the platform database's server: a segment is archived only once full, "
            "so the drill's markers may never reach the store", "Set archive_timeout = 60 (docs/configuration.md)")
    segments = [segment_name(markers.timeline, parse_lsn(lsn)) for lsn in markers.lsns]
    deadline = time.monotonic() + markers.archive_timeout + ARCHIVE_GRACE_S
    pending = list(dict.fromkeys(segments))
    while pending:
        if store.exists(wal_key(report.system_id, pending[0])):
            if pending[0] == segments[0]:
                report.rpo_s = (utcnow() - report.marker_at).total_seconds()
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise PitrDrillError(
                f"WAL segment {pending[0]} (the drill's markers) did not reach the store at {store.url} within "
                f"{markers.archive_timeout + ARCHIVE_GRACE_S:.0f} s: archiving is off or failing",
                "Run `maestro wal status` to see why")
        time.sleep(1.0)
    return f"segment {segments[0]} archived {report.rpo_s:.0f} s after the first marker"


def _check_markers(url, report: PitrDrillReport) -> str:
    with psycopg_connect(url, source="the recovered server") as conn:
        kinds = {row[0] for row in conn.execute(f"SELECT kind FROM {MARKER_TABLE} WHERE drill = %s",
                                                 [report.drill_id]).fetchall()}
    if "first" not in kinds:
        report.problems.append(f"the recovered server lacks the marker written at {report.marker_at:%H:%M:%S} UTC")
    if "later" in kinds:
        report.problems.append("the recovered server holds the later marker: recovery went past its target")
    return "first marker there, later one not" if not report.problems else "; ".join(report.problems)


def _amcheck(url, report: PitrDrillReport) -> str:
    """pg_amcheck on every database of the recovered server (it installs amcheck where missing:
    the server is a scratch copy, dropped after the drill)."""
    env = libpq_environment(url.set(database="postgres"), application="maestro-pitr-drill")
    done = subprocess.run([program("pg_amcheck"), "--all", "--install-missing", "--progress"], env=env,
                          capture_output=True, text=True, timeout=3600)
    progress = [line for line in done.stderr.replace("\r", "\n").splitlines() if "relations" in line]
    if progress:
        report.relations_checked = int(progress[-1].strip().split("/")[-1].split()[0])
    if done.returncode != 0:
        found = (done.stdout.strip() or done.stderr.strip()).splitlines()
        report.problems.append(f"pg_amcheck found corruption: {found[0] if found else 'exit ' + str(done.returncode)}")
    return f"{report.relations_checked} relations checked"
