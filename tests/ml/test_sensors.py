"""Tenant and retraining sensors, evaluated with real databases and cursors."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from maestro_pipelines.partitions import tenant_partitions
from maestro_pipelines.sensors.tenants import retraining_sensor, tenant_partitions_sensor


def evaluate(sensor, ml_env, cursor=None, **resources):
    context = dg.build_sensor_context(instance=ml_env.instance, cursor=cursor, resources=resources)
    return sensor(context), context.cursor


def apply_partition_requests(ml_env, result):
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            ml_env.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                ml_env.instance.delete_dynamic_partition(request.partitions_def_name, key)


def skipped(result) -> str | None:
    return result.skip_message if isinstance(result, dg.SkipReason) else (
        result.skip_reason.skip_message if result.skip_reason else None)


def platform_source(ml_env):
    """The embedded default's source, as environment.py builds it when MAESTRO_DATABASE_URL is set."""
    from maestro_pipelines.resources.sources import PostgresDataSource

    return PostgresDataSource(url=ml_env.platform_url, url_variable="MAESTRO_DATABASE_URL")


def load_rows(ml_env, tenant: str, tmp_path, count: int = 60) -> None:
    """`maestro tenants load` in process: a wide CSV through the Dagster-free loader."""
    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.platform_db.training_rows import load_training_rows

    path = tmp_path / f"{tenant}.csv"
    path.write_text("id,f1,f2,label\n" + "".join(f"k{i},{i},{(i * 7) % 11},{i % 2}\n" for i in range(count)))
    with engine_for(ml_env.resources["platform_db"].location().platform_url).connect() as conn:
        load_training_rows(conn, tenant, path)
        conn.commit()


def test_a_new_tenant_waits_for_its_rows_then_gets_its_first_training(ml_env, tmp_path):
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    # acme and globex already have partitions (the fixture added them): nothing to do.
    first, _ = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db, source=source)
    assert skipped(first) == "2 active tenants, all with partitions" and not first.run_requests
    retrain_baseline, _ = evaluate(retraining_sensor, ml_env, source=source, platform_db=platform_db)

    ml_env.sql("INSERT INTO tenants (name) VALUES ('umbrella')")
    waiting, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=first.cursor, platform_db=platform_db, source=source)
    (added,) = waiting.dynamic_partitions_requests
    assert list(added.partition_keys) == ["umbrella"]
    assert not waiting.run_requests, "no training for a tenant without rows: it would fail and turn the ML group red"
    assert skipped(waiting) == "tenant umbrella has no training rows yet: load them with `maestro tenants load umbrella FILE`"
    apply_partition_requests(ml_env, waiting)

    # Still no rows: the tenant is not lost behind the cursor, and asks again.
    still, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=waiting.cursor, platform_db=platform_db, source=source)
    assert not still.run_requests and "umbrella has no training rows yet" in skipped(still)
    retrain_empty, _ = evaluate(retraining_sensor, ml_env, cursor=retrain_baseline.cursor, source=source, platform_db=platform_db)

    load_rows(ml_env, "umbrella", tmp_path)
    ready, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=still.cursor, platform_db=platform_db, source=source)
    (run,) = ready.run_requests
    assert run.partition_key == "umbrella" and run.run_key.startswith("first-training-umbrella")
    assert run.tags["maestro/trigger"] == "new-tenant"
    again, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=ready.cursor, platform_db=platform_db, source=source)
    assert not again.run_requests, "a tenant is trained once by this sensor, not every tick"
    # Nor does the retraining sensor take the first rows for a data change: one first training.
    retrain, _ = evaluate(retraining_sensor, ml_env, cursor=retrain_empty.cursor, source=source, platform_db=platform_db)
    assert not retrain.run_requests


def test_a_tenant_with_rows_is_trained_at_once_and_an_inactive_one_loses_its_partition(ml_env, tmp_path):
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    first, _ = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db, source=source)
    ml_env.sql("INSERT INTO tenants (name) VALUES ('umbrella')")
    load_rows(ml_env, "umbrella", tmp_path)
    result, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=first.cursor, platform_db=platform_db, source=source)
    (run,) = result.run_requests
    assert run.partition_key == "umbrella" and list(result.dynamic_partitions_requests[0].partition_keys) == ["umbrella"]
    apply_partition_requests(ml_env, result)

    ml_env.sql("UPDATE tenants SET status = 'deleted' WHERE name = 'globex'")
    removed, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=result.cursor, platform_db=platform_db, source=source)
    (delete,) = removed.dynamic_partitions_requests
    assert isinstance(delete, dg.DeleteDynamicPartitionsRequest) and list(delete.partition_keys) == ["globex"]
    assert not removed.run_requests


