"""Scoring a tenant's rows and streaming the predictions into PostgreSQL with COPY."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from maestro_pipelines.ml.features import feature_frame
from maestro_pipelines.platform_db.ml_records import copy_predictions


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


def score_batches(
    conn, model, batches: Iterable[pd.DataFrame], tenant_id: int, model_version_id: int, deployment_id: int | None
) -> tuple[int, datetime | None]:
    """Score every batch and COPY the predictions; return (rows written, newest row timestamp)."""
    written = 0
    watermark: datetime | None = None
    scored_at = datetime.now(timezone.utc)
    for batch in batches:
        if batch.empty:
            continue
        features, _, keys = feature_frame(batch, require_label=False)
        labels, scores = predict_rows(model, features)
        hashes = features_hashes(features)
        rows = (
            (tenant_id, model_version_id, deployment_id, key, digest, str(label), float(score), scored_at)
            for key, digest, label, score in zip(keys, hashes, labels, scores)
        )
        written += copy_predictions(conn, rows)
        if "updated_at" in batch.columns:
            newest = pd.to_datetime(batch["updated_at"], utc=True).max()
            if pd.notna(newest) and (watermark is None or newest.to_pydatetime() > watermark):
                watermark = newest.to_pydatetime()
    return written, watermark
