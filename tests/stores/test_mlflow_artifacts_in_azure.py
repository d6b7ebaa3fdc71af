"""MLflow's model artifacts when the object store is Azure Blob (az://): Maestro derives the
wasbs:// location MLflow needs from AZURE_STORAGE_CONNECTION_STRING, and MLflow's own Azure
artifact repository writes and reads the model there (Azurite over HTTP; the tracking store
is a SQLite file, MLflow's own)."""

from __future__ import annotations

import pytest

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.resources.mlflow import artifact_root_for
from maestro_pipelines.settings import Settings

from .conftest import azurite_connection_string, fresh_name


def test_a_model_logged_with_an_azure_store_lands_in_the_container(azurite_port, tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd
    from azure.storage.blob import BlobServiceClient
    from sklearn.linear_model import LogisticRegression

    from maestro_pipelines.ml.registry import ModelRegistry

    connection = azurite_connection_string(azurite_port)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    container = BlobServiceClient.from_connection_string(connection).create_container(fresh_name())
    settings = Settings(home=tmp_path, database_url=None, store_url=f"az://{container.container_name}/maestro")

    root = artifact_root_for(settings)

    assert root == f"wasbs://{container.container_name}@devstoreaccount1.blob.core.windows.net/maestro/mlflow-artifacts"
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", root)
    X = pd.DataFrame({"a": np.arange(20.0), "b": np.arange(20.0) % 3})
    model = LogisticRegression().fit(X, np.arange(20) % 2)
    run_id, model_uri = registry.log_training_run("acme", model, {"C": 1.0}, X.head(3), {"tenant": "acme"}, {"acc": 1.0})
    blobs = [b.name for b in container.list_blobs(name_starts_with="maestro/mlflow-artifacts/acme/")]
    assert any(name.endswith("MLmodel") for name in blobs), blobs
    import mlflow.sklearn

    loaded = mlflow.sklearn.load_model(model_uri)
    assert list(loaded.predict(X.head(4))) == list(model.predict(X.head(4)))


def test_without_an_account_name_the_error_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "BlobEndpoint=http://127.0.0.1:1/x")
    with pytest.raises(MaestroError, match="AZURE_STORAGE_CONNECTION_STRING names none") as failed:
        artifact_root_for(Settings(home=tmp_path, database_url=None, store_url="az://models/maestro"))
    assert "wasbs://" in failed.value.hint