def test_a_partition_removed_by_hand_comes_back_without_retraining(ml_env):
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    ml_env.instance.delete_dynamic_partition(tenant_partitions.name, "acme")
    # "2": the cursor as the sensor wrote it before it kept tenants waiting for rows.
    result, _ = evaluate(tenant_partitions_sensor, ml_env, cursor="2", platform_db=platform_db, source=source)
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["acme"]
    assert not result.run_requests


def record_a_model_version(ml_env, tenant: str) -> None:
    """What a first training that passed its gates leaves (assets/ml.py registered_model)."""
    ml_env.sql("""
        WITH m AS (INSERT INTO models (tenant_id, name, registry_name) SELECT id, 'classifier', 'maestro-' || name
                   FROM tenants WHERE name = :n RETURNING id, tenant_id)
        INSERT INTO model_versions (model_id, tenant_id, version, status) SELECT id, tenant_id, 1, 'registered' FROM m""",
               n=tenant)


def test_retraining_is_requested_when_a_tenants_data_change(ml_env):
    """For tenants with a model: one without (acme here) is the tenant sensor's to train."""
    source, platform_db = ml_env.resources["source"], ml_env.resources["platform_db"]
    record_a_model_version(ml_env, "globex")
    tick = lambda cursor: evaluate(retraining_sensor, ml_env, cursor=cursor, source=source,  # noqa: E731
                                   platform_db=platform_db)[0]
    baseline = tick(None)
    assert not baseline.run_requests, "first sight records fingerprints only"
    unchanged = tick(baseline.cursor)
    assert not unchanged.run_requests

    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    ml_env.sql(
        "INSERT INTO training_rows (tenant, entity_key, features, label, updated_at) "
        "SELECT tenant, entity_key || '-v2', features, label, :later FROM training_rows "
        "WHERE tenant IN ('acme', 'globex') AND entity_key LIKE '%-0000_'",
        later=later,
    )
    changed = tick(unchanged.cursor)
    (run,) = changed.run_requests
    assert run.partition_key == "globex" and run.tags["maestro/trigger"] == "data-change"
    settled = tick(changed.cursor)
    assert not settled.run_requests


def test_retraining_compares_the_rows_with_those_the_last_training_read(ml_env):
    """training_data records the fingerprint of the rows it read (its data version): a deleted
    row (the newest timestamp unchanged) is a change, found even on a lost cursor, because the
    baseline is the training's and not the cursor's."""
    source, platform_db = ml_env.resources["source"], ml_env.resources["platform_db"]
    trained = ml_env.run("acme")
    assert trained.success, [e.message for e in trained.all_events if e.is_failure]
    tick = lambda cursor: evaluate(retraining_sensor, ml_env, cursor=cursor, source=source,  # noqa: E731
                                   platform_db=platform_db)[0]
    assert not tick(None).run_requests, "the rows acme's training read"
    ml_env.sql("DELETE FROM training_rows WHERE id = (SELECT id FROM training_rows WHERE tenant = 'acme' "
               "ORDER BY updated_at LIMIT 1)")
    (run,) = tick(None).run_requests
    assert run.partition_key == "acme" and run.tags["maestro/rows"] == source.tenant_fingerprint("acme").tag


