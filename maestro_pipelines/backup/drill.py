"""The DR drill: restore the newest verified backup into scratch databases, prove it, time it.

    restore (scratch)  ->  counts + checksums equal to the manifest (inside restore_backup)
                       ->  amcheck: bt_index_check on every btree index
                       ->  migrations on the restored platform database (inside restore_backup)
                       ->  the restored MLflow registry resolves every `production` alias
                       ->  RTO = start to verified; RPO = drill start - the backup's snapshot
                       ->  scratch databases dropped (always)
                       ->  one record in the store's drills/ (drill_history), failed drills too

No Dagster: `maestro drill` and the `dr_drill` asset run the same function.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.restore import (
    SCRATCH,
    RestoreReport,
    RestoreStep,
    check_restore_request,
    resolve_restore_point,
    restore_backup,
    timed,
)
from maestro_pipelines.backup.types import DatabaseTarget, Progress
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.objectives import RPO_TARGET
from maestro_pipelines.platform_db.admin import drop_database
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.redaction import hide_secret
from maestro_pipelines.storage import ObjectStore

DEFAULT_RTO_TARGET = timedelta(minutes=15)
DEFAULT_RPO_TARGET = RPO_TARGET
"""The RPO the sensor alerts on and `maestro backup info` judges by (one number)."""
MAX_RTO_MINUTES = 7 * 24 * 60
"""A week: a drill's restore is measured in minutes; more is a typo (or hours meant as minutes)."""
MAX_RPO_HOURS = 366 * 24
"""A year: the oldest restore point retention keeps (monthly archives)."""


def drill_targets(rto_minutes: object, rpo_hours: object) -> tuple[timedelta, timedelta]:
    """The RTO and RPO targets as timedeltas; a MaestroError for a target that is not a
    positive number within range (NaN and infinity included)."""
    checked = []
    for value, what, option, limit, unit in (
        (rto_minutes, "RTO target", "--rto-minutes", MAX_RTO_MINUTES, "minutes"),
        (rpo_hours, "RPO target", "--rpo-hours", MAX_RPO_HOURS, "hours"),
    ):
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number) or not 0 < number <= limit:
            raise MaestroError(f"the {what} {value!r} is out of range",
                               f"Give {option} a number of {unit} above 0 and at most {limit:,}")
        checked.append(float(number))
    return timedelta(minutes=checked[0]), timedelta(hours=checked[1])


@dataclass
class DrillReport:
    started_at: datetime
    rto_target_s: float
    rpo_target_s: float
    backup_id: str | None = None
    snapshot_at: datetime | None = None
    rto_s: float | None = None
    """Wall time from the drill's start to the restored databases verified."""
    rpo_s: float | None = None
    """Drill start minus the backup's snapshot: the data a disaster now would lose."""
    steps: list[RestoreStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    indexes_checked: int = 0
    aliases_resolved: int = 0
    databases: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restored: bool = False
    """The scratch restore finished: only then do RTO and RPO say anything about recovery."""
    record_key: str | None = None
    """Where the drill is recorded in the store (drills/...json); None when the store refused it."""

    @property
    def rto_ok(self) -> bool:
        return self.rto_s is not None and self.rto_s <= self.rto_target_s

    @property
    def rpo_ok(self) -> bool:
        return self.rpo_s is not None and self.rpo_s <= self.rpo_target_s

    @property
    def ok(self) -> bool:
        return not self.problems and self.rto_ok and self.rpo_ok

    def failures(self) -> list[str]:
        found = list(self.problems)
        if self.rto_s is not None and not self.rto_ok:
            found.append(f"RTO {self.rto_s:.1f} s is over the target of {self.rto_target_s:.0f} s")
        if self.restored and self.rpo_s is not None and not self.rpo_ok:
            found.append(f"RPO {self.rpo_s / 3600:.1f} h is over the target of {self.rpo_target_s / 3600:.1f} h")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "restored": self.restored,
            "backup_id": self.backup_id,
            "started_at": self.started_at.isoformat(),
            "snapshot_at": self.snapshot_at.isoformat() if self.snapshot_at else None,
            "rto_s": round(self.rto_s, 3) if self.rto_s is not None else None,
            "rto_target_s": self.rto_target_s,
            "rpo_s": round(self.rpo_s, 1) if self.rpo_s is not None else None,
            "rpo_target_s": self.rpo_target_s,
            "steps": {s.name: round(s.seconds, 3) for s in self.steps},
            "indexes_checked": self.indexes_checked,
            "aliases_resolved": self.aliases_resolved,
            "databases": self.databases,
            "problems": self.failures(),
            "notes": self.notes,
            "record_key": self.record_key,
        }


AMCHECK_FOR_NON_SUPERUSERS = (
    "an administrator can run CREATE EXTENSION amcheck and GRANT EXECUTE ON FUNCTION bt_index_check(regclass) "
    "TO {user} in template1, which every scratch database copies"
)


