"""Held-out metrics and the pictures Dagit shows in the asset's metadata."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: list[list[int]]
    classes: list
    test_rows: int
    pictures: dict[str, bytes] = field(default_factory=dict)


def evaluate(model, X_test: pd.DataFrame, y_test: pd.Series, classes: list, with_pictures: bool = True) -> Evaluation:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    predicted = model.predict(X_test)
    probabilities = model.predict_proba(X_test)
    binary = len(classes) == 2
    metrics = {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "f1": float(f1_score(y_test, predicted, average="binary" if binary else "macro", pos_label=classes[-1] if binary else 1)),
    }
    present = sorted(pd.unique(y_test).tolist())
    if binary and len(present) == 2:
        metrics["roc_auc"] = float(roc_auc_score(y_test, probabilities[:, 1]))
    elif len(present) == len(classes):
        metrics["roc_auc"] = float(roc_auc_score(y_test, probabilities, multi_class="ovr", average="macro", labels=classes))
    else:  # a class missing from the test split: AUC is undefined, and the gate will say so
        metrics["roc_auc"] = float("nan")
    confusion = confusion_matrix(y_test, predicted, labels=classes)
    result = Evaluation(metrics, confusion.tolist(), classes, len(y_test))
    if with_pictures:
        result.pictures = {
            "confusion_matrix": confusion_matrix_png(confusion, classes),
            "roc_curve": roc_curve_png(y_test, probabilities, classes),
        }
    return result


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def confusion_matrix_png(confusion: np.ndarray, classes: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), value in np.ndenumerate(confusion):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_title("confusion matrix")
    return _figure_png(fig)


def roc_curve_png(y_test: pd.Series, probabilities: np.ndarray, classes: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    columns = [1] if len(classes) == 2 else range(len(classes))
    for column in columns:
        positives = (y_test == classes[column]).to_numpy()
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probabilities[:, column])
        ax.plot(fpr, tpr, label=f"class {classes[column]}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return _figure_png(fig)


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