def test_a_waiting_tenant_is_told_where_its_rows_go_and_is_not_trained_twice(ml_env, tmp_path):
    """With MAESTRO_SOURCE_URL the skip reason names the table to fill; a tenant trained by
    hand while it waited (an experiments row) gets no second first training."""
    platform_db, own_source = ml_env.resources["platform_db"], ml_env.resources["source"]
    first, _ = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db, source=own_source)
    ml_env.sql("INSERT INTO tenants (name) VALUES ('umbrella')")
    waiting, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=first.cursor, platform_db=platform_db, source=own_source)
    assert skipped(waiting) == ("tenant umbrella has no training rows yet: add them to table training_rows of "
                                "MAESTRO_SOURCE_URL (column tenant = 'umbrella')")
    load_rows(ml_env, "umbrella", tmp_path)
    ml_env.sql("INSERT INTO experiments (tenant_id, name, status) SELECT id, 'by hand', 'running' FROM tenants WHERE name = 'umbrella'")
    later, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=waiting.cursor, platform_db=platform_db, source=own_source)
    assert not later.run_requests


def write_rows(tmp_path, name: str, count: int, classes: int = 2, learnable: bool = True):
    """Rows whose label follows f1 (a model passes the quality gates), or not at all."""
    path = tmp_path / name
    labels = [i * classes // count if learnable else i % classes for i in range(count)]
    path.write_text("id,f1,f2,label\n" + "".join(f"k{i},{i},{(i * 7) % 11},{labels[i]}\n" for i in range(count)))
    return path


def load_file(ml_env, tenant: str, path, replace: bool = False) -> None:
    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.platform_db.training_rows import load_training_rows

    with engine_for(ml_env.resources["platform_db"].location().platform_url).connect() as conn:
        load_training_rows(conn, tenant, path, replace=replace)
        conn.commit()


def test_a_failed_first_training_is_requested_again_when_the_rows_change(ml_env, tmp_path):
    """hooli's first rows hold nothing to learn: its first training fails its quality gates. The
    tenant is not lost: the skip reason says what it waits for, a --replace with good rows brings a second first training
    (once per state of the rows, never beside a running one), and after a model, no more."""
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    tick = lambda cursor: evaluate(tenant_partitions_sensor, ml_env, cursor=cursor, platform_db=platform_db,  # noqa: E731
                                   source=source)[0]
    baseline = tick(None)
    ml_env.sql("INSERT INTO tenants (name) VALUES ('hooli')")
    load_file(ml_env, "hooli", write_rows(tmp_path, "noise.csv", 60, learnable=False))
    first = tick(baseline.cursor)
    (request,) = first.run_requests
    apply_partition_requests(ml_env, first)
    failed = ml_env.run("hooli", tags=request.tags)
    assert not failed.success

    stuck = tick(first.cursor)
    assert not stuck.run_requests, "the same rows would fail the same way"
    assert skipped(stuck) == (f"hooli: first training failed (run {failed.run_id[:8]}); "
                              "waiting for new rows: `maestro tenants load hooli FILE --replace`")

    retrain_baseline, _ = evaluate(retraining_sensor, ml_env, source=source, platform_db=platform_db)
    load_file(ml_env, "hooli", write_rows(tmp_path, "umbrella.csv", 60), replace=True)
    fixed = tick(stuck.cursor)
    (second,) = fixed.run_requests
    assert second.partition_key == "hooli" and second.run_key != request.run_key
    assert second.tags["maestro/trigger"] == "new-tenant"
    retrain, _ = evaluate(retraining_sensor, ml_env, cursor=retrain_baseline.cursor, source=source, platform_db=platform_db)
    assert not retrain.run_requests, "one run for the changed rows of a tenant without a model, not two"
    (twice,) = tick(stuck.cursor).run_requests  # the same tick evaluated again: the same key, one run
    assert twice.run_key == second.run_key
    assert not tick(fixed.cursor).run_requests

    from maestro_pipelines.definitions import defs

    started = ml_env.instance.create_run_for_job(defs.resolve_job_def("train_and_deploy"), status=dg.DagsterRunStatus.STARTED,
                                                tags={**second.tags, "dagster/partition": "hooli"})
    running = tick(stuck.cursor)  # even a cursor that missed the request sees the running one
    assert not running.run_requests and skipped(running) == f"hooli: first training running (run {started.run_id[:8]})"
    ml_env.instance.delete_run(started.run_id)

    trained = ml_env.run("hooli", tags=second.tags)
    assert trained.success, [e.message for e in trained.all_events if e.is_failure]
    done = tick(fixed.cursor)
    assert not done.run_requests and "hooli" not in json.loads(done.cursor)["watching"]
    load_file(ml_env, "hooli", write_rows(tmp_path, "more.csv", 80))
    assert not tick(done.cursor).run_requests, "new rows of a tenant with a model are retraining_sensor's job"


def test_a_first_training_requested_before_the_watch_list_is_still_watched(ml_env, tmp_path):
    """A cursor written before tenants were watched ({handled_up_to, waiting}) after hooli's
    first training failed: new rows still bring a second first training."""
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    (hooli_id,) = ml_env.sql("INSERT INTO tenants (name) VALUES ('hooli') RETURNING id")[0]
    ml_env.instance.add_dynamic_partitions(tenant_partitions.name, ["hooli"])
    load_file(ml_env, "hooli", write_rows(tmp_path, "t3.csv", 1, classes=1))
    failed = ml_env.run("hooli", tags={"maestro/trigger": "new-tenant"})  # as the sensor tagged runs then
    assert not failed.success
    old_cursor = json.dumps({"handled_up_to": hooli_id, "waiting": []})
    stuck, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=old_cursor, platform_db=platform_db, source=source)
    assert not stuck.run_requests and skipped(stuck).startswith("hooli: first training failed")
    load_file(ml_env, "hooli", write_rows(tmp_path, "umbrella.csv", 60), replace=True)
    fixed, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=stuck.cursor, platform_db=platform_db, source=source)
    assert [r.partition_key for r in fixed.run_requests] == ["hooli"]


