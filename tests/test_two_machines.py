"""Two machines that share only what a deployment shares: one PostgreSQL server (Dagster's
storage through deploy/dagster.yaml, the platform database, MLflow's backend beside it) and an
S3 store (moto over real HTTP: asset values under values/, MLflow's artifacts under
mlflow-artifacts/). Each machine has its own DAGSTER_HOME, MAESTRO_HOME, working directory and
TMPDIR, and runs `dagster asset materialize` as an operator (or a Kubernetes run pod) does.

Machine A trains tenant acme up to its deployment; then its local folders are deleted. Machine
B scores acme's rows alone (batch_predictions), then registers and deploys again from the
values A stored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for

from .conftest import create_database, drop_database
from .stores.conftest import AWS, fresh_name
from .test_daemon_runs import SEED

REPO_ROOT = Path(__file__).parent.parent
VENV_BIN = Path(sys.executable).parent
TENANT = "acme"
STORE_PREFIX = "maestro"
TRAINING = ["training_data", "features", "trained_model", "model_evaluation", "registered_model", "deployment"]


@pytest.fixture
def shared(pg15, moto_endpoint):
    """What both machines reach: databases on one PostgreSQL server, one S3 bucket."""
    import boto3

    dagster_db, platform_db = create_database(pg15, "dagster"), create_database(pg15, "platform")
    bucket = fresh_name()
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, **AWS)
    s3.create_bucket(Bucket=bucket)
    env = {
        "MAESTRO_DAGSTER_DATABASE_URL": pg15.libpq_url(dagster_db),
        "MAESTRO_DATABASE_URL": pg15.libpq_url(platform_db),
        "MAESTRO_STORE_URL": f"s3://{bucket}/{STORE_PREFIX}",
        "AWS_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": AWS["region_name"],
        "AWS_ACCESS_KEY_ID": AWS["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": AWS["aws_secret_access_key"],
    }
    yield env, pg15.admin_url.set(database=platform_db), (s3, bucket)
    for name in (f"{platform_db}_mlflow", platform_db, dagster_db):
        drop_database(pg15, name)


def machine(root: Path, shared_env: dict) -> dict:
    """A machine's environment: its own folders (created here), the shared services."""
    for folder in ("dagster_home", "maestro_home", "work", "tmp"):
        (root / folder).mkdir(parents=True)
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_", "AWS_"))}
    return {**clean, **shared_env, "DAGSTER_HOME": str(root / "dagster_home"),
            "MAESTRO_HOME": str(root / "maestro_home"), "TMPDIR": str(root / "tmp"), "CWD": str(root / "work")}


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=env["CWD"], env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"{' '.join(args[:4])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def materialize(env: dict, assets: list[str], *extra: str) -> subprocess.CompletedProcess:
    return run(env, str(VENV_BIN / "dagster"), "asset", "materialize", "-m", "maestro_pipelines.definitions",
               "--select", ",".join(assets), "--partition", TENANT, *extra)


def stored_keys(s3_bucket) -> set[str]:
    s3, bucket = s3_bucket
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{STORE_PREFIX}/"):
        keys |= {item["Key"].removeprefix(f"{STORE_PREFIX}/") for item in page.get("Contents", [])}
    return keys


def test_a_second_machine_scores_and_redeploys_from_what_the_first_stored(shared, tmp_path):
    shared_env, platform_url, s3_bucket = shared
    a = machine(tmp_path / "a", shared_env)
    run(a, sys.executable, "-c", SEED, TENANT)
    materialize(a, TRAINING)
    keys = stored_keys(s3_bucket)
    assert {f"values/{asset}/{TENANT}" for asset in TRAINING[:4]} <= keys
    assert not {f"values/{asset}/{TENANT}" for asset in ("registered_model", "deployment")} & keys
    assert any(key.startswith(f"mlflow-artifacts/{TENANT}/") for key in keys)  # the model, beside the values
    shutil.rmtree(tmp_path / "a")  # A is gone: its DAGSTER_HOME/storage, MAESTRO_HOME, working directory

    b = machine(tmp_path / "b", shared_env)
    materialize(b, ["batch_predictions"])  # each step in a process of its own, as the daemon runs it
    with engine_for(platform_url).connect() as conn:
        scored = conn.execute(text(
            "SELECT count(*), min(v.version), max(v.version) FROM predictions p "
            "JOIN model_versions v ON v.id = p.model_version_id JOIN tenants t ON t.id = p.tenant_id "
            "WHERE t.name = :t"), {"t": TENANT}).one()
    assert scored[0] > 0 and scored[1] == scored[2] == 1

    materialize(b, ["registered_model", "deployment"])  # from A's stored values
    with engine_for(platform_url).connect() as conn:
        deployed = conn.execute(text(
            "SELECT v.version, d.status FROM deployments d JOIN model_versions v ON v.id = d.model_version_id "
            "JOIN tenants t ON t.id = d.tenant_id WHERE t.name = :t ORDER BY d.id"), {"t": TENANT}).all()
        runs = conn.execute(text(
            "SELECT count(DISTINCT e.mlflow_run_id) FROM model_versions v JOIN experiments e ON e.id = v.experiment_id "
            "JOIN tenants t ON t.id = v.tenant_id WHERE t.name = :t"), {"t": TENANT}).scalar_one()
    assert [tuple(row) for row in deployed] == [(1, "retired"), (2, "active")]
    assert runs == 1  # version 2 is A's training, registered again: nothing was trained on B
