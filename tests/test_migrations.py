"""The platform schema's migrations, against the embedded PostgreSQL 18 and Debian's 15."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import downgrade, head_revision, revision_history, upgrade

TABLES = {"tenants", "models", "experiments", "model_versions", "deployments", "predictions"}
MATERIALIZED_VIEWS = {"model_statistics", "tenant_usage_statistics"}

# name -> a fragment its definition (pg_indexes.indexdef) must contain
INDEXES = {
    "models_tenant_created_idx": "(tenant_id, created_at DESC)",
    "models_tenant_status_idx": "(tenant_id, status)",
    "models_active_idx": "WHERE (status = 'active'::text)",
    "models_search_idx": "USING gin (search_vector)",
    "experiments_tenant_created_idx": "(tenant_id, created_at DESC)",
    "experiments_tenant_status_idx": "(tenant_id, status)",
    "experiments_failed_idx": "WHERE (status = 'failed'::text)",
    "model_versions_model_version_key": "INCLUDE (registry_version, status)",
    "model_versions_tenant_created_idx": "(tenant_id, created_at DESC)",
    "deployments_tenant_created_idx": "(tenant_id, created_at DESC)",
    "deployments_tenant_status_idx": "(tenant_id, status)",
    "deployments_one_active_idx": "INCLUDE (model_version_id, deployed_at) WHERE (status = 'active'::text)",
    "predictions_tenant_created_idx": "(tenant_id, created_at DESC)",
    "predictions_model_version_created_idx": "(model_version_id, created_at DESC)",
    "model_statistics_model_id_key": "UNIQUE INDEX",
    "tenant_usage_statistics_tenant_id_key": "UNIQUE INDEX",
}


def _connect(location):
    return engine_for(location.platform_url).connect()


def _relations(conn) -> dict[str, str]:
    rows = conn.execute(
        text(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'm', 'v') "
            # objects of extensions (pg_stat_statements' views) are not Maestro's
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')"
        )
    )
    return dict(rows.all())


def _month_start(day, months_later=0):
    index = day.year * 12 + day.month - 1 + months_later
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=timezone.utc)


def test_upgrade_builds_every_table_index_view_and_partition(fresh_database):
    result = upgrade(fresh_database)
    assert (result.before, result.after) == (None, head_revision())

    with _connect(fresh_database) as conn:
        relations = _relations(conn)
        assert TABLES <= relations.keys()
        assert relations["predictions"] == "p", "predictions must be a partitioned table"
        assert {name for name, kind in relations.items() if kind == "m"} == MATERIALIZED_VIEWS

        indexdefs = dict(conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")).all())
        for name, fragment in INDEXES.items():
            assert name in indexdefs, f"missing index {name}"
            assert fragment in indexdefs[name], f"{name}: {indexdefs[name]}"

        partitions = dict(
            conn.execute(
                text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'predictions'::regclass"
                )
            ).all()
        )
        today = datetime.now(timezone.utc)
        expected = {"predictions_default"} | {
            f"predictions_y{_month_start(today, k):%Y}m{_month_start(today, k):%m}" for k in range(3)
        }
        assert set(partitions) == expected
        assert partitions["predictions_default"] == "DEFAULT"

        # The partitioned parent's indexes reach every partition.
        for partition in partitions:
            count = conn.execute(
                text("SELECT count(*) FROM pg_indexes WHERE tablename = :t"), {"t": partition}
            ).scalar_one()
            assert count == 3, f"{partition} has {count} indexes (pkey + 2 expected)"


def test_downgrade_step_by_step_to_base_then_upgrade_again(fresh_database):
    history = revision_history()
    assert history[-1] == head_revision() and len(history) >= 3
    upgrade(fresh_database)
    for expected_after in reversed([None, *history[:-1]]):
        result = downgrade(fresh_database, "-1")
        assert result.after == expected_after
    with _connect(fresh_database) as conn:
        assert _relations(conn).keys() <= {"alembic_version"}, "downgrade to base left objects behind"
        leftovers = conn.execute(
            text("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE n.nspname = 'public' AND c.relkind IN ('S', 'i', 'I') "
                 "AND c.relname <> 'alembic_version_pkc'")
        ).scalars().all()
        assert leftovers == [], "sequences or indexes left behind"
    again = upgrade(fresh_database)
    assert (again.before, again.after) == (None, head_revision())
    assert upgrade(fresh_database).changed is False


def _seed_platform(conn) -> dict[str, int]:
    tenant = conn.execute(text("INSERT INTO tenants (name) VALUES ('acme') RETURNING id")).scalar_one()
    conn.execute(text("INSERT INTO tenants (name) VALUES ('globex')"))
    model = conn.execute(
        text(
            "INSERT INTO models (tenant_id, name, description, registry_name) "
            "VALUES (:t, 'churn', 'Predicts customer churn from usage', 'maestro-acme') RETURNING id"
        ),
        {"t": tenant},
    ).scalar_one()
    conn.execute(
        text("INSERT INTO experiments (tenant_id, model_id, name, status, finished_at) VALUES "
             "(:t, :m, 'run-1', 'succeeded', now()), (:t, :m, 'run-2', 'failed', now())"),
        {"t": tenant, "m": model},
    )
    v1, v2 = conn.execute(
        text("INSERT INTO model_versions (model_id, tenant_id, version, status) VALUES "
             "(:m, :t, 1, 'retired'), (:m, :t, 2, 'deployed') RETURNING id"),
        {"t": tenant, "m": model},
    ).scalars().all()
    conn.execute(
        text("INSERT INTO deployments (tenant_id, model_id, model_version_id, status, retired_at) VALUES "
             "(:t, :m, :v1, 'retired', now()), (:t, :m, :v2, 'active', NULL)"),
        {"t": tenant, "m": model, "v1": v1, "v2": v2},
    )
    conn.execute(
        text("INSERT INTO predictions (tenant_id, model_version_id, entity_key, score) "
             "SELECT :t, :v, 'row-' || g, g / 10.0 FROM generate_series(1, 5) g"),
        {"t": tenant, "v": v2},
    )
    return {"tenant": tenant, "model": model, "v1": v1, "v2": v2}


def test_statistics_views_refresh_concurrently_with_current_numbers(fresh_database):
    upgrade(fresh_database)
    with _connect(fresh_database) as conn:
        ids = _seed_platform(conn)
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("REFRESH MATERIALIZED VIEW CONCURRENTLY model_statistics"))
        conn.execute(text("REFRESH MATERIALIZED VIEW CONCURRENTLY tenant_usage_statistics"))

        model_row = conn.execute(text("SELECT * FROM model_statistics WHERE model_id = :m"), {"m": ids["model"]}).mappings().one()
        assert model_row["versions"] == 2 and model_row["latest_version"] == 2
        assert model_row["production_version"] == 2
        assert (model_row["experiments"], model_row["failed_experiments"]) == (2, 1)
        assert model_row["predictions"] == 5

        usage = {r["tenant_name"]: r for r in conn.execute(text("SELECT * FROM tenant_usage_statistics")).mappings()}
        assert set(usage) == {"acme", "globex"}
        assert (usage["acme"]["active_deployments"], usage["acme"]["predictions"]) == (1, 5)
        assert usage["acme"]["predictions_last_30_days"] == 5
        assert usage["globex"]["models"] == 0


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO tenants (name) VALUES ('Bad Name')",
        "INSERT INTO tenants (name) VALUES ('x'' OR ''1''=''1')",
        "INSERT INTO tenants (name, status) VALUES ('ok', 'gone')",
        "INSERT INTO tenants (name, settings) VALUES ('ok', '[1, 2]')",
        "UPDATE experiments SET status = 'exploded'",
        "UPDATE model_versions SET version = 0",
        "UPDATE deployments SET replicas = -1",
        "UPDATE deployments SET status = 'retired', retired_at = NULL",
        # a second active deployment of the same model in the same environment
        "UPDATE deployments SET status = 'active', retired_at = NULL",
    ],
)
def test_constraints_reject_bad_rows(pg18_database, statement):
    upgrade(pg18_database)
    with _connect(pg18_database) as conn:
        _seed_platform(conn)
        conn.commit()
        with pytest.raises(IntegrityError):
            conn.execute(text(statement))


def test_predictions_land_in_their_month_and_strays_in_default(fresh_database):
    upgrade(fresh_database)
    now = datetime.now(timezone.utc)
    with _connect(fresh_database) as conn:
        conn.execute(
            text("INSERT INTO predictions (tenant_id, model_version_id, entity_key, created_at) VALUES "
                 "(1, 1, 'now', :now), (1, 1, 'far-future', :future)"),
            {"now": now, "future": now.replace(year=now.year + 5)},
        )
        placed = dict(conn.execute(text("SELECT entity_key, tableoid::regclass::text FROM predictions")).all())
        month = _month_start(now)
        assert placed == {"now": f"predictions_y{month:%Y}m{month:%m}", "far-future": "predictions_default"}
        conn.rollback()


@pytest.mark.parametrize(
    "query, index",
    [
        ("SELECT id FROM models WHERE search_vector @@ websearch_to_tsquery('english', 'customers churning')", "models_search_idx"),
        ("SELECT id, updated_at FROM models WHERE tenant_id = 1 AND status = 'active' ORDER BY updated_at DESC", "models_active_idx"),
        ("SELECT created_at, error FROM experiments WHERE tenant_id = 1 AND status = 'failed' ORDER BY created_at DESC", "experiments_failed_idx"),
        ("SELECT model_version_id FROM deployments WHERE model_id = 1 AND environment = 'production' AND status = 'active'", "deployments_one_active_idx"),
        ("SELECT entity_key FROM predictions WHERE tenant_id = 1 ORDER BY created_at DESC LIMIT 10", "predictions_"),
    ],
)
def test_queries_the_indexes_were_made_for_can_use_them(fresh_database, query, index):
    """The planner can answer each hot query from its index (predicates match the queries)."""
    upgrade(fresh_database)
    with _connect(fresh_database) as conn:
        _seed_platform(conn)
        conn.execute(text("ANALYZE"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(conn.execute(text(f"EXPLAIN {query}")).scalars())
        assert index in plan, plan
        if index == "models_search_idx":  # and stemming finds the model ("customer churn")
            assert len(conn.execute(text(query)).all()) == 1
        conn.rollback()


def test_pg_stat_statements_is_on_where_the_server_allows(fresh_database, server):
    result = upgrade(fresh_database)
    with _connect(fresh_database) as conn:
        installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")).scalar()
        preload = conn.execute(text("SHOW shared_preload_libraries")).scalar()
    assert installed == 1
    if "pg_stat_statements" in preload:  # the embedded server is set up for it
        assert result.warnings == []
        with _connect(fresh_database) as conn:
            assert conn.execute(text("SELECT count(*) >= 0 FROM pg_stat_statements")).scalar()
    else:  # Debian's default configuration: created, not loaded, and the user is told
        assert server.name == "pg15-debian"
        assert len(result.warnings) == 1 and "shared_preload_libraries" in result.warnings[0]


def test_unprivileged_user_gets_a_warning_not_a_failure(pg18, pg18_database):
    """On a managed server the app user often may not create extensions: migrate anyway."""
    role = "app_" + pg18_database.database[-8:]
    with engine_for(pg18.admin_url).connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER'))
        conn.execute(text(f'ALTER DATABASE "{pg18_database.database}" OWNER TO "{role}"'))
        conn.execute(text(f'GRANT ALL ON SCHEMA public TO "{role}"'))
        conn.commit()
    as_app = type(pg18_database)(
        platform_url=pg18_database.platform_url.set(username=role), source="test app user"
    )
    try:
        result = upgrade(as_app)
        assert result.after == head_revision()
        assert len(result.warnings) == 1 and "could not be created" in result.warnings[0]
    finally:
        engine_for(as_app.platform_url).dispose()


def test_concurrent_upgrades_serialise_and_both_succeed(pg18_database):
    outcomes: list[object] = []

    def run():
        try:
            outcomes.append(upgrade(pg18_database).after)
        except Exception as exc:  # collected and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [head_revision(), head_revision()]