def check_indexes(url, on_index: Callable[[int, int, str], None] | None = None) -> tuple[int, list[str], str | None]:
    """amcheck's bt_index_check on every btree index: (checked, problems, why skipped);
    `on_index(done, total, index)` before each index.

    Creating amcheck and running bt_index_check need a superuser unless an administrator
    granted them: a managed database's user (LOGIN CREATEDB) gets the reason, not a failure."""
    import psycopg

    user = url.username or "Maestro's user"
    conn = psycopg_connect(url, autocommit=True, source="restored database")
    try:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        except psycopg.errors.InsufficientPrivilege:
            return 0, [], f"{user} may not create the amcheck extension; " + AMCHECK_FOR_NON_SUPERUSERS.format(user=user)
        except psycopg.Error as exc:
            return 0, [], f"amcheck is not available ({str(exc).strip().splitlines()[0]})"
        indexes = conn.execute(
            "SELECT c.oid, c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE a.amname = 'btree' AND c.relkind = 'i' AND i.indisvalid AND c.relpersistence = 'p' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'"
        ).fetchall()
        problems = []
        for done, (oid, name) in enumerate(indexes):
            if on_index is not None:
                on_index(done, len(indexes), name)
            try:
                conn.execute("SELECT bt_index_check(%s)", [oid])
            except psycopg.errors.InsufficientPrivilege:  # amcheck is there, its functions not granted
                return 0, [], f"{user} may not run bt_index_check; " + AMCHECK_FOR_NON_SUPERUSERS.format(user=user)
            except psycopg.Error as exc:
                problems.append(f"index {name} is corrupt: {str(exc).strip().splitlines()[0]}")
        return len(indexes), problems, None
    finally:
        conn.close()


def resolve_production_aliases(url, expect_registry: bool = True,
                               on_step: Callable[[int, int, str], None] | None = None) -> tuple[int, list[str]]:
    """Through MLflow's own client on the restored backend: every registered model with a
    `production` alias must resolve to a version. (resolved, problems); `on_step(done, total,
    what)` before each step: MLflow's import and its store's opening (most of the time: about
    0.8 s and 0.9 s here, its SQL store imports alembic and checks its schema), then each model."""
    tell = on_step or (lambda done, total, what: None)
    conn = psycopg_connect(url, autocommit=True, source="restored MLflow database")
    try:
        exists = conn.execute("SELECT to_regclass('registered_model_aliases') IS NOT NULL").fetchone()[0]
        if not exists:
            problem = "the restored MLflow database has no registered_model_aliases table"
            return 0, [problem] if expect_registry else []
        aliased = [r[0] for r in conn.execute(
            "SELECT name FROM registered_model_aliases WHERE alias = 'production' ORDER BY name"
        ).fetchall()]
    finally:
        conn.close()
    if not aliased:
        return 0, []
    steps = len(aliased) + 2
    tell(0, steps, "importing mlflow")
    from mlflow.tracking import MlflowClient

    uri = url.render_as_string(hide_password=False)
    tell(1, steps, "opening the restored registry")
    # The registry URI too: left out, MLflow takes the process-wide one (mlflow.set_registry_uri,
    # which Maestro's MLflow resource sets in the same Dagster process) and checks the live
    # registry instead of the restored one.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    problems = []
    for done, name in enumerate(aliased, start=2):
        tell(done, steps, f"{name}@production")
        try:
            version = client.get_model_version_by_alias(name, "production")
            if not version.version:
                problems.append(f"model {name}: alias production resolves to no version")
        except Exception as exc:  # MLflow raises its own exception types
            detail = hide_secret((str(exc).strip().splitlines() or [""])[0][:200], url.password)
            problems.append(f"model {name}: alias production does not resolve ({type(exc).__name__}: {detail})")
    return len(aliased) - len(problems), problems


def _warm_mlflow() -> threading.Thread:
    """Import MLflow's client and SQL stores in the background while pg_restore works (a
    subprocess: this process mostly waits): the imports are most of the smoke test's time,
    about 1.5 s here against 0.05 s for its queries, and would otherwise add to the RTO."""
    def load() -> None:
        try:
            import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
            import mlflow.tracking  # noqa: F401
        except Exception:  # the smoke test imports them again and reports the failure
            pass

    thread = threading.Thread(target=load, name="maestro-warm-mlflow", daemon=True)
    thread.start()
    return thread


def run_drill(
    store: ObjectStore,
    destinations: list[DatabaseTarget],
    rto_target: timedelta = DEFAULT_RTO_TARGET,
    rpo_target: timedelta = DEFAULT_RPO_TARGET,
    jobs: int = 2,
    workdir: Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    backup: str = "latest",
    source: str = "library",
    run_id: str | None = None,
    phases: PhaseProgress | None = None,
) -> DrillReport:
    """Restore `backup` (newest verified by default) into scratch databases next to
    `destinations`, verify it, measure RTO and RPO, drop the scratch databases, and record
    the drill in the store (backup.drill_history), failed ones too: `source` says where it
    ran (cli, dagster with its `run_id`, library), `report.record_key` where it is recorded."""
    say = log or (lambda message: None)
    check_restore_request(SCRATCH, None, jobs)  # refused before the store is read: no half-run drill
    report = DrillReport(utcnow(), rto_target.total_seconds(), rpo_target.total_seconds())
    try:
        _drill(report, store, destinations, jobs, workdir, progress, say, backup, phases)
    except Exception as exc:  # no verified backup, a server gone mid-drill: a failed drill, recorded
        detail = str(exc) if isinstance(exc, MaestroError) else f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        for destination in destinations:
            detail = hide_secret(detail, destination.url.password)
        report.problems.append(detail)
        _record(store, report, source, run_id, say)
        raise
    _record(store, report, source, run_id, say)
    return report


