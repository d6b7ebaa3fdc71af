"""Taking a backup of every database Maestro owns, and what its manifest promises.

Against the embedded PostgreSQL 18 and Debian's 15, into a local folder and S3 (moto).
"""

from __future__ import annotations

import json

import zstandard

from maestro_pipelines.backup import backup_targets, create_backup, get_backup, list_backups
from maestro_pipelines.backup.manifest import ARTIFACTS_NAME, DUMP_SUFFIX, MANIFEST_NAME
from maestro_pipelines.backup.sealing import unencrypted_warning
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.settings import Settings
from tests.backup.conftest import ARTIFACTS, Databases, count_rows, keys, read_raw, sha256_hex


def seed_platform(dbs: Databases, database: str) -> None:
    """A few rows in every platform table, predictions in two partitions."""
    dbs.execute(
        database,
        "INSERT INTO tenants (name) VALUES ('acme'), ('globex'), ('initech')",
        "INSERT INTO models (tenant_id, name, description, registry_name) "
        "SELECT id, 'churn', 'Predicts churn', 'maestro-' || name FROM tenants",
        "INSERT INTO experiments (tenant_id, model_id, name, status, finished_at) "
        "SELECT tenant_id, id, 'run-1', 'succeeded', now() FROM models",
        "INSERT INTO model_versions (model_id, tenant_id, version, status) "
        "SELECT id, tenant_id, v, 'registered' FROM models, generate_series(1, 2) v",
        "INSERT INTO deployments (tenant_id, model_id, model_version_id, status) "
        "SELECT tenant_id, model_id, id, 'active' FROM model_versions WHERE version = 2",
        "INSERT INTO predictions (tenant_id, model_version_id, entity_key, score, created_at) "
        "SELECT 1, 1, 'row-' || g, g / 7.0, now() FROM generate_series(1, 250) g",
        # Far in the past: lands in the default partition.
        "INSERT INTO predictions (tenant_id, model_version_id, entity_key, score, created_at) "
        "VALUES (1, 1, 'old', 0.5, '1999-01-01T00:00:00Z')",
    )


def make_mlflow_and_dagster(dbs: Databases, platform: str) -> tuple[str, str]:
    """Stand-ins for MLflow's backend (`<platform>_mlflow`) and Dagster's storage."""
    mlflow = dbs.create(f"{platform}_mlflow")
    dbs.execute(
        mlflow,
        "CREATE TABLE experiments (experiment_id serial PRIMARY KEY, name text UNIQUE NOT NULL)",
        "CREATE TABLE runs (run_uuid text PRIMARY KEY, experiment_id int REFERENCES experiments, "
        "status text, start_time bigint)",
        "CREATE TABLE metrics (key text, value double precision, run_uuid text REFERENCES runs, step bigint)",
        "INSERT INTO experiments (name) VALUES ('acme'), ('globex')",
        "INSERT INTO runs SELECT md5(g::text), 1 + g % 2, 'FINISHED', g FROM generate_series(1, 40) g",
        "INSERT INTO metrics SELECT 'auc', random(), md5((1 + g % 40)::text), g FROM generate_series(1, 400) g",
    )
    dagster = dbs.create(f"{platform}_dagster")
    dbs.execute(
        dagster,
        "CREATE TABLE runs (id bigserial PRIMARY KEY, run_id text UNIQUE, status text, run_body text)",
        "CREATE TABLE event_logs (id bigserial PRIMARY KEY, run_id text, event text, timestamp timestamp)",
        "INSERT INTO runs (run_id, status, run_body) SELECT 'run-' || g, 'SUCCESS', repeat('x', 200) "
        "FROM generate_series(1, 30) g",
        "INSERT INTO event_logs (run_id, event, timestamp) SELECT 'run-' || (g % 30), 'STEP_SUCCESS', now() "
        "FROM generate_series(1, 600) g",
    )
    return mlflow, dagster


def put_artifacts(case) -> dict[str, bytes]:
    """Artifacts as MLflow leaves them: some through the store, some written directly."""
    written = {
        f"{ARTIFACTS}1/aaa/artifacts/model.pkl": bytes(range(256)) * 40,
        f"{ARTIFACTS}1/aaa/artifacts/MLmodel": b"flavors:\n  sklearn: {}\n",
    }
    for key, data in written.items():
        case.store.put_bytes(key, data)
    raw = {
        f"{ARTIFACTS}2/bbb/artifacts/model.pkl": b"written by MLflow itself " * 100,
        f"{ARTIFACTS}2/bbb/artifacts/requirements.txt": b"scikit-learn==1.5\n",
    }
    for key, data in raw.items():
        case.write_raw(key, data)  # no sha256 recorded: the backup must hash them itself
    case.store.put_bytes("elsewhere/not-an-artifact.bin", b"outside the artifact prefix")
    return {**written, **raw}


