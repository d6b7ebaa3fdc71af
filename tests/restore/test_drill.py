"""The DR drill: a scratch restore of the newest verified backup, proven (row checks,
amcheck, MLflow's registry resolving `production`), timed against the RTO and RPO targets,
and cleaned up whatever the outcome."""

from __future__ import annotations

import json
import os
from datetime import timedelta

from maestro_pipelines.backup import get_backup, restore_backup, restore_cleanup, run_drill, verify_backup
from tests.backup.conftest import ARTIFACTS
from tests.restore.conftest import database_names
from tests.stores.conftest import LocalCase


def verified_backup(inst, store):
    manifest = inst.backup(store)
    assert verify_backup(store, manifest.backup_id).ok
    return manifest


def test_drill_on_a_good_backup_passes_and_leaves_nothing(mlflow_installation, local_case):
    """On a good backup the drill is ok: RTO and RPO measured and within target, every
    btree index checked by amcheck, the MLflow model aliased `production` resolves through
    MLflow's own client on the restored registry, and the scratch databases are gone after."""
    inst = mlflow_installation
    store = local_case.store
    manifest = verified_backup(inst, store)

    report = run_drill(store, inst.destinations(), rto_target=timedelta(minutes=5), rpo_target=timedelta(hours=1))

    assert report.ok, report.failures()
    assert report.failures() == [] and report.problems == []
    assert report.backup_id == manifest.backup_id and report.snapshot_at == manifest.snapshot_at
    assert 0 < report.rto_s < 300
    assert 0 <= report.rpo_s < 3600
    assert report.indexes_checked > 0, report.notes
    assert report.aliases_resolved == 1
    assert [(d["role"], d["rows"]) for d in report.databases] == [
        ("platform", manifest.database("platform").rows), ("mlflow", manifest.database("mlflow").rows)
    ]
    steps = [s.name for s in report.steps]
    for name in ("download and check", "pg_restore platform", "verify mlflow", "amcheck platform", "amcheck mlflow",
                 "mlflow registry smoke test", "drop scratch databases"):
        assert name in steps
    assert json.loads(json.dumps(report.as_dict()))["ok"] is True
    assert inst.leftovers() == [], "the drill left its scratch databases"
    assert database_names(inst.dbs, inst.platform) == sorted(inst.names)


def test_drill_over_its_rto_target_fails_with_the_reason(pg18_mlflow_installation, local_case):
    """A drill that restores fine but takes longer than the RTO target is not ok, and its
    failures say the RTO was missed (what the alert shows)."""
    inst = pg18_mlflow_installation
    store = local_case.store
    verified_backup(inst, store)

    report = run_drill(store, inst.destinations(), rto_target=timedelta(milliseconds=1))

    assert not report.ok
    assert report.problems == [] and report.rpo_ok and not report.rto_ok
    [failure] = report.failures()
    assert failure.startswith("RTO ") and "over the target" in failure
    assert report.as_dict()["problems"] == [failure]
    assert inst.leftovers() == []


def test_drill_checks_the_restored_registry_in_a_process_that_set_its_own(pg18_mlflow_installation, local_case,
                                                                        monkeypatch):
    """In a Dagster run worker Maestro's MLflow resource has set the process-wide registry URI
    (mlflow.set_registry_uri) to the live registry; the drill's smoke test must still ask the
    restored registry. Here the process-wide one points at a database that does not exist."""
    import mlflow.tracking._model_registry.utils as registry_utils

    inst = pg18_mlflow_installation
    store = local_case.store
    verified_backup(inst, store)
    elsewhere = inst.dbs.url("no_such_registry").set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    monkeypatch.setattr(registry_utils, "_registry_uri", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)

    report = run_drill(store, inst.destinations())

    assert report.ok, report.failures()
    assert report.aliases_resolved == 1


def test_drill_on_a_corrupted_backup_fails_and_leaves_nothing(pg18_installation, case):
    """A verified backup whose dump rotted afterwards (one byte; size, the store's record and,
    locally, the file's mtime as they were, so no head can see it) fails the drill with the
    damaged object named in its problems; no scratch database is left behind."""
    inst = pg18_installation
    store = case.store
    manifest = verified_backup(inst, store)
    key = manifest.database("mlflow").key
    path = case.root.joinpath(*key.split("/")) if isinstance(case, LocalCase) else None
    written = path.stat() if path else None
    case.corrupt(key)
    if path:
        os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))

    report = run_drill(store, inst.destinations())

    assert not report.ok
    assert report.backup_id == manifest.backup_id
    assert any(manifest.database("mlflow").key in p for p in report.problems), report.problems
    assert report.failures()[: len(report.problems)] == report.problems
    assert inst.leftovers() == []
    assert database_names(inst.dbs, inst.platform) == sorted(inst.names)


def test_missing_model_artifacts_are_reported(pg18_installation, case):
    """Model artifacts listed in the backup's artifact manifest but since deleted (or
    replaced by a different size) are named by the restore report, and fail the drill:
    a registry restored without its artifacts cannot serve its models."""
    inst = pg18_installation
    store = case.store
    kept, deleted, changed = (f"{ARTIFACTS}1/{run}/artifacts/model.pkl" for run in ("aaa", "bbb", "ccc"))
    for key in (kept, deleted, changed):
        store.put_bytes(key, b"weights " * 64)
    manifest = verified_backup(inst, store)
    store.delete(deleted)
    store.put_bytes(changed, b"other weights")

    report = restore_backup(store, get_backup(store, manifest.backup_id), inst.destinations(), roles=["platform"])
    assert report.artifacts_checked == 3
    assert report.missing_artifacts == [deleted, f"{changed} (size 13, the backup recorded 512)"]
    assert report.step_seconds()["artifacts"] >= 0
    assert [s.detail for s in report.steps if s.name == "artifacts"] == ["2 of 3 model artifacts missing"]
    restore_cleanup(inst.destinations())

    drill = run_drill(store, inst.destinations())
    assert not drill.ok
    assert any(deleted in p and "missing" in p for p in drill.problems), drill.problems
