"""A restore's table checks taken while pg_restore loads the rest (`TableChecksBeside`),
against the embedded PostgreSQL 18 and its own pg_dump and pg_restore: pg_restore's verbose
lines name every table whose rows are in, a partition is left to the final pass (its rows can
come from its root's entry), the final pass reuses what was checked beside and checks the rest,
and a restore over a schema with the awkward cases (a hash partitioning on an enum, which
pg_dump loads through the root; enum columns, whose hashes are of OIDs the restore assigns
anew; a name with a space; foreign keys) verifies clean, while a
table whose content differs from the manifest still fails it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from maestro_pipelines.backup import DatabaseTarget, create_backup, get_backup
from maestro_pipelines.backup.consistency import (
    TableChecksBeside,
    list_tables,
    table_checks,
    table_checks_concurrently,
)
from maestro_pipelines.backup.manifest import TableCheck
from maestro_pipelines.backup.pgtools import CHECKSUM_SESSION_OPTIONS, libpq_environment, program, psycopg_connect
from maestro_pipelines.backup.restore import (
    RestoreError,
    clean_up,
    fetch,
    plan_restore,
    restore_backup,
    restore_database,
    run_pg_restore,
    verify_database,
)
from maestro_pipelines.platform_db.admin import server_version
from tests.backup.conftest import count_rows, fill_big_table
from tests.restore.conftest import database_names

AWKWARD_SCHEMA = (
    "CREATE TYPE colour AS ENUM ('red', 'green', 'blue')",
    "CREATE TABLE plain (id int PRIMARY KEY, body text)",
    "INSERT INTO plain SELECT g, 'row ' || g FROM generate_series(1, 3000) g",
    "CREATE TABLE child (id int PRIMARY KEY, plain_id int REFERENCES plain, at timestamptz DEFAULT now())",
    "INSERT INTO child SELECT g, g % 3000 + 1 FROM generate_series(1, 5000) g",
    # Hash-partitioned on an enum: pg_dump loads each partition's rows through the root, so one
    # partition's data entry can put rows into the others.
    "CREATE TABLE parted (id int, shade colour, PRIMARY KEY (id, shade)) PARTITION BY HASH (shade)",
    "CREATE TABLE parted_0 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
    "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
    "INSERT INTO parted SELECT g, (ARRAY['red', 'green', 'blue'])[g % 3 + 1]::colour FROM generate_series(1, 4000) g",
    # Enums hash by OID, which the restore assigns anew: checked by row text on both sides.
    "CREATE TABLE painted (id int PRIMARY KEY, shade colour, shades colour[])",
    "INSERT INTO painted SELECT g, 'blue', ARRAY['red', 'green']::colour[] FROM generate_series(1, 300) g",
    # Range partitions: each one's data entry is a COPY into it, so it is checked at once.
    "CREATE TABLE ranged (id int PRIMARY KEY) PARTITION BY RANGE (id)",
    "CREATE TABLE ranged_low PARTITION OF ranged FOR VALUES FROM (0) TO (1000)",
    "CREATE TABLE ranged_high PARTITION OF ranged FOR VALUES FROM (1000) TO (MAXVALUE)",
    "INSERT INTO ranged SELECT g FROM generate_series(1, 2500) g",
    'CREATE TABLE "with space" (id int PRIMARY KEY, note text)',
    """INSERT INTO "with space" SELECT g, 'spaced' FROM generate_series(1, 50) g""",
    "CREATE SCHEMA other",
    "CREATE TABLE other.events (id bigint PRIMARY KEY, payload jsonb)",
    "INSERT INTO other.events SELECT g, jsonb_build_object('n', g) FROM generate_series(1, 700) g",
)
PARTITIONS = {("public", "parted_0"), ("public", "parted_1")}
"""The partitions of the enum-hashed tree, loaded through its root."""


@pytest.fixture
def awkward_database(pg18_databases) -> str:
    dbs = pg18_databases
    database = dbs.create()
    dbs.execute(database, *AWKWARD_SCHEMA)
    fill_big_table(dbs, database)  # enough rows that pg_restore is still busy after the small tables
    return database


def connector(url):
    return lambda: psycopg_connect(url, options=CHECKSUM_SESSION_OPTIONS)


def test_pg_restore_names_each_table_whose_rows_are_in(pg18_databases, awkward_database, tmp_path: Path):
    """pg_restore -j2 --verbose on a real dump: each table's data entry is reported once when it
    finishes (partitions included: the checker, not the parser, leaves them out), except the
    table whose name has a space, which `--list` prints ambiguously; serially nothing is."""
    dbs = pg18_databases
    dump = tmp_path / "awkward.dump"
    subprocess.run([program("pg_dump"), "-Fc", "-Z0", "-f", str(dump), "-d", awkward_database],
                   env=libpq_environment(dbs.url(awkward_database)), check=True)
    with dbs.connect(awkward_database) as connection, connection.cursor() as cursor:
        tables = set(list_tables(cursor))
    assert ("public", "with space") in tables and PARTITIONS <= tables

    for jobs in (2, 1):
        target = dbs.create()
        loaded: list[tuple[str, str]] = []
        url = dbs.url(target)
        run_pg_restore(url, dump, jobs, server_version(url, "test"),
                       on_table_loaded=lambda schema, name: loaded.append((schema, name)))
        if jobs == 2:
            assert sorted(loaded) == sorted(tables - {("public", "with space")})
        else:
            assert loaded == [], "serial pg_restore says nothing of when a table's data is in"


def test_checks_beside_skip_partitions_and_the_final_pass_reuses_them(pg18_databases, awkward_database):
    """Tables told to the checker are checked on its own connection (a range partition too),
    the enum-hashed tree's partitions and unknown names excepted; the final pass takes those checks as they are and checks every other
    table, so the whole list equals a plain `table_checks` of the database."""
    dbs = pg18_databases
    url = dbs.url(awkward_database)
    beside = TableChecksBeside(connector(url))
    for table in [("public", "parted_0"), ("public", "plain"), ("other", "events"), ("public", "ranged_low"),
                  ("public", "no_such_table")]:
        beside.table_loaded(*table)
    done = beside.stop(drain=True)

    assert set(done) == {("public", "plain"), ("other", "events"), ("public", "ranged_low")}
    assert beside.error is None
    with psycopg_connect(url, options=CHECKSUM_SESSION_OPTIONS) as connection:
        everything = table_checks(connection)
    assert table_checks_concurrently(connector(url), workers=2, done=done) == everything

    # What was checked beside is used, not queried again: a value planted there comes out.
    planted = TableCheck("public", "plain", 1, "h:planted")
    spread = table_checks_concurrently(connector(url), workers=2, done={("public", "plain"): planted})
    assert planted in spread and len(spread) == len(everything)


def test_restore_with_checks_beside_verifies_an_awkward_schema(pg18_databases, awkward_database, local_case):
    """The whole restore (-j2, checks beside pg_restore) of the awkward schema: verified equal
    to the manifest, every table's rows back. The enum-hashed partitions hold other rows than
    at backup time (the enum's new OIDs route them anew), yet the tree as a whole is equal."""
    dbs = pg18_databases
    store = local_case.store
    manifest = create_backup(store, [DatabaseTarget("platform", dbs.url(awkward_database))])

    report = restore_backup(store, get_backup(store, manifest.backup_id),
                            [DatabaseTarget("platform", dbs.url(awkward_database))], jobs=2, upgrade_platform=False)

    assert report.ok, report.problems
    painted = next(t for t in manifest.database("platform").tables if t.name == "painted")
    assert painted.checksum.startswith("t:"), "an enum column's hash differs after a restore: row text is used"
    restored = report.databases[0].restored_as
    dbs.names.append(restored)
    restored_rows, live_rows = count_rows(dbs, restored), count_rows(dbs, awkward_database)
    trees = [sum(rows[f"public.{name}"] for _, name in PARTITIONS) for rows in (restored_rows, live_rows)]
    assert trees[0] == trees[1] == 4000
    assert {k: v for k, v in restored_rows.items() if "parted" not in k} == {
        k: v for k, v in live_rows.items() if "parted" not in k}
    verify = next(step for step in report.steps if step.name == "verify platform")
    assert verify.detail.startswith(f"{len(manifest.database('platform').tables)} tables")
    assert verify.detail.endswith("rows compared: equal to the manifest")


def test_a_table_that_differs_still_fails_the_restore_and_nothing_is_left(pg18_databases, awkward_database,
                                                                        local_case):
    """A manifest whose checksum of `plain` differs from its restored rows, and whose partition
    tree `parted` counts one row more than was restored (as a dump damaged in a way no
    byte-level check sees would give): whether checked beside pg_restore or in the final pass,
    the verify fails naming both (a partition tree is compared as a whole, and the whole
    differs), and clean up drops the scratch database (no check's connection keeps it open)."""
    dbs = pg18_databases
    store = local_case.store
    targets = [DatabaseTarget("platform", dbs.url(awkward_database))]
    manifest = create_backup(store, targets)
    state = plan_restore(store, get_backup(store, manifest.backup_id), targets, jobs=2)
    plan = state.databases[0]
    plan.dump.tables = [TableCheck(t.schema, t.name, t.rows, "h:1") if t.name == "plain"
                        else TableCheck(t.schema, t.name, t.rows + 1, t.checksum) if t.name == "parted_0" else t
                        for t in plan.dump.tables]

    fetch(state)
    restore_database(state, plan)
    with pytest.raises(RestoreError) as differs:
        verify_database(state, plan)
    clean_up(state, failed=True)

    assert "table public.plain has the backup's row count but different content" in str(differs.value)
    assert "table public.parted_0 has" in str(differs.value)
    assert database_names(dbs, f"{awkward_database}_") == [], "clean up left the scratch database"
