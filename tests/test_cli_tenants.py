"""A tenant's first steps as a user types them: `maestro tenants add`, `tenants load FILE`,
`tenants list`, in subprocesses against a platform database on the embedded PostgreSQL 18."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from maestro_pipelines.platform_db.connection import engine_for

from .conftest import create_database, drop_database
from .test_cli import run_maestro

FEATURES = ("f1", "f2", "f3")


@pytest.fixture(scope="module")
def platform(pg18, tmp_path_factory):
    """A migrated platform database (MAESTRO_DATABASE_URL) with tenants added by the CLI."""
    name = create_database(pg18, "tenants")
    home = tmp_path_factory.mktemp("tenants_home")
    env = {"MAESTRO_DATABASE_URL": pg18.libpq_url(name), "MAESTRO_HOME": str(home)}
    engine = engine_for(pg18.admin_url.set(database=name))
    yield env, engine, home
    drop_database(pg18, name)


def sql(engine, statement: str, **params):
    with engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return result.all() if result.returns_rows else None


def loaded_rows(engine, tenant: str) -> int:
    """The tenant's rows in training_rows; 0 when no load ever made the table (the first load
    creates it: this test may run first on its xdist worker)."""
    if sql(engine, "SELECT to_regclass('training_rows') IS NULL") == [(True,)]:
        return 0
    return sql(engine, "SELECT count(*) FROM training_rows WHERE tenant = :t", t=tenant)[0][0]


def write_csv(path: Path, rows: list[list], header=("id", *FEATURES, "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def good_rows(count: int, prefix: str = "r") -> list[list]:
    return [[f"{prefix}{i}", i, i * 0.5, -i, "yes" if i % 2 else "no"] for i in range(count)]


def add(env, name: str) -> None:
    added = run_maestro("tenants", "add", name, env=env)
    assert added.returncode == 0, added.stderr


def load(env, *args: str):
    return run_maestro("tenants", "load", *args, env=env)


def test_add_says_what_was_added_and_what_to_do_next(platform):
    env, _, _ = platform
    added = run_maestro("tenants", "add", "umbrella", "--min-f1", "0.8", env=env)
    assert added.returncode == 0, added.stderr
    first, second = added.stdout.strip().splitlines()
    assert first.startswith("added tenant umbrella (id ") and "quality gates accuracy >= 0.7, f1 >= 0.8" in first
    assert "{" not in added.stdout, "no Python dict"
    assert "`maestro tenants load umbrella FILE`" in second

    as_json = run_maestro("tenants", "add", "hooli", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    tenant = json.loads(as_json.stdout)
    assert tenant["name"] == "hooli" and tenant["status"] == "active"
    assert tenant["gates"] == {"accuracy": 0.7, "f1": 0.65, "roc_auc": 0.7} and tenant["regression_tolerance"] == 0.02


def test_a_csv_loads_once_and_a_reload_adds_nothing(platform, tmp_path):
    env, engine, _ = platform
    add(env, "csvco")
    rows = good_rows(50)
    path = write_csv(tmp_path / "csvco.csv", rows)
    loaded = load(env, "csvco", str(path), "--json")
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout)
    assert (result["rows"], result["inserted"], result["tenant_rows"], result["key_column"]) == (50, 50, 50, "id")
    assert result["features"] == list(FEATURES)
    # Stored in the layout the embedded default's source reads: one JSON object per row.
    ((features, label),) = sql(engine, "SELECT features, label FROM training_rows WHERE tenant = 'csvco' AND entity_key = 'r3'")
    assert features == {"f1": 3.0, "f2": 1.5, "f3": -3.0} and label == "yes"

    again = load(env, "csvco", str(path))
    assert again.returncode == 0, again.stderr
    assert "0 new, 0 updated, 50 unchanged" in again.stdout and "has 50 training rows" in again.stdout

    rows[0][1] = 99
    changed = json.loads(load(env, "csvco", str(write_csv(tmp_path / "changed.csv", rows + good_rows(5, "n"))), "--json").stdout)
    assert (changed["inserted"], changed["updated"], changed["unchanged"], changed["tenant_rows"]) == (5, 1, 49, 55)

    replaced = json.loads(load(env, "csvco", str(write_csv(tmp_path / "few.csv", good_rows(3))), "--replace", "--json").stdout)
    assert (replaced["deleted"], replaced["tenant_rows"]) == (52, 3)


def test_rows_without_a_key_column_are_not_duplicated_by_a_reload(platform, tmp_path):
    env, engine, _ = platform
    add(env, "nokey")
    rows = [[1, 2, 3, "a"], [4, 5, 6, "b"], [1, 2, 3, "a"]]  # the same row twice is kept twice
    path = write_csv(tmp_path / "nokey.csv", rows, header=(*FEATURES, "label"))
    for _ in range(2):
        assert load(env, "nokey", str(path)).returncode == 0
    assert sql(engine, "SELECT count(*) FROM training_rows WHERE tenant = 'nokey'") == [(3,)]


def test_a_parquet_file_loads_like_a_csv(platform, tmp_path):
    import pandas as pd

    env, engine, _ = platform
    add(env, "parquetco")
    frame = pd.DataFrame({"customer": ["c1", "c2", "c3"], "age": [31, 45, 28], "spend": [10.5, 7.0, 3.25],
                          "label": [1, 0, 1]})
    frame.to_parquet(tmp_path / "export.parquet", index=False)
    loaded = load(env, "parquetco", str(tmp_path / "export.parquet"), "--key", "customer")
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded 3 rows of export.parquet into tenant parquetco" in loaded.stdout
    stored = sql(engine, "SELECT entity_key, features, label FROM training_rows WHERE tenant = 'parquetco' ORDER BY entity_key")
    assert stored == [("c1", {"age": 31.0, "spend": 10.5}, "1"), ("c2", {"age": 45.0, "spend": 7.0}, "0"),
                      ("c3", {"age": 28.0, "spend": 3.25}, "1")]


def test_bad_rows_are_named_by_line_and_nothing_is_loaded(platform, tmp_path):
    env, engine, _ = platform
    add(env, "badrows")
    rows = good_rows(4) + [["x1", "abc", 1, 2, "yes"], ["x2", 1, "", 2, ""], ["r0", 1, 2, 3, "no"], ["x3", 1, 2]]
    refused = load(env, "badrows", str(write_csv(tmp_path / "bad.csv", rows)))
    assert refused.returncode == 1 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert "bad.csv: 4 bad rows, nothing loaded" in line
    assert "line 6: 'abc' in column 'f1' is not a number" in line
    assert "line 7: no value in column 'f2', empty label" in line
    assert "line 8: key 'r0' is already on line 2" in line
    assert "line 9: 3 values for 5 columns" in line
    assert loaded_rows(engine, "badrows") == 0

    many = [[f"m{i}", "n/a", 1, 2, "yes"] for i in range(25)]
    refused = load(env, "badrows", str(write_csv(tmp_path / "many.csv", many)))
    assert "25 bad rows" in refused.stderr and "line 11:" in refused.stderr and "line 12:" not in refused.stderr
    assert "and 15 more" in refused.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["umbrella", "missing.csv"], "missing.csv does not exist"),
        (["umbrella", "rows.xlsx"], "'.xlsx' is not a file type Maestro reads"),
        (["ghost", "rows.csv"], "tenant 'ghost' does not exist. Add it first with `maestro tenants add ghost`"),
        (["Not-Valid", "rows.csv"], "'Not-Valid' is not a valid tenant name"),
        (["umbrella", "nolabel.csv"], "nolabel.csv has no 'label' column (columns: id, f1)"),
        (["umbrella", "rows.csv", "--key", "customer"], "rows.csv has no key column 'customer'"),
    ],
    ids=["missing-file", "unknown-extension", "unknown-tenant", "bad-name", "no-label", "no-such-key"],
)
def test_loading_refusals_are_one_line(platform, tmp_path, args, expected):
    env, _, _ = platform
    write_csv(tmp_path / "rows.csv", good_rows(2))
    write_csv(tmp_path / "nolabel.csv", [["a", 1]], header=("id", "f1"))
    (tmp_path / "rows.xlsx").write_bytes(b"PK\x03\x04")
    args = [str(tmp_path / a) if a.endswith((".csv", ".xlsx")) else a for a in args]
    refused = load(env, *args)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line and "unexpected" not in line


def test_list_shows_rows_production_version_and_last_training(platform, tmp_path):
    env, engine, _ = platform
    add(env, "listed")
    add(env, "unloaded")
    assert load(env, "listed", str(write_csv(tmp_path / "listed.csv", good_rows(12)))).returncode == 0
    # What a training and a deployment record (assets/ml.py writes these rows).
    sql(engine, """
        WITH t AS (SELECT id FROM tenants WHERE name = 'listed'),
        m AS (INSERT INTO models (tenant_id, name, registry_name) SELECT id, 'classifier', 'maestro-listed' FROM t RETURNING id, tenant_id),
        e AS (INSERT INTO experiments (tenant_id, model_id, name, status, dagster_run_id, started_at, finished_at)
              SELECT tenant_id, id, 'listed-run', 'succeeded', 'run-1234', '2026-11-30 09:00+00', '2026-11-30 09:05+00' FROM m RETURNING id),
        v AS (INSERT INTO model_versions (model_id, tenant_id, experiment_id, version, status)
              SELECT m.id, m.tenant_id, e.id, 2, 'deployed' FROM m, e RETURNING id, model_id, tenant_id)
        INSERT INTO deployments (tenant_id, model_id, model_version_id, status) SELECT tenant_id, model_id, id, 'active' FROM v
        RETURNING id""")
    listed = run_maestro("tenants", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    tenants = {t["name"]: t for t in json.loads(listed.stdout)}
    row = tenants["listed"]
    assert (row["rows"], row["production_version"], row["status"]) == (12, 2, "active")
    assert row["last_training"] == {"status": "succeeded", "at": "2026-11-30T09:05:00+00:00", "dagster_run_id": "run-1234"}
    assert tenants["unloaded"]["rows"] == 0 and tenants["unloaded"]["last_training"] is None
    assert tenants["unloaded"]["production_version"] is None

    shown = run_maestro("tenants", "list", env=env)
    assert shown.returncode == 0, shown.stderr
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in shown.stdout.splitlines() if line.startswith("│ ")}
    assert cells["listed"][1:] == ["12", "v2", "2026-11-30 09:05 succeeded"]
    # A later fit that its gates refused (no version came of it) is not "succeeded".
    sql(engine, """
        INSERT INTO experiments (tenant_id, model_id, name, status, dagster_run_id, started_at, finished_at)
        SELECT m.tenant_id, m.id, 'listed-run-2', 'succeeded', 'run-5678', '2026-11-30 10:00+00', '2026-11-30 10:05+00'
        FROM models m JOIN tenants t ON t.id = m.tenant_id WHERE t.name = 'listed' RETURNING id""")
    refused = {t["name"]: t for t in json.loads(run_maestro("tenants", "list", "--json", env=env).stdout)}["listed"]
    assert refused["production_version"] == 2
    assert refused["last_training"] == {"status": "not registered", "at": "2026-11-30T10:05:00+00:00", "dagster_run_id": "run-5678"}
    # Not "never": a training that failed before fitting a model is only in Dagster's runs.
    assert cells["unloaded"][1:] == ["0", "none", "none recorded"]

    # At 80 columns a long display name wraps, the name and the training time never do.
    sql(engine, "UPDATE tenants SET display_name = 'Umbrella Corporation International' WHERE name = 'listed'")
    narrow = run_maestro("tenants", "list", env={**env, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80, narrow.stdout
    body = [[c.strip() for c in line.split("│")[1:-1]] for line in narrow.stdout.splitlines() if line.startswith("│ ")]
    at = next(n for n, row in enumerate(body) if row[0] == "listed")
    assert body[at][2:] == ["12", "v2", "2026-11-30 10:05 not registered"], narrow.stdout
    assert body[at][1].startswith("Umbrella") and body[at + 1][0] == "" and body[at + 1][1], narrow.stdout


def test_two_replacing_loads_at_once_leave_one_files_rows(platform, tmp_path):
    """Two `--replace` loads of one tenant take turns: the rows are one file's, never both."""
    import subprocess
    import time

    from .test_cli import MAESTRO

    env, engine, _ = platform
    add(env, "racing")
    files = [write_csv(tmp_path / f"{side}.csv", good_rows(2_000, side)) for side in ("a", "b")]
    clean = {**{k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}, **env}
    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
    with engine.connect() as holder:
        # Hold the tenant as a load would, so that both loads are surely running at once.
        holder.execute(text("SELECT id FROM tenants WHERE name = 'racing' FOR UPDATE"))
        loads = [subprocess.Popen([MAESTRO, "tenants", "load", "racing", str(f), "--replace"], env=clean,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
        deadline = time.monotonic() + 60
        with engine.connect() as watcher:
            while watcher.execute(waiting).scalar_one() < 2:
                watcher.rollback()  # pg_stat_activity is read once per transaction
                assert all(p.poll() is None for p in loads), [p.communicate() for p in loads]
                assert time.monotonic() < deadline, "the two loads never waited for the tenant's lock"
                time.sleep(0.05)
        holder.rollback()
    for process in loads:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    prefixes = sql(engine, "SELECT DISTINCT left(entity_key, 1) FROM training_rows WHERE tenant = 'racing'")
    assert len(prefixes) == 1 and sql(engine, "SELECT count(*) FROM training_rows WHERE tenant = 'racing'") == [(2_000,)]


def test_with_your_own_database_load_refuses_and_list_counts_its_table(platform, tmp_path):
    env, engine, _ = platform
    # The user's own table in the wide layout (here in the same server, as MAESTRO_SOURCE_URL names it).
    sql(engine, "CREATE TABLE customer_rows (id bigint PRIMARY KEY, customer text NOT NULL, entity_key text NOT NULL, "
                "age double precision, label text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
    sql(engine, "INSERT INTO customer_rows (id, customer, entity_key, age, label) "
                "SELECT g, 'ownco', 'k' || g, g, 'x' FROM generate_series(1, 7) g")
    own = {**env, "MAESTRO_SOURCE_URL": env["MAESTRO_DATABASE_URL"] + "&table=customer_rows&tenant_column=customer"}
    added = run_maestro("tenants", "add", "ownco", env=own)
    assert added.returncode == 0, added.stderr
    assert "once the table MAESTRO_SOURCE_URL names has rows for ownco" in added.stdout

    refused = load(own, "ownco", str(write_csv(tmp_path / "rows.csv", good_rows(2))))
    assert refused.returncode == 1 and "MAESTRO_SOURCE_URL is set" in refused.stderr

    listed = {t["name"]: t for t in json.loads(run_maestro("tenants", "list", "--json", env=own).stdout)}
    assert listed["ownco"]["rows"] == 7


def record_a_model_version(engine, tenant: str) -> None:
    """What a first training that passed its gates leaves (assets/ml.py registered_model)."""
    sql(engine, """
        WITH t AS (SELECT id FROM tenants WHERE name = :n),
        m AS (INSERT INTO models (tenant_id, name, registry_name) SELECT id, 'classifier', 'maestro-' || :n FROM t
              RETURNING id, tenant_id)
        INSERT INTO model_versions (model_id, tenant_id, version, status) SELECT id, tenant_id, 1, 'registered' FROM m""",
        n=tenant)


def test_rows_that_cannot_train_are_loaded_with_a_warning_and_the_next_step_is_what_happens(platform, tmp_path):
    env, engine, _ = platform
    add(env, "tiny")
    one = load(env, "tiny", str(write_csv(tmp_path / "t3.csv", [["r0", 1, 2, 3, "no"]])))
    assert one.returncode == 0, one.stderr  # loaded: the next file can bring the rows it lacks
    assert one.stderr.strip() == (
        "warning: tenant tiny's 1 row cannot train a model yet: every row has label 'no', and a classifier needs two "
        "classes or more; the train/test split (1 row in 5 held out by a hash of its key) keeps none of them for "
        "testing: load more rows (10 or more usually do); add rows with `maestro tenants load tiny FILE` "
        "(without --replace rows are added)")
    assert one.stdout.splitlines()[-1] == (
        "tenant tiny has 1 training row; the tenant sensor requests its first training once they can train a model")
    listed = {t["name"]: t for t in json.loads(run_maestro("tenants", "list", "--json", env=env).stdout)}
    assert listed["tiny"]["cannot_train"].startswith("tenant tiny's 1 row cannot train a model yet")
    shown = run_maestro("tenants", "list", env=env).stdout
    assert "tenant tiny's 1 row cannot train a model yet" in shown and "only in Dagster" in shown

    rows = write_csv(tmp_path / "tiny.csv", good_rows(40))
    enough = load(env, "tiny", str(rows))
    assert enough.returncode == 0 and enough.stderr == "", enough.stderr
    assert enough.stdout.splitlines()[-1] == ("tenant tiny has 40 training rows; the tenant sensor requests its first "
                                              "training within a minute when Dagster runs (`maestro tenants list` shows it)")
    assert json.loads(load(env, "tiny", str(rows), "--json").stdout)["trainable"] is True
    same = load(env, "tiny", str(rows))
    assert "none changed: the tenant sensor requests a first training only if none ran on these rows" in same.stdout

    record_a_model_version(engine, "tiny")
    more = load(env, "tiny", str(write_csv(tmp_path / "more.csv", good_rows(5, "n"))))
    assert more.stdout.splitlines()[-1] == (
        "tenant tiny has 45 training rows; a tenant with a model is retrained by retraining_sensor (stopped by "
        "default) when its rows change; to train now, launch train_and_deploy for partition tiny in the UI (Jobs > train_and_deploy > "
        "Materialize all)")
