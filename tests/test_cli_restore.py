"""`maestro restore` and `maestro drill` as on-call runs them: the installed entry point, no
Dagster instance, on the embedded default."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from maestro_pipelines.formatting import human_duration
from maestro_pipelines.platform_db.embedded import EmbeddedPostgres, bin_dir

from .test_cli import run_maestro


def psql(home: Path, database: str, sql: str) -> str:
    """psql from the wheel against the embedded server in `home`."""
    result = subprocess.run(
        [str(bin_dir() / "psql"), "-h", str(socket_dir(home)), "-U", "postgres", "-d", database, "-At", "-c", sql],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def kept_server(tmp_path):
    """An embedded server kept running between the CLI's processes (as `maestro db start` does),
    so the test can break it between commands."""
    home = tmp_path / "home"
    env = {"MAESTRO_HOME": str(home)}
    started = run_maestro("db", "start", env=env)
    assert started.returncode == 0, started.stderr
    yield home, env
    EmbeddedPostgres(home).stop()


def socket_dir(home: Path) -> Path:
    found = EmbeddedPostgres(home).socket_dir()
    assert found is not None, f"the embedded server in {home} is not running"
    return found


def dagster_storage_url(home: Path) -> str:
    return f"postgresql+psycopg2://postgres@/dagster?host={socket_dir(home)}"


def test_restore_brings_back_the_platform_and_dagster_databases_with_dagster_gone(kept_server):
    """The worst night: the platform database and Dagster's own storage are both dropped. The
    CLI needs neither Dagster nor its database to bring both back, with their data."""
    from dagster import DagsterRun
    from dagster_postgres import PostgresRunStorage

    home, env = kept_server
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    assert run_maestro("tenants", "add", "acme", env=env).returncode == 0
    psql(home, "postgres", "CREATE DATABASE dagster")
    storage = PostgresRunStorage(postgres_url=dagster_storage_url(home))
    storage.add_run(DagsterRun(job_name="nightly_backup", run_id="0f1e2d3c-0000-4000-8000-000000000001"))
    storage.dispose()
    env = {**env, "MAESTRO_DAGSTER_DATABASE_URL": f"postgresql://postgres@/dagster?host={socket_dir(home)}"}

    backup = run_maestro("backup", "run", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    assert set(json.loads(backup.stdout)["databases"]) == {"platform", "dagster"}
    assert run_maestro("tenants", "add", "globex", env=env).returncode == 0  # after the backup: lost

    psql(home, "postgres", "DROP DATABASE maestro WITH (FORCE)")
    psql(home, "postgres", "DROP DATABASE dagster WITH (FORCE)")

    refused = run_maestro("restore", "--target", "live", env=env)
    assert refused.returncode == 1 and "--confirm maestro" in refused.stderr
    assert "maestro" not in psql(home, "postgres", "SELECT string_agg(datname, ',') FROM pg_database").split(",")

    restored = run_maestro("restore", "--target", "live", "--confirm", "maestro", "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert {d["role"]: d["restored_as"] for d in report["databases"]} == {"platform": "maestro", "dagster": "dagster"}
    assert all(d["kept_as"] is None for d in report["databases"])  # nothing was there to keep

    assert psql(home, "maestro", "SELECT string_agg(name, ',' ORDER BY name) FROM tenants") == "acme"
    storage = PostgresRunStorage(postgres_url=dagster_storage_url(home))
    assert [run.run_id for run in storage.get_runs()] == ["0f1e2d3c-0000-4000-8000-000000000001"]
    storage.dispose()

    drill = run_maestro("drill", "--json", env=env)
    assert drill.returncode == 0, drill.stderr
    result = json.loads(drill.stdout)
    assert result["ok"] and result["rto_s"] > 0 and result["indexes_checked"] > 0
    names = psql(home, "postgres", "SELECT string_agg(datname, ',') FROM pg_database")
    assert "_restore_" not in names  # the drill dropped its scratch databases


def test_live_restore_keeps_the_old_database_until_cleanup(kept_server):
    home, env = kept_server
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    assert run_maestro("tenants", "add", "acme", env=env).returncode == 0
    assert run_maestro("backup", "run", env=env).returncode == 0
    assert run_maestro("tenants", "add", "globex", env=env).returncode == 0

    restored = run_maestro("restore", "--target", "live", "--confirm", "maestro", env=env)
    assert restored.returncode == 0, restored.stderr
    assert "the old one is kept as maestro_pre_restore_" in restored.stdout
    # The closing hint names the database --confirm wants, not a placeholder.
    assert "`maestro restore cleanup` drops the scratch databases, with --confirm maestro also the old live ones" \
        in restored.stdout, restored.stdout
    assert psql(home, "maestro", "SELECT string_agg(name, ',' ORDER BY name) FROM tenants") == "acme"
    kept = psql(home, "postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'maestro_pre_restore_%'")
    assert psql(home, kept, "SELECT string_agg(name, ',' ORDER BY name) FROM tenants") == "acme,globex"

    # The old database is the only way back: `restore cleanup` keeps it unless confirmed, as
    # restore_cleanup_job does (the same defaults), and says how to drop it.
    for command in (["restore", "cleanup"], ["restore", "cleanup", "--dry-run", "--confirm", "maestro"]):
        cleanup = run_maestro(*command, env=env)
        assert cleanup.returncode == 0, cleanup.stderr
        assert "would drop 1 database\n" in cleanup.stdout if "--dry-run" in command else (
            f"kept {kept} (old live database of maestro, " in cleanup.stdout
            and "drop it with --confirm maestro" in cleanup.stdout), cleanup.stdout
        assert psql(home, "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{kept}'") == "1"
    wrong = run_maestro("restore", "cleanup", "--confirm", "maestro_mlflow", env=env)
    assert wrong.returncode == 1 and "Confirm with --confirm maestro" in wrong.stderr
    assert psql(home, "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{kept}'") == "1"
    cleanup = run_maestro("restore", "cleanup", "--confirm", "maestro", env=env)
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"dropped {kept}" in cleanup.stdout and cleanup.stdout.endswith("\ndropped 1 database\n")
    assert psql(home, "postgres", "SELECT count(*) FROM pg_database WHERE datname LIKE 'maestro_%restore_%'") == "0"
    again = run_maestro("restore", "cleanup", env=env)
    assert again.returncode == 0 and again.stdout == "nothing to drop: no database left by a restore\n", again.stdout


@pytest.fixture
def small_tmpdir(tmp_path):
    """A 4 KiB file system (a tmpfs: root may mount one; elsewhere the test is skipped)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_restore_without_room_for_the_dump_says_so_before_touching_anything(kept_server, small_tmpdir):
    """TMPDIR on a file system too small for the decompressed dump: `maestro restore` stops
    with one line naming the folder, its free space and what the dump needs, before any
    database is created; the room is reserved before the first byte is read."""
    home, env = kept_server
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    assert run_maestro("backup", "run", env=env).returncode == 0

    restored = run_maestro("restore", env={**env, "TMPDIR": str(small_tmpdir)})

    assert restored.returncode == 1, restored.stdout
    error = [line for line in restored.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"The restore's work folder {small_tmpdir}/maestro-restore-" in error[0], restored.stderr
    assert "free; the dump needs" in error[0] and "Traceback" not in restored.stderr
    assert "point TMPDIR at a folder with room" in restored.stderr
    assert psql(home, "postgres", "SELECT count(*) FROM pg_database WHERE datname LIKE 'maestro%restore%'") == "0"
    assert list(small_tmpdir.iterdir()) == [], "the restore left its work folder"


def test_drills_from_the_cli_are_recorded_and_listed(kept_server):
    """`maestro drill` says where its record went; a failed drill (missed RTO, exit 1) is
    recorded too; `maestro drill list` shows both, oldest first, as JSON and as a table, and
    names a file in drills/ that is no record instead of failing."""
    home, env = kept_server
    assert run_maestro("db", "upgrade", env=env).returncode == 0
    backup = run_maestro("backup", "run", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    backup_id = json.loads(backup.stdout)["id"]

    good = run_maestro("drill", env=env)
    assert good.returncode == 0, good.stderr
    recorded = [line for line in good.stdout.splitlines() if line.startswith("recorded in the store as drills/")]
    assert len(recorded) == 1 and "`maestro drill list` shows the history" in recorded[0], good.stdout
    missed = run_maestro("drill", "--rto-minutes", "0.00001", "--json", env=env)
    assert missed.returncode == 1 and not json.loads(missed.stdout)["ok"]
    (home / "store" / "drills" / "notes.json").write_text("{}")  # not written by Maestro: no checksum

    listed = run_maestro("drill", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    drills = json.loads(listed.stdout)
    assert [(d["source"], d["ok"], d["backup_id"]) for d in drills] == [("cli", True, backup_id), ("cli", False, backup_id)]
    assert recorded[0].split()[5] == drills[0]["key"] and drills[1]["key"] == json.loads(missed.stdout)["record_key"]
    assert drills[1]["rto_target_s"] == 0.0006 and "over the target" in drills[1]["problems"][0]
    assert drills[0]["rto_s"] > 0 and drills[0]["steps"]["pg_restore platform"] > 0
    assert "warning: skipped" in listed.stderr and "drills/notes.json" in listed.stderr

    table = run_maestro("drill", "list", "--limit", "1", env=env)
    assert table.returncode == 0, table.stderr
    assert "1 drill in file://" in table.stdout and backup_id in table.stdout
    assert "FAILED (cli)" in table.stdout and "over the target" in table.stdout
    # Durations as people say them; the target that differs from the default is the table's.
    assert f"│ {human_duration(drills[1]['rto_s'])} │ {human_duration(drills[1]['rpo_s'])} │" in table.stdout
    assert "targets: RTO 0.0 s, RPO 26 h" in table.stdout