def test_rows_that_cannot_train_a_model_get_no_run_until_rows_are_added(ml_env, tmp_path):
    """On the embedded default the sensor knows 1 row of 1 class cannot train (the split of
    ml/features.py): no red run, a skip reason saying why; added rows bring the first training."""
    platform_db, source = ml_env.resources["platform_db"], platform_source(ml_env)
    baseline, _ = evaluate(tenant_partitions_sensor, ml_env, platform_db=platform_db, source=source)
    ml_env.sql("INSERT INTO tenants (name) VALUES ('hooli')")
    load_file(ml_env, "hooli", write_rows(tmp_path, "t3.csv", 1, classes=1))
    one_row, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=baseline.cursor, platform_db=platform_db, source=source)
    assert not one_row.run_requests
    assert skipped(one_row) == (
        "tenant hooli's 1 row cannot train a model yet: every row has label '0', and a classifier needs two classes "
        "or more; the train/test split (1 row in 5 held out by a hash of its key) keeps none of them for testing: "
        "load more rows (10 or more usually do); add rows with `maestro tenants load hooli FILE`")

    load_file(ml_env, "hooli", write_rows(tmp_path, "umbrella.csv", 60))  # added to the first row
    ready, _ = evaluate(tenant_partitions_sensor, ml_env, cursor=one_row.cursor, platform_db=platform_db, source=source)
    assert [r.partition_key for r in ready.run_requests] == ["hooli"]


def test_the_loaders_split_is_the_trainings_split(ml_env, tmp_path):
    """why_untrainable (SQL, Dagster-free) puts each row on the side ml/features.py does: rows
    the training would hold out entirely, or keep entirely, are named; a good split is not."""
    import pandas as pd

    from maestro_pipelines.ml.features import in_test_split
    from maestro_pipelines.platform_db.connection import engine_for
    from maestro_pipelines.platform_db.training_rows import why_untrainable

    ml_env.sql("INSERT INTO tenants (name) VALUES ('hooli')")
    keys = pd.Series([f"k{i}" for i in range(400)])
    held_out = in_test_split("hooli", keys, 0.2)
    test_keys, training_keys = list(keys[held_out][:3]), list(keys[~held_out][:3])

    def verdict(chosen: list[str]) -> str | None:
        path = tmp_path / "rows.csv"
        path.write_text("id,f1,label\n" + "".join(f"{k},{i},{i % 2}\n" for i, k in enumerate(chosen)))
        load_file(ml_env, "hooli", path, replace=True)
        with engine_for(ml_env.resources["platform_db"].location().platform_url).connect() as conn:
            return why_untrainable(conn, "hooli")

    assert "keeps none of them for testing" in verdict(training_keys)
    assert "keeps none of them for training" in verdict(test_keys)
    assert verdict(training_keys[:2] + test_keys[:1]) is None  # two classes to learn, one row to test
