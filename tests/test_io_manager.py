"""Asset values in the object store (`StoredValuesIOManager`), on a local folder store and on S3
(moto over real HTTP): each kind of value the ML graph passes round-trips through a run of its
own, a damaged or missing value fails the step at once with one line, and the backups' listing
and retention leave `values/` alone."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import dagster as dg
import pandas as pd
import pytest

from maestro_pipelines.assets.ml import ModelEvaluation, TrainedModel
from maestro_pipelines.ml.features import build_feature_set
from maestro_pipelines.resources import ObjectStoreResource
from maestro_pipelines.resources.values_io import StoredValuesIOManager
from tests.stores.conftest import AWS, PREFIX, LocalCase, S3Case
from tests.test_cli import run_maestro

TENANT = "acme"
PARTITIONS = dg.StaticPartitionsDefinition([TENANT])
RECEIVED: dict[str, object] = {}


def training_rows() -> pd.DataFrame:
    """Shaped like `training_data` from the default source, plus the awkward columns a wide
    table or another connector brings: lists, dicts of different keys, NaN, a UTC timestamp."""
    count = 40
    return pd.DataFrame({
        "entity_key": [f"acme-{i:05d}" for i in range(count)],
        "features": [{"x": float(i), "y": float(i % 7) / 3} for i in range(count)],
        "extra": [{"a": i} if i % 2 else {"b": [i, "two"]} for i in range(count)],
        "label": [str(i % 2) for i in range(count)],
        "weight": [math.nan if i % 5 == 0 else i / 10 for i in range(count)],
        "updated_at": pd.date_range("2026-11-01", periods=count, freq="h", tz="UTC"),
    })


FEATURES = build_feature_set(TENANT, training_rows(), "label", 0.25)
MODEL = TrainedModel(TENANT, "run-1", "models:/m-0123456789abcdef", {"model_type": "random_forest", "max_depth": "none"},
                     FEATURES.data_hash, FEATURES.feature_names)
EVALUATION = ModelEvaluation(TENANT, "run-1", {"accuracy": 0.9, "roc_auc": math.nan}, {"floors": {"passed": True}})
SETTINGS = {"thresholds": [0.5, 0.7], "note": None}


@dg.asset(partitions_def=PARTITIONS)
def rows() -> pd.DataFrame:
    return training_rows()


@dg.asset(partitions_def=PARTITIONS)
def feature_set():
    return FEATURES


@dg.asset(partitions_def=PARTITIONS)
def model() -> TrainedModel:
    return MODEL


@dg.asset(partitions_def=PARTITIONS)
def evaluation() -> ModelEvaluation:
    return EVALUATION


@dg.asset(partitions_def=PARTITIONS)
def settings():
    return SETTINGS


@dg.asset(partitions_def=PARTITIONS, retry_policy=dg.RetryPolicy(max_retries=3))
def consumer(rows, feature_set, model: TrainedModel, evaluation: ModelEvaluation, settings) -> dg.MaterializeResult:
    RECEIVED.update(rows=rows, feature_set=feature_set, model=model, evaluation=evaluation, settings=settings)
    return dg.MaterializeResult()


PRODUCERS = [rows, feature_set, model, evaluation, settings]
STORED = sorted(f"values/{asset.key.path[0]}/{TENANT}" for asset in PRODUCERS)


@pytest.fixture(params=["local", "s3"])
def value_store(request, tmp_path):
    """(the test's store seen raw, the IO manager over it as a deployment configures it)."""
    if request.param == "local":
        case = LocalCase(tmp_path / "store")
        resource = ObjectStoreResource(url=case.root.as_uri(), retry_attempts=2, retry_backoff_s=0.01)
    else:
        case = S3Case(request.getfixturevalue("moto_endpoint"))
        resource = ObjectStoreResource(url=f"s3://{case.bucket}/{PREFIX}", endpoint_url=case.endpoint,
                                       retry_attempts=2, retry_backoff_s=0.01, **AWS)
    try:
        yield case, StoredValuesIOManager(store=resource)
    finally:
        case.cleanup()


def materialize(io_manager, selection):
    RECEIVED.clear()
    with dg.instance_for_test() as instance:  # each run on an instance of its own: only the store is shared
        return dg.materialize([*PRODUCERS, consumer], selection=selection, partition_key=TENANT, instance=instance,
                              resources={"io_manager": io_manager}, raise_on_error=False)


def step_failure(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    return failure.step_failure_data.user_failure_data.description


def test_each_kind_of_value_comes_back_as_it_was_from_another_run(value_store):
    case, io_manager = value_store
    assert materialize(io_manager, ["*"]).success
    # The consumer alone, on a new instance: every value comes from the store, not from memory.
    assert materialize(io_manager, ["consumer"]).success
    pd.testing.assert_frame_equal(RECEIVED["rows"], training_rows())
    back = RECEIVED["feature_set"]
    for part in ("X_train", "X_test"):
        pd.testing.assert_frame_equal(getattr(back, part), getattr(FEATURES, part))
    for part in ("y_train", "y_test"):
        pd.testing.assert_series_equal(getattr(back, part), getattr(FEATURES, part))
    assert (back.tenant, back.feature_names, back.classes, back.data_hash) == \
        (FEATURES.tenant, FEATURES.feature_names, FEATURES.classes, FEATURES.data_hash)
    assert RECEIVED["model"] == MODEL
    assert RECEIVED["evaluation"] == ModelEvaluation(TENANT, "run-1", {"accuracy": 0.9, "roc_auc": None},
                                                     EVALUATION.gates)
    assert RECEIVED["settings"] == SETTINGS

    # One object per value under values/<asset>/<partition>: Parquet or JSON, never a pickle.
    store = io_manager.store.get_store()
    assert sorted(info.key for info in store.list("values/")) == STORED
    assert store.get_bytes(f"values/rows/{TENANT}")[:4] == b"PAR1"
    assert store.get_bytes(f"values/feature_set/{TENANT}")[:4] == b"PAR1"
    record = json.loads(store.get_bytes(f"values/model/{TENANT}"))
    assert record == {"record": "TrainedModel", "fields": {
        "tenant": TENANT, "mlflow_run_id": "run-1", "model_uri": MODEL.model_uri, "params": MODEL.params,
        "data_hash": FEATURES.data_hash, "feature_names": FEATURES.feature_names}}


def test_a_damaged_value_fails_at_once_with_one_line(value_store):
    case, io_manager = value_store
    assert materialize(io_manager, ["*"]).success
    case.corrupt(f"values/model/{TENANT}")
    failed = materialize(io_manager, ["consumer"])
    assert not failed.success
    message = step_failure(failed)  # and no retry: another read cannot repair it
    assert "\n" not in message
    assert message.startswith(f"the stored value of model for {TENANT} in the store at ")
    assert "is corrupt (sha256" in message and message.endswith(f"Materialize model for {TENANT} again to write it anew")


def test_a_missing_value_names_what_to_materialize_first(tmp_path):
    resource = ObjectStoreResource(url=(tmp_path / "store").as_uri())
    (tmp_path / "store").mkdir()
    failed = materialize(StoredValuesIOManager(store=resource), ["consumer"])
    assert not failed.success
    message = step_failure(failed)  # not retried 3 times: nothing would bring it
    assert "\n" not in message and "FileNotFoundError" not in message
    asset = message.split("no stored value of ", 1)[1].split(" ", 1)[0]
    assert asset in {p.key.path[0] for p in PRODUCERS}
    assert message.endswith(f"Materialize {asset} for {TENANT} first: its value is written there when it is materialized")


def test_a_value_that_cannot_be_stored_is_refused_in_one_line(tmp_path):
    @dg.asset(partitions_def=PARTITIONS)
    def opaque():
        return object()

    with dg.instance_for_test() as instance:
        failed = dg.materialize([opaque], partition_key=TENANT, instance=instance, raise_on_error=False,
                                resources={"io_manager": StoredValuesIOManager(store=ObjectStoreResource(home=str(tmp_path)))})
    message = step_failure(failed)
    assert message.startswith(f"opaque for {TENANT} returned a object that cannot be stored: not JSON")
    assert "dg.MaterializeResult" in message and "\n" not in message
    assert not (tmp_path / "store" / "values").exists()


def test_backup_listing_and_retention_leave_the_values_alone(tmp_path):
    from maestro_pipelines.backup import RetentionPolicy, apply_retention

    (tmp_path / "store").mkdir()
    resource = ObjectStoreResource(url=(tmp_path / "store").as_uri())
    assert materialize(StoredValuesIOManager(store=resource), ["*"]).success
    listed = run_maestro("backup", "list", env={"MAESTRO_STORE_URL": resource.url, "MAESTRO_HOME": str(tmp_path)})
    assert listed.returncode == 0 and listed.stdout.startswith("0 backups in "), listed.stdout + listed.stderr
    plan = apply_retention(resource.get_store(), RetentionPolicy(daily=1, monthly=0),
                           now=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert not plan.delete and not plan.delete_incomplete
    assert sorted(info.key for info in resource.get_store().list("values/")) == STORED
