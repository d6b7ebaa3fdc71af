"""MLflow: experiments, runs, the model registry and the `production` alias.

Registry stages are deprecated in MLflow 3: a version is promoted by moving the alias
`production` to it, and served as `models:/maestro-<tenant>@production`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from maestro_pipelines.errors import MaestroError

PRODUCTION_ALIAS = "production"


def registry_name(tenant: str) -> str:
    return f"maestro-{tenant}"


def training_run_name(tenant: str, dagster_run_id: str) -> str:
    """The MLflow run (and `experiments` row) of one training: the tenant and the Dagster run
    that trained it, so either UI leads to the other."""
    return f"{tenant}-{dagster_run_id}"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str | None
    tags: dict[str, str]
    source: str | None = None  # the logged model's URI (models:/m-...)


# pg_advisory_lock key: "MLflow creates its tables" (any constant; scoped to one database).
MLFLOW_SCHEMA_LOCK = 7_284_119_003


@contextmanager
def _one_process_at_a_time(tracking_uri: str) -> Iterator[None]:
    """MLflow creates its tables (alembic) when a process first opens a new database; the
    trainings of several tenants starting at once (each step a process of its own) collided
    there ("duplicate key ... pg_type_typname_nsp_index"). On PostgreSQL they take turns,
    holding an advisory lock on that database; an http(s) tracking server needs nothing."""
    if not tracking_uri.startswith("postgresql"):
        yield
        return
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(tracking_uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MLFLOW_SCHEMA_LOCK})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MLFLOW_SCHEMA_LOCK})
    finally:
        engine.dispose()


class ModelRegistry:
    """One MLflow tracking/registry backend; `artifact_root` is where new experiments store."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root.rstrip("/") if artifact_root else None
        self._mlflow = mlflow
        with _one_process_at_a_time(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.client._get_registry_client()  # its store checks the tables too: inside the lock

    # -- experiments and runs -------------------------------------------------------------
    def experiment_id(self, tenant: str) -> str:
        name = registry_name(tenant)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = f"{self.artifact_root}/{tenant}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location, tags={"tenant": tenant})
        except Exception as exc:  # a concurrent run created it first
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise MaestroError(f"cannot create MLflow experiment {name} ({exc})") from None
            return experiment.experiment_id

    def log_training_run(
        self, tenant: str, model, params: dict[str, Any], input_example, tags: dict[str, str], metrics: dict[str, float],
        run_name: str | None = None,
    ) -> tuple[str, str]:
        """Log a run named `run_name` with params, metrics and the model (signature, input
        example); return (run_id, model_uri)."""
        import sklearn
        import skops.io as sio
        from mlflow.models import infer_signature

        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        signature = infer_signature(input_example, model.predict(input_example))
        # We built this model ourselves: tell skops to trust exactly the types it contains.
        trusted = sio.get_untrusted_types(data=sio.dumps(model))
        with mlflow.start_run(experiment_id=self.experiment_id(tenant), run_name=run_name, tags=tags) as run:
            mlflow.log_params(params)
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                # Listing requirements skips a 5 s subprocess that infers them.
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                skops_trusted_types=trusted,
            )
            # After log_model, tied to the logged model: logged before it, log_model copies the
            # run's metrics onto the model by inserting the same rows again, a duplicate-key
            # error MLflow swallows but psycopg reports ("error ignored terminating Pipeline").
            mlflow.log_metrics(metrics, model_id=info.model_id)
        return run.info.run_id, info.model_uri

    def log_evaluation(self, run_id: str, metrics: dict[str, float], pictures: dict[str, bytes]) -> None:
        import math

        finite = {f"test_{k}": v for k, v in metrics.items() if not math.isnan(v)}
        for key, value in finite.items():
            self.client.log_metric(run_id, key, value)
        for name, png in pictures.items():
            self.client.log_image(run_id, _png_to_array(png), artifact_file=f"evaluation/{name}.png")

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    # -- registry -------------------------------------------------------------------------
    def register(self, tenant: str, model_uri: str, run_id: str, tags: dict[str, str]) -> RegisteredVersion:
        name = registry_name(tenant)
        try:
            self.client.get_registered_model(name)
        except Exception:
            try:
                self.client.create_registered_model(name, tags={"tenant": tenant})
            except Exception:
                pass  # created concurrently
        # MLflow resolves a `models:/m-...` source through the process-wide tracking URI, not
        # this client's: in a step process of its own (the multiprocess executor, every
        # production run) nothing else has set it, and the logged model is "not found".
        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._mlflow.set_registry_uri(self.tracking_uri)
        version = self.client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
        return RegisteredVersion(name, int(version.version), run_id, dict(tags))

    def production_version(self, tenant: str) -> RegisteredVersion | None:
        from mlflow.exceptions import MlflowException

        name = registry_name(tenant)
        try:
            version = self.client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
        except MlflowException:
            return None
        return RegisteredVersion(name, int(version.version), version.run_id, dict(version.tags))

    def set_production(self, tenant: str, version: int) -> None:
        self.client.set_registered_model_alias(registry_name(tenant), PRODUCTION_ALIAS, str(version))

    def load_production_model(self, tenant: str):
        import mlflow.sklearn

        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.sklearn.load_model(f"models:/{registry_name(tenant)}@{PRODUCTION_ALIAS}")

    def load_model(self, model_uri: str, what: str):
        """The model logged at `model_uri` (a trained model's record names it), read from
        MLflow's artifacts (the object store): the models are never pickled with the values.
        One line naming `what` and its URI when MLflow no longer has it (a restore of MLflow
        from before the training, say)."""
        import mlflow.sklearn
        from mlflow.exceptions import MlflowException

        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._mlflow.set_registry_uri(self.tracking_uri)
        try:
            return mlflow.sklearn.load_model(model_uri)
        except (MlflowException, OSError) as exc:
            cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise MaestroError(
                f"MLflow has no model {model_uri} for {what} ({cause})",
                f"Materialize {what} again to train and log a new model",
            ) from None

    def model_version(self, tenant: str, version: int) -> RegisteredVersion:
        found = self.client.get_model_version(registry_name(tenant), str(version))
        return RegisteredVersion(found.name, int(found.version), found.run_id, dict(found.tags), found.source)

    def ui_url(self, configured: str | None) -> str | None:
        """The MLflow UI's address: the configured one (MAESTRO_MLFLOW_UI_URL), else the
        tracking server's when MLflow is one (http/https); None for a database backend."""
        if configured:
            return configured.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return None

    def run_page(self, ui_url: str, run_id: str) -> str:
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_page(ui_url: str, tenant: str, version: int) -> str:
    return f"{ui_url}/#/models/{registry_name(tenant)}/versions/{version}"


def _png_to_array(png: bytes):
    import io

    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")