def _record(store: ObjectStore, report: DrillReport, source: str, run_id: str | None, say) -> None:
    """The drill into the store's history; a store that refuses it does not hide the drill's result."""
    from maestro_pipelines.backup.drill_history import drill_record, record_drill

    try:
        report.record_key = record_drill(store, drill_record(report, source, run_id))
    except MaestroError as exc:
        report.notes.append(f"the drill could not be recorded in the store: {exc}")
        say(f"drill: {report.notes[-1]}")


def _counted(phases: PhaseProgress | None, name: str, unit: str):
    return None if phases is None else (lambda done, total, current: phases(Phase(name, done, total, unit, current)))


def _drill(report: DrillReport, store: ObjectStore, destinations: list[DatabaseTarget], jobs: int,
           workdir: Path | None, progress: Progress | None, say: Callable[[str], None], backup: str,
           phases: PhaseProgress | None = None) -> None:
    """The drill's steps, filling `report`; the scratch databases are dropped whatever happens."""
    started = time.monotonic()
    restored: RestoreReport | None = None
    try:
        def skipped(message: str) -> None:
            say(f"drill: {message}")
            report.notes.append(message)

        entry = resolve_restore_point(store, backup, log=skipped)
        report.backup_id = entry.backup_id
        report.snapshot_at = entry.manifest.snapshot_at
        report.rpo_s = (report.started_at - report.snapshot_at).total_seconds()
        warming = _warm_mlflow() if any(d.role == "mlflow" for d in destinations) else None
        try:  # restore_backup says what it restores once its checks pass
            restored = restore_backup(store, entry, destinations, jobs=jobs, workdir=workdir, progress=progress, log=say,
                                      phases=phases)
        except MaestroError as exc:
            report.problems.append(str(exc))
            return
        report.restored = True
        report.steps.extend(restored.steps)
        report.notes.extend(restored.notes)
        if restored.missing_artifacts:
            report.problems.append(
                f"{len(restored.missing_artifacts)} model artifacts of the backup are missing from the store: "
                + ", ".join(restored.missing_artifacts[:5])
            )
        for db in restored.databases:
            _check_restored(report, entry, db, warming, phases)
        report.rto_s = time.monotonic() - started
    finally:
        if restored is not None:
            _drop_scratch(report, restored, phases)


def _check_restored(report: DrillReport, entry, db, warming: threading.Thread | None,
                    phases: PhaseProgress | None) -> None:
    """The steps `amcheck <role>` and, for MLflow's database, `mlflow registry smoke test`."""
    def amcheck(name: str = f"amcheck {db.role}") -> str:
        checked, problems, skipped = check_indexes(db.url, _counted(phases, name, "indexes"))
        report.indexes_checked += checked
        report.problems.extend(f"{db.role}: {p}" for p in problems)
        if skipped and f"btree indexes not checked: {skipped}" not in report.notes:  # once, not per database
            report.notes.append(f"btree indexes not checked: {skipped}")
        return f"{checked} btree indexes"

    timed(report, f"amcheck {db.role}", amcheck, phases)
    if db.role == "mlflow":
        def smoke_test(name: str = "mlflow registry smoke test") -> str:
            if warming is not None:
                warming.join()  # never two threads importing the same modules
            dumped = entry.manifest.database("mlflow").tables
            resolved, problems = resolve_production_aliases(
                db.url, expect_registry=any(t.name == "registered_model_aliases" for t in dumped),
                on_step=_counted(phases, name, "steps"),
            )
            report.aliases_resolved = resolved
            report.problems.extend(f"mlflow: {p}" for p in problems)
            return f"{resolved} production aliases resolve"

        timed(report, "mlflow registry smoke test", smoke_test, phases)
    report.databases.append({"role": db.role, "restored_as": db.restored_as, "tables": db.tables, "rows": db.rows})


def _drop_scratch(report: DrillReport, restored: RestoreReport, phases: PhaseProgress | None) -> None:
    """The step `drop scratch databases`: always, and a failure is a note, never the drill's result."""
    def drop_scratch() -> str:
        for db in restored.databases:
            try:
                drop_database(db.url, db.restored_as)
            except Exception as exc:  # reported, never hides the drill's result
                report.notes.append(f"could not drop scratch database {db.restored_as}: {exc}")
        return ""

    timed(report, "drop scratch databases", drop_scratch, phases)
