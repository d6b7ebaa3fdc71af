"""Scoring a tenant's rows and streaming the predictions into PostgreSQL with COPY."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from maestro_pipelines.ml.features import feature_frame
from maestro_pipelines.platform_db.ml_records import PredictionBatch, copy_predictions


def features_hashes(features: pd.DataFrame) -> list[str]:
    """A stable hash of each row's feature values (cache key for already scored rows)."""
    values = np.ascontiguousarray(features.to_numpy(dtype="float64"))
    return [hashlib.sha256(row.tobytes()).hexdigest()[:32] for row in values]


def predict_rows(model, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Predicted label and its score: P(positive) for two classes, else the top probability."""
    expected = getattr(model, "feature_names_in_", None)
    if expected is not None:
        features = features.reindex(columns=list(expected))
    labels = model.predict(features)
    probabilities = model.predict_proba(features)
    scores = probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.max(axis=1)
    return labels, scores


@dataclass
class ScoringResult:
    written: int = 0
    """rows written to `predictions`"""
    predicted: int = 0
    """rows the model predicted now"""
    from_cache: int = 0
    """rows whose prediction by this model version came from the cache (already scored)"""
    watermark: datetime | None = None
    """newest `updated_at` among the rows"""


# -- cache keys: everything of a tenant lives under `tenant:<name>:`, so moving its alias can
# drop it with one prefix deletion. A version is identified by number AND MLflow run id: a
# registry rebuilt from scratch reuses version numbers, never run ids.
def tenant_cache_prefix(tenant: str) -> str:
    return f"tenant:{tenant}:"


def version_cache_prefix(tenant: str, version: int, run_id: str | None) -> str:
    return f"{tenant_cache_prefix(tenant)}v{version}:{run_id or 'norun'}:"


def model_cache_key(tenant: str, version: int, run_id: str | None) -> str:
    return version_cache_prefix(tenant, version, run_id) + "model"


def prediction_cache_prefix(tenant: str, version: int, run_id: str | None) -> str:
    return version_cache_prefix(tenant, version, run_id) + "p:"


def load_model_cached(cache, key: str, load: Callable[[], object]) -> tuple[object, str]:
    """The model under `key` from the cache, else `load()` (then cached); returns (model,
    where it came from: `l1`, `l2` or `loaded`)."""
    before = cache.counters()
    model = cache.get(key)
    if model is not None:
        after = cache.counters()
        return model, ("l1" if after.l1_hits > before.l1_hits else "l2")
    model = load()
    cache.set(key, model)
    return model, "loaded"


def score_batches(
    conn, model, batches: Iterable[pd.DataFrame], tenant_id: int, model_version_id: int, deployment_id: int | None
) -> tuple[int, datetime | None]:
    """Score every batch and COPY the predictions; return (rows written, newest row timestamp)."""
    result = score_and_copy(conn, model, batches, tenant_id, model_version_id, deployment_id)
    return result.written, result.watermark


def score_and_copy(
    conn, model, batches: Iterable[pd.DataFrame], tenant_id: int, model_version_id: int, deployment_id: int | None,
    *, cache=None, cache_prefix: str | None = None,
) -> ScoringResult:
    """Score every batch and COPY the predictions. With a `TwoLevelCache` and `cache_prefix`
    (`prediction_cache_prefix(...)`), rows whose features this model version already scored
    take their prediction from the cache (one batched lookup per batch) and new predictions are
    added to it."""
    result = ScoringResult()
    scored_at = datetime.now(timezone.utc)
    for batch in batches:
        if batch.empty:
            continue
        features, _, keys = feature_frame(batch, require_label=False)
        hashes = features_hashes(features)
        if cache is not None and cache_prefix is not None:
            labels, scores, predicted = _predict_with_cache(model, features, hashes, cache, cache_prefix)
        else:
            labels, scores = predict_rows(model, features)
            predicted = len(features)
        result.predicted += predicted
        result.from_cache += len(features) - predicted
        result.written += copy_predictions(conn, PredictionBatch(
            tenant_id, model_version_id, deployment_id, keys.to_numpy(), hashes, labels, scores, scored_at,
        ))
        if "updated_at" in batch.columns:
            newest = pd.to_datetime(batch["updated_at"], utc=True).max()
            if pd.notna(newest) and (result.watermark is None or newest.to_pydatetime() > result.watermark):
                result.watermark = newest.to_pydatetime()
    return result


def _predict_with_cache(model, features: pd.DataFrame, hashes: list[str], cache, prefix: str):
    keys = [prefix + digest for digest in hashes]
    found = cache.get_many(keys)
    labels: list[str | None] = [None] * len(keys)
    scores: list[float] = [0.0] * len(keys)
    todo: list[int] = []
    for i, key in enumerate(keys):
        hit = found.get(key)
        if hit is None:
            todo.append(i)
        else:
            labels[i], scores[i] = hit
    if todo:
        new_labels, new_scores = predict_rows(model, features.iloc[todo])
        fresh = {}
        for i, label, score in zip(todo, new_labels, new_scores):
            labels[i], scores[i] = str(label), float(score)
            fresh[keys[i]] = (labels[i], scores[i])
        cache.set_many(fresh)
    return labels, scores, len(todo)
