"""Demo tenants whose data ship inside scikit-learn (no download), loaded into the embedded
default data source: the `training_rows` table of the platform database."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import text
from sqlalchemy.engine import Connection

from maestro_pipelines.platform_db.training_rows import ensure_training_rows_table

DEMO_TENANTS = {
    # tenant: (display name, scikit-learn loader, description)
    "acme": ("Acme Health", "load_breast_cancer", "binary: malignant vs benign tumours, 30 features"),
    "globex": ("Globex Wines", "load_wine", "3 cultivars of wine, 13 chemical features"),
    "initech": ("Initech Scanning", "load_digits", "handwritten digits 0-9, 64 pixel features"),
}

def demo_rows(tenant: str, now: datetime | None = None):
    """(entity_key, features JSON, label, updated_at) for a demo tenant, deterministic."""
    import sklearn.datasets

    _, loader, _ = DEMO_TENANTS[tenant]
    data = getattr(sklearn.datasets, loader)(as_frame=True)
    frame = data.frame
    target = data.target.name
    feature_columns = [c for c in frame.columns if c != target]
    now = now or datetime.now(timezone.utc).replace(microsecond=0)
    count = len(frame)
    for position, row in enumerate(frame.itertuples(index=False)):
        values = dict(zip(feature_columns, row[:-1]))
        # Spread rows over the last 30 days so "new rows" and retraining have history to use.
        updated_at = now - timedelta(minutes=int((count - position) * 43_200 / count))
        yield f"{tenant}-{position:05d}", json.dumps({k: float(v) for k, v in values.items()}), str(int(row[-1])), updated_at


def seed_demo_tenant(conn: Connection, tenant: str) -> int:
    """Load a demo tenant's rows (idempotent: existing rows are left as they are)."""
    ensure_training_rows_table(conn)
    existing = conn.execute(text("SELECT count(*) FROM training_rows WHERE tenant = :t"), {"t": tenant}).scalar_one()
    if existing:
        return 0
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor:
        with cursor.copy("COPY training_rows (tenant, entity_key, features, label, updated_at) FROM STDIN") as copy:
            count = 0
            for key, features, label, updated_at in demo_rows(tenant):
                copy.write_row((tenant, key, features, label, updated_at))
                count += 1
    return count
