"""A backup is one consistent moment: writes that commit while it runs are not in it, and a
restore of it holds exactly the rows and content its manifest counted."""

from __future__ import annotations

from maestro_pipelines.backup import BackupOptions, DatabaseTarget, create_backup
from maestro_pipelines.backup.consistency import compare_checks, table_checks_concurrently
from maestro_pipelines.backup.pgtools import CHECKSUM_SESSION_OPTIONS, psycopg_connect
from tests.backup.conftest import BIG_ROWS, count_rows, fill_big_table, live_checks, restore_dump


def test_writes_during_a_backup_are_not_in_it_and_the_restore_matches_the_manifest(databases, local_case):
    """Rows inserted, updated and deleted after the backup's snapshots were taken (here while
    the first database is half dumped) are in neither the counts nor the dumps, for the
    database being dumped and for the one dumped after it; pg_restore of each dump gives
    exactly the manifest's row counts and content checksums, and the checksums tell a
    changed table from an unchanged one even when its row count is the same."""
    dbs = databases
    platform = dbs.create()
    fill_big_table(dbs, platform)
    dbs.execute(platform, "CREATE TABLE notes (id int PRIMARY KEY, body text, at timestamptz, score float8)",
                "INSERT INTO notes SELECT g, 'note ' || g, now(), g / 3.0 FROM generate_series(1, 100) g")
    mlflow = dbs.create(f"{platform}_mlflow")
    dbs.execute(mlflow, "CREATE TABLE runs (id int PRIMARY KEY, status text, params jsonb, data bytea)",
                "INSERT INTO runs SELECT g, 'RUNNING', jsonb_build_object('lr', g / 100.0), "
                "decode(md5(g::text), 'hex') FROM generate_series(1, 500) g",
                "CREATE TABLE metrics (run_id int, value float8)",
                "INSERT INTO metrics SELECT g % 500 + 1, g * 0.1 FROM generate_series(1, 2000) g")
    before = {"platform": count_rows(dbs, platform), "mlflow": count_rows(dbs, mlflow)}

    writes: list[tuple[str, int]] = []

    def write_during_backup(label: str, done: int, expected: int | None) -> None:
        if writes or not label.startswith("platform") or done == expected:
            return
        writes.append((label, done))
        dbs.execute(platform,
                    f"INSERT INTO big SELECT g, 'late' FROM generate_series({BIG_ROWS + 1}, {BIG_ROWS + 700}) g",
                    "DELETE FROM notes WHERE id <= 10", "UPDATE big SET payload = 'changed' WHERE id <= 50")
        dbs.execute(mlflow, "UPDATE runs SET status = 'FINISHED' WHERE id <= 20",  # same count, new content
                    "INSERT INTO metrics SELECT 1, 0 FROM generate_series(1, 30)")

    targets = [DatabaseTarget("platform", dbs.url(platform)), DatabaseTarget("mlflow", dbs.url(mlflow))]
    options = BackupOptions(artifact_prefix=None)
    manifest = create_backup(local_case.store, targets, options, progress=write_during_backup)
    assert writes, "the backup reported no progress mid-dump: the table is too small for this test"

    now = {"platform": count_rows(dbs, platform), "mlflow": count_rows(dbs, mlflow)}
    assert now["platform"]["public.big"] == BIG_ROWS + 700 and now["mlflow"]["public.metrics"] == 2030
    for role, database in (("platform", platform), ("mlflow", mlflow)):
        dump = manifest.database(role)
        assert {t.qualified: t.rows for t in dump.tables} == before[role]

        restored = restore_dump(local_case.store, dump.key, dbs)
        assert count_rows(dbs, restored) == before[role]
        assert compare_checks(dump.tables, live_checks(dbs.url(restored))) == []
        # A restore's verify spreads the same checks over connections, biggest table first:
        # the same values, in the same order.
        spread = table_checks_concurrently(
            lambda: psycopg_connect(dbs.url(restored), options=CHECKSUM_SESSION_OPTIONS), workers=2)
        assert spread == live_checks(dbs.url(restored)) and len(spread) == len(dump.tables)

    # The same comparison against the live databases finds every later write.
    assert sorted(compare_checks(manifest.database("platform").tables, live_checks(dbs.url(platform)))) == [
        f"table public.big has {BIG_ROWS + 700} rows, the backup had {BIG_ROWS}",
        "table public.notes has 90 rows, the backup had 100",
    ]
    assert sorted(compare_checks(manifest.database("mlflow").tables, live_checks(dbs.url(mlflow)))) == [
        "table public.metrics has 2030 rows, the backup had 2000",
        "table public.runs has the backup's row count but different content",
    ]
