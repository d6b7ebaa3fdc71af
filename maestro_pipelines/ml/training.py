"""Estimators: built from hyperparameters the engineer edits in the launchpad."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODEL_TYPES = ("random_forest", "gradient_boosting", "logistic_regression")


@dataclass(frozen=True)
class ModelParams:
    model_type: str = "random_forest"
    n_estimators: int = 100
    max_depth: int | None = None
    learning_rate: float = 0.1
    regularization_c: float = 1.0
    random_state: int = 42

    def as_params(self) -> dict:
        return {k: ("none" if v is None else v) for k, v in asdict(self).items()}


def build_estimator(params: ModelParams):
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if params.model_type == "random_forest":
        estimator = RandomForestClassifier(
            n_estimators=params.n_estimators, max_depth=params.max_depth, random_state=params.random_state, n_jobs=1
        )
    elif params.model_type == "gradient_boosting":
        estimator = GradientBoostingClassifier(
            n_estimators=params.n_estimators, max_depth=params.max_depth or 3,
            learning_rate=params.learning_rate, random_state=params.random_state,
        )
    elif params.model_type == "logistic_regression":
        estimator = LogisticRegression(C=params.regularization_c, max_iter=2000, random_state=params.random_state)
    else:
        from maestro_pipelines.errors import MaestroError

        raise MaestroError(f"unknown model_type '{params.model_type}'", f"Use one of {', '.join(MODEL_TYPES)}")
    return make_pipeline(StandardScaler(), estimator)
