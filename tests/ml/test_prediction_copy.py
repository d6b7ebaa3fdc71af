"""The predictions writer's binary COPY (NumPy-encoded, `ml_records.copy_tuples`) stores
exactly the rows it is given, read back from a real PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from maestro_pipelines.platform_db.ml_records import (
    COPY_ROWS_PER_WRITE,
    PredictionBatch,
    copy_predictions,
    copy_tuples,
)

SCORED_AT = datetime(2026, 3, 14, 15, 9, 26, 535897, tzinfo=timezone.utc)


def stored(location) -> list[tuple]:
    with engine_for(location.platform_url).connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT tenant_id, model_version_id, deployment_id, entity_key, features_hash, label, score, created_at "
            "FROM predictions ORDER BY id"
        ))]


def test_every_field_comes_back_as_given(pg18_database):
    upgrade(pg18_database)
    keys = np.array(["a", "", "clé-é", "k" * 300], dtype=object)  # empty, non-ASCII, long
    first = PredictionBatch(7, 70, None, keys, ["0" * 32, "1" * 32, "2" * 32, "3" * 32],
                            np.array([1, 0, 10, 1]), np.array([0.25, 1.0, -0.0, 1e-300]), SCORED_AT)
    second = PredictionBatch(8, 80, 5, ["x"], ["f" * 32], ["négatif"], [0.5], SCORED_AT)
    with engine_for(pg18_database.platform_url).begin() as conn:
        assert copy_predictions(conn, first) == 4
        assert copy_predictions(conn, second) == 1
        assert copy_predictions(conn, PredictionBatch(8, 80, 5, [], [], [], [], SCORED_AT)) == 0
    assert stored(pg18_database) == [
        (7, 70, None, "a", "0" * 32, "1", 0.25, SCORED_AT),
        (7, 70, None, "", "1" * 32, "0", 1.0, SCORED_AT),
        (7, 70, None, "clé-é", "2" * 32, "10", 0.0, SCORED_AT),
        (7, 70, None, "k" * 300, "3" * 32, "1", 1e-300, SCORED_AT),
        (8, 80, 5, "x", "f" * 32, "négatif", 0.5, SCORED_AT),
    ]


def test_a_batch_whose_columns_differ_in_length_is_refused():
    with pytest.raises(ValueError, match="differ in length"):
        copy_tuples(PredictionBatch(1, 1, 1, ["a", "b"], ["0" * 32], ["1", "0"], [0.1, 0.2], SCORED_AT))


def test_a_time_without_zone_is_refused():
    with pytest.raises(ValueError, match="zone"):
        copy_tuples(PredictionBatch(1, 1, 1, ["a"], ["0" * 32], ["1"], [0.1], SCORED_AT.replace(tzinfo=None)))


def test_a_batch_of_several_writes_is_stored_whole_and_in_order(pg18_database):
    """A batch longer than one write (`COPY_ROWS_PER_WRITE`), encoded part by part while the
    queued writer sends the part before: every row back, in order, across the part boundaries."""
    upgrade(pg18_database)
    count = 2 * COPY_ROWS_PER_WRITE + 345
    batch = PredictionBatch(3, 30, 2, [f"entity-{i}" for i in range(count)], [f"{i:032x}" for i in range(count)],
                            np.arange(count) % 3, np.arange(count) / count, SCORED_AT)
    with engine_for(pg18_database.platform_url).begin() as conn:
        assert copy_predictions(conn, batch) == count
    rows = stored(pg18_database)
    assert [row[3] for row in rows] == [f"entity-{i}" for i in range(count)]
    assert rows[COPY_ROWS_PER_WRITE] == (3, 30, 2, f"entity-{COPY_ROWS_PER_WRITE}", f"{COPY_ROWS_PER_WRITE:032x}",
                                         str(COPY_ROWS_PER_WRITE % 3), COPY_ROWS_PER_WRITE / count, SCORED_AT)


def test_a_part_that_cannot_be_encoded_leaves_no_row(pg18_database):
    """A value that cannot be encoded in the second part, after the first was sent: the COPY is
    abandoned with the error, and none of the batch's rows is stored."""
    upgrade(pg18_database)
    count = COPY_ROWS_PER_WRITE + 10
    scores: list = [0.5] * count
    scores[COPY_ROWS_PER_WRITE + 5] = "not a number"
    batch = PredictionBatch(3, 30, 2, [f"entity-{i}" for i in range(count)], ["0" * 32] * count, ["1"] * count,
                            scores, SCORED_AT)
    with pytest.raises(ValueError, match="not a number"), engine_for(pg18_database.platform_url).begin() as conn:
        copy_predictions(conn, batch)
    assert stored(pg18_database) == []
