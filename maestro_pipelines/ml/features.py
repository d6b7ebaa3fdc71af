"""From a tenant's rows to a deterministic train/test split with feature statistics."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from maestro_pipelines.errors import MaestroError

# Columns a source row may carry that are not features.
NON_FEATURE_COLUMNS = {"id", "tenant", "tenant_id", "entity_key", "updated_at", "created_at", "_id"}


@dataclass
class FeatureSet:
    tenant: str
    feature_names: list[str]
    X_train: pd.DataFrame
    y_train: pd.Series
    X_test: pd.DataFrame
    y_test: pd.Series
    classes: list
    data_hash: str

    @property
    def rows(self) -> int:
        return len(self.X_train) + len(self.X_test)


def feature_frame(
    rows: pd.DataFrame, label_column: str = "label", require_label: bool = True
) -> tuple[pd.DataFrame, pd.Series | None, pd.Series]:
    """Split source rows into (features, label, entity keys).

    Features come either from a `features` column holding one JSON object per row (the
    demo's layout, one table for tenants whose data differ) or from every numeric column
    that is not the label or an identifier (a wide table).
    """
    if require_label and label_column not in rows.columns:
        raise MaestroError(
            f"the training rows have no '{label_column}' column (columns: {', '.join(map(str, rows.columns))})",
            "Point the data source at a table with a label column, or set label_column",
        )
    if rows.empty:
        raise MaestroError("the tenant has no training rows", "Load data for the tenant into the source table first")
    keys = rows["entity_key"].astype(str) if "entity_key" in rows.columns else rows.index.astype(str).to_series(index=rows.index)
    if "features" in rows.columns:
        parsed = rows["features"].map(lambda v: json.loads(v) if isinstance(v, (str, bytes)) else v)
        features = pd.DataFrame.from_records(list(parsed), index=rows.index).apply(pd.to_numeric, errors="coerce")
    else:
        candidates = rows.drop(columns=[c for c in rows.columns if c in NON_FEATURE_COLUMNS or c == label_column])
        features = candidates.select_dtypes(include="number")
    if features.shape[1] == 0:
        raise MaestroError("the training rows have no numeric feature columns", "Add numeric features to the source table")
    features = features.reindex(sorted(features.columns), axis=1).astype("float64")
    return features, (rows[label_column] if label_column in rows.columns else None), keys


def in_test_split(tenant: str, keys: pd.Series, test_fraction: float) -> np.ndarray:
    """A row's split depends only on its key: the same row stays in the same split as data grows."""
    buckets = keys.map(lambda k: int.from_bytes(hashlib.sha256(f"{tenant}:{k}".encode()).digest()[:8], "big") % 10_000)
    return (buckets < int(test_fraction * 10_000)).to_numpy()


def data_hash(features: pd.DataFrame, labels: pd.Series, keys: pd.Series) -> str:
    """Content hash of the training data, independent of row order."""
    frame = features.assign(__label=labels.astype(str).to_numpy(), __key=keys.to_numpy()).sort_values("__key")
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def build_feature_set(tenant: str, rows: pd.DataFrame, label_column: str = "label", test_fraction: float = 0.2) -> FeatureSet:
    features, labels, keys = feature_frame(rows, label_column)
    mask = in_test_split(tenant, keys, test_fraction)
    if mask.all() or not mask.any():
        raise MaestroError(
            f"tenant '{tenant}' has too few rows ({len(rows)}) for a train/test split",
            "Load more rows or change test_fraction",
        )
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise MaestroError(f"tenant '{tenant}' has a single label value ({classes[0]!r})", "A classifier needs two classes or more")
    return FeatureSet(
        tenant=tenant,
        feature_names=list(features.columns),
        X_train=features[~mask].reset_index(drop=True),
        y_train=labels[~mask].reset_index(drop=True),
        X_test=features[mask].reset_index(drop=True),
        y_test=labels[mask].reset_index(drop=True),
        classes=classes,
        data_hash=data_hash(features, labels, keys),
    )


def feature_statistics(features: pd.DataFrame) -> pd.DataFrame:
    stats = features.agg(["mean", "std", "min", "max"]).T
    stats["missing"] = features.isna().sum()
    return stats.reset_index(names="feature").round(4)
