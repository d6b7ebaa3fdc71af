"""Phase 4, verify: each restored database against the manifest, and the model artifacts.

Row counts and content checksums of every table are computed in the scratch database with
the same session settings as at backup time (`CHECKSUM_SESSION_OPTIONS`) and compared with
the manifest's (most of them already taken while pg_restore loaded the other tables and built
the indexes: `consistency.TableChecksBeside`, started by the load phase); any difference fails the restore before a swap. The artifacts the backup
listed (MLflow's models) must still be in the store: missing ones are reported, not fatal.
The list itself (artifacts.json, sealed in an encrypted backup) is read and authenticated by
the fetch, before any database is created.
"""

from __future__ import annotations

import json
from typing import Any

from maestro_pipelines.backup.catalog import BackupEntry, object_key
from maestro_pipelines.backup.consistency import compare_checks, partition_roots, table_checks_concurrently
from maestro_pipelines.backup.pgtools import CHECKSUM_SESSION_OPTIONS
from maestro_pipelines.backup.restore.state import DatabasePlan, RestoreError, RestoreState
from maestro_pipelines.backup.sealing import open_object
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.storage import ObjectStore


def connect_for_checks(plan: DatabasePlan):
    """A connection to the scratch database with the session settings the backup's checks had."""
    return psycopg_connect(plan.scratch_url, options=CHECKSUM_SESSION_OPTIONS, source=plan.dest.source)


def verify_database(state: RestoreState, plan: DatabasePlan) -> None:
    """The step `verify <role>`: counts and checksums of the scratch database equal to the
    manifest's, else a RestoreError (the live database untouched)."""
    dump, result = plan.dump, plan.result

    def verify_one() -> str:
        # The tables checked while pg_restore ran are taken as they are; the rest over one
        # connection per pg_restore job: the server is otherwise idle now, and one query keeps
        # one core busy.
        beside = plan.checks_beside.stop() if plan.checks_beside is not None else {}
        checks = table_checks_concurrently(
            lambda: connect_for_checks(plan),
            checksums=any(t.checksum for t in dump.tables), workers=state.jobs, done=beside,
        )
        result.problems = compare_checks(dump.tables, checks, _partition_roots(plan))
        result.tables = len(checks)
        result.rows = sum(t.rows for t in checks)
        during = f" ({len(beside)} of them while pg_restore ran)" if beside else ""
        return f"{result.tables} tables{during}, {result.rows:,} rows compared: " + (
            "equal to the manifest" if not result.problems else f"{len(result.problems)} differences"
        )

    state.timed(f"verify {dump.role}", verify_one)
    if result.problems:
        raise RestoreError(
            f"The restored {dump.role} database does not match backup {state.entry.backup_id}: "
            + "; ".join(result.problems[:5]),
            "The live database was not touched; pick another restore point",
        )
    result.url = plan.scratch_url


def _partition_roots(plan: DatabasePlan) -> dict[str, str]:
    with psycopg_connect(plan.scratch_url, source=plan.dest.source) as connection, connection.cursor() as cursor:
        return partition_roots(cursor)


def read_artifact_list(store: ObjectStore, entry: BackupEntry) -> dict[str, Any] | None:
    """The backup's artifact list (artifacts.json), read through its seal when the backup is
    encrypted; None when it has none. SealBroken, ChecksumMismatch, ValueError when damaged."""
    manifest = entry.manifest
    if manifest is None or manifest.artifacts is None:
        return None
    key = object_key(entry, manifest.artifacts.key)
    with open_object(store, key, entry.data_key, f"{key} of backup {entry.backup_id}",
                     sealed_only=entry.encrypted) as reader:
        return json.loads(reader.read())


def check_artifacts(store: ObjectStore, entry: BackupEntry,
                    listing: dict[str, Any] | None = None) -> tuple[int, list[str]]:
    """(artifacts listed, keys missing or changed in the store) for the backup's artifact
    manifest (`listing`: already read by the fetch)."""
    body = listing if listing is not None else read_artifact_list(store, entry)
    if body is None:
        return 0, []
    present = {info.key: info for info in store.list(body["prefix"], with_metadata=False)}
    missing = []
    for item in body["objects"]:
        info = present.get(item["key"])
        if info is None:
            missing.append(item["key"])
        elif info.size != item["size"]:
            missing.append(f"{item['key']} (size {info.size}, the backup recorded {item['size']})")
    return len(body["objects"]), missing


def verify_artifacts(state: RestoreState) -> None:
    """The step `artifacts`: the model artifacts the backup listed, present in the store."""
    report = state.report

    def artifacts() -> str:
        report.artifacts_checked, report.missing_artifacts = check_artifacts(state.store, state.entry,
                                                                             state.artifact_list)
        if report.missing_artifacts:
            return f"{len(report.missing_artifacts)} of {report.artifacts_checked} model artifacts missing"
        return f"all {report.artifacts_checked} model artifacts present"

    state.timed("artifacts", artifacts)