def test_backup_of_every_database_matches_the_store_and_the_databases(databases, case, tmp_path):
    """A backup holds the platform, MLflow and Dagster databases; every size, sha256 and row
    count in its manifest is what the store and the databases really hold, so a user can
    trust the manifest when choosing what to restore."""
    dbs = databases
    platform = dbs.create()
    location = dbs.location(platform)
    upgrade(location)
    seed_platform(dbs, platform)
    mlflow, dagster = make_mlflow_and_dagster(dbs, platform)
    artifacts = put_artifacts(case)
    settings = Settings(
        home=tmp_path, database_url=dbs.server.libpq_url(platform),
        dagster_database_url=dbs.server.libpq_url(dagster),
    )

    targets, notes = backup_targets(settings, location)
    assert [(t.role, t.database) for t in targets] == [("platform", platform), ("mlflow", mlflow), ("dagster", dagster)]
    assert notes == []
    manifest = create_backup(case.store, targets, notes=["nightly"])

    root = f"backups/{manifest.backup_id}"
    assert keys(case.store, "backups/") == sorted(
        [f"{root}/{MANIFEST_NAME}", f"{root}/{ARTIFACTS_NAME}"]
        + [f"{root}/{role}{DUMP_SUFFIX}" for role in ("platform", "mlflow", "dagster")]
    )
    assert keys(case.store, "activity/") == [], "the in-progress marker outlived the backup"

    stored = get_backup(case.store, manifest.backup_id).manifest
    assert stored.to_dict() == manifest.to_dict()
    # A cloud store without a backup key: every backup's notes say it is not encrypted.
    unencrypted = [unencrypted_warning(case.store)] if case.name == "s3" else []
    assert manifest.notes == ["nightly"] + unencrypted
    assert manifest.pg_dump_version.startswith("18")
    server_version = dbs.scalar(platform, "SHOW server_version")
    for dump, database in zip(manifest.databases, (platform, mlflow, dagster)):
        assert (dump.key, dump.database) == (f"{root}/{dump.role}{DUMP_SUFFIX}", database)
        raw = read_raw(case, dump.key)
        assert len(raw) == dump.compressed_bytes == case.store.head(dump.key).size
        assert sha256_hex(raw) == dump.sha256
        assert len(zstandard.ZstdDecompressor().decompressobj().decompress(raw)) == dump.dump_bytes
        assert (dump.server_version, dump.server_major) == (server_version, dbs.server.major_version)
        password = dbs.server.admin_url.password
        assert password is None or str(password) not in json.dumps(manifest.to_dict())
        assert {t.qualified: t.rows for t in dump.tables} == count_rows(dbs, database)
        assert all(t.checksum is not None for t in dump.tables)

    platform_rows = {t.qualified: t.rows for t in manifest.database("platform").tables}
    partitions = {name: rows for name, rows in platform_rows.items() if name.startswith("public.predictions_")}
    assert sum(partitions.values()) == 251 and platform_rows["public.predictions_default"] == 1
    assert platform_rows["public.tenants"] == 3 and platform_rows["public.alembic_version"] == 1

    record = manifest.artifacts
    raw_record = read_raw(case, record.key)
    assert (len(raw_record), sha256_hex(raw_record)) == (record.size, record.sha256)
    listed = json.loads(raw_record)
    assert listed["prefix"] == ARTIFACTS
    assert sorted((o["key"], o["size"], o["sha256"]) for o in listed["objects"]) == sorted(
        (key, len(data), sha256_hex(data)) for key, data in artifacts.items()
    )
    assert (record.count, record.total_bytes) == (4, sum(len(d) for d in artifacts.values()))
    assert [e.backup_id for e in list_backups(case.store)] == [manifest.backup_id]


def test_backup_targets_follow_the_settings(pg18_databases, tmp_path):
    """`backup_targets` backs up MLflow's database only once it exists and Dagster's only
    when MAESTRO_DAGSTER_DATABASE_URL names it, and says why something is left out."""
    dbs = pg18_databases
    platform = dbs.create()
    location = dbs.location(platform)
    url = dbs.server.libpq_url(platform)

    targets, notes = backup_targets(Settings(home=tmp_path, database_url=url), location)
    assert [t.role for t in targets] == ["platform"]
    assert targets[0].source == "MAESTRO_DATABASE_URL"
    assert any(f"'{platform}_mlflow' does not exist" in n for n in notes)
    assert any("MAESTRO_DAGSTER_DATABASE_URL unset" in n for n in notes)

    dbs.create(f"{platform}_mlflow")
    dagster = dbs.server.libpq_url(dbs.create())
    targets, notes = backup_targets(Settings(home=tmp_path, database_url=url, dagster_database_url=dagster), location)
    assert [(t.role, t.database, t.source) for t in targets] == [
        ("platform", platform, "MAESTRO_DATABASE_URL"),
        ("mlflow", f"{platform}_mlflow", "MAESTRO_DATABASE_URL"),
        ("dagster", dbs.names[-1], "MAESTRO_DAGSTER_DATABASE_URL"),
    ]
    assert notes == []

    elsewhere = dbs.create()
    targets, notes = backup_targets(
        Settings(home=tmp_path, database_url=url, mlflow_tracking_uri=dbs.server.libpq_url(elsewhere)), location
    )
    assert [(t.role, t.database, t.source) for t in targets][1] == ("mlflow", elsewhere, "MLFLOW_TRACKING_URI")

    targets, notes = backup_targets(
        Settings(home=tmp_path, database_url=url, mlflow_tracking_uri="http://mlflow.internal:5000"), location
    )
    assert [t.role for t in targets] == ["platform"]
    assert any("MLFLOW_TRACKING_URI is not a PostgreSQL database" in n for n in notes)
