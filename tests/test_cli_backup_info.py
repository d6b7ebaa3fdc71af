"""`maestro backup info` as on-call runs it first: the installed entry point in a subprocess, a
local folder store, a platform database on the embedded PostgreSQL 18; and the age column of
`maestro backup list`, `latest` (alias `newest`) where a backup is named.

Every state is made the way it happens: backups by `maestro backup run`, a damaged one by
truncating its dump, a running backup by a backup process paused after its last dump, a
killed one by SIGKILL of that process. (The RPO judged against an old snapshot, which needs
a clock, is tested on the library: tests/backup/test_info.py.)"""

from __future__ import annotations

import json
import os
import re

import pytest

from maestro_pipelines.automation import AUTOMATION_ON_COMMAND, AUTOMATION_STATUS_COMMAND
from maestro_pipelines.formatting import human_bytes
from maestro_pipelines.platform_db.migrate import upgrade
from tests.backup.conftest import wait_until
from tests.backup.test_killed import kill, start_backup
from tests.stores.conftest import LocalCase

from .conftest import create_database, drop_database
from .test_cli import run_maestro


@pytest.fixture(scope="module")
def platform(pg18):
    """A migrated platform database; backups only read it, so the module shares it."""
    name = create_database(pg18, "info")
    upgrade(pg18.location(name))
    yield name
    drop_database(pg18, name)


@pytest.fixture
def store(tmp_path) -> LocalCase:
    return LocalCase(tmp_path / "store")


@pytest.fixture
def env(pg18, platform, store, tmp_path):
    """The environment of a production install: MAESTRO_DATABASE_URL and a folder store."""
    return {"MAESTRO_DATABASE_URL": pg18.libpq_url(platform), "MAESTRO_STORE_URL": store.root.as_uri(),
            "MAESTRO_HOME": str(tmp_path / "home")}


def info(env: dict[str, str], expected_code: int) -> tuple[list[str], dict]:
    """`backup info`'s text lines and its --json, each checked for the exit code."""
    text = run_maestro("backup", "info", env=env)
    assert text.returncode == expected_code, text.stdout + text.stderr
    as_json = run_maestro("backup", "info", "--json", env=env)
    assert as_json.returncode == expected_code, as_json.stdout + as_json.stderr
    return text.stdout.splitlines(), json.loads(as_json.stdout)


def words(line: str) -> str:
    return " ".join(line.split())


def field(lines: list[str], key: str) -> str:
    """The value of the text line `key` (`status`, `RPO`, `  latest`, ...)."""
    [value] = [line[12:] for line in lines if line[:12].rstrip() == key]
    return value


def backup_run(env: dict[str, str], *options: str) -> dict:
    done = run_maestro("backup", "run", "--json", *options, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_empty_store_on_the_embedded_default_is_an_error_that_says_what_to_do(tmp_path):
    env = {"MAESTRO_HOME": str(tmp_path / "home")}
    lines, report = info(env, 2)
    assert words(lines[0]) == "status error (no restorable backup)", lines
    assert "error: no restorable backup: the store holds no backup" in lines[1]
    assert "Run `maestro backup run`" in lines[2]
    assert field(lines, "  latest").startswith("none")
    assert field(lines, "RPO").startswith("none: nothing to restore from (target 26 h)")
    # On the embedded default nothing backs up by itself: said as a default (info reads no
    # Dagster state, so it claims nothing about now), with the commands that show and change it.
    said = " ".join(line.strip() for line in lines)
    assert "on the embedded default the backup schedules and sensors start stopped" in said, said
    assert f"see `{AUTOMATION_STATUS_COMMAND}`, turn them on with `{AUTOMATION_ON_COMMAND}`" in said

    assert report["status"] == "error" and report["latest"] is None and report["oldest"] is None
    [reason] = report["reasons"]
    assert reason["level"] == "error" and "maestro backup run" in reason["hint"]
    assert report["rpo"] == {"target_s": 26 * 3600.0, "age_s": None, "ok": False}
    assert report["automation"] == {"stopped_by_default": True, "turn_on": AUTOMATION_ON_COMMAND,
                                    "status": AUTOMATION_STATUS_COMMAND}
    assert report["store"] == (tmp_path / "home" / "store").as_uri()
    # It reads the store only: no embedded server was started for it.
    assert not (tmp_path / "home" / "pgdata").exists()


def test_an_unreadable_store_is_an_error_not_a_crash(tmp_path):
    lines, report = info({"MAESTRO_STORE_URL": "s3://"}, 2)
    assert words(lines[0]) == "status error (store unreadable)", lines
    assert "MAESTRO_STORE_URL" in lines[1]
    assert report["status"] == "error" and report["readable"] is False
    assert report["reasons"][0]["message"].startswith("store unreadable:")
    # Which store: the URL as configured (credentials hidden), not a placeholder.
    lines, report = info({"MAESTRO_STORE_URL": "s3://key:secret@Bad_Bucket/x"}, 2)
    assert report["store"] == "s3://…@Bad_Bucket/x", report["store"]
    assert "secret" not in "\n".join(lines)


def test_info_through_a_backup_an_unverified_one_and_a_damaged_one(env, store):
    first = backup_run(env)
    lines, report = info(env, 0)
    assert words(lines[0]) == "status ok", lines
    assert field(lines, "  latest").startswith(f"{first['id']}: data as of ")
    assert re.search(r" UTC, (just now|[0-9.]+ s ago)$", field(lines, "  latest")), lines
    assert field(lines, "  oldest").startswith(first["id"])
    assert field(lines, "RPO").endswith("(target 26 h): ok")
    assert "start running (MAESTRO_DATABASE_URL is set)" in field(lines, "automation")
    [row] = [line for line in lines if first["id"] in line and line.startswith("│")]
    assert row.split("│")[-2].strip() == "yes"  # the table's verified column
    assert report["status"] == "ok" and report["reasons"] == []
    latest = report["latest"]
    assert latest["id"] == first["id"] and latest["verified"] and not latest["bad"]
    assert 0 <= latest["age_s"] < report["rpo"]["target_s"] and report["rpo"]["ok"] is True
    assert latest["age_s"] <= report["rpo"]["age_s"]  # the RPO is the latest's age, read a moment later
    # The same size as `backup list` says (the dumps and the artifact manifest), in one unit.
    [listed] = json.loads(run_maestro("backup", "list", "--json", env=env).stdout)
    assert latest["stored_bytes"] == listed["stored_bytes"] > sum(d["stored_bytes"] for d in first["databases"].values())
    assert row.split("│")[3].strip() == human_bytes(listed["stored_bytes"])
    assert latest["duration_s"] > 0 and latest["databases"] == ["platform"]
    assert report["automation"] == {"stopped_by_default": False, "turn_on": None, "status": AUTOMATION_STATUS_COMMAND}
    assert field(lines, "monthly") == "none yet (`maestro backup archive`)" and report["monthly"] == []

    month = f"{first['id'][:4]}-{first['id'][4:6]}"
    assert run_maestro("backup", "archive", "--month", month, env=env).returncode == 0
    lines, report = info(env, 0)
    assert re.fullmatch(rf"{month}  {first['id']}  verified, data [0-9.]+ s old", field(lines, "monthly")), lines
    assert [(a["month"], a["id"], a["verified"]) for a in report["monthly"]] == [(month, first["id"], True)]
    assert report["restorable"] == 2 and report["backups"] == 1

    second = backup_run(env, "--no-verify")
    lines, report = info(env, 1)
    assert words(lines[0]) == "status warning (latest backup not verified)", lines
    assert f"Run `maestro backup verify {second['id']}`" in lines[2]
    assert report["latest"]["id"] == first["id"], "an unverified backup is not restorable"
    assert [r["id"] for r in report["recent"]] == [second["id"], first["id"]]
    assert report["recent"][0]["verified"] is False

    # `latest` names the latest backup taken here (the one to verify); `newest` is its alias.
    verified = run_maestro("backup", "verify", "newest", "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["id"] == second["id"], verified.stderr
    assert info(env, 0)[1]["latest"]["id"] == second["id"]

    os.truncate(store.root / "backups" / second["id"] / "platform.dump.zst", 100)
    lines, report = info(env, 2)
    assert words(lines[0]) == "status error (latest backup BAD)", lines
    finding = words(" ".join(lines[1:lines.index(next(line for line in lines if line.startswith("store ")))]))
    assert finding.startswith(f"error: latest backup BAD: {second['id']}:") and "truncated" in finding, lines
    assert f"`maestro restore` takes {first['id']}" in finding
    assert report["latest"]["id"] == first["id"] and report["restorable"] == 2  # first, and its archive
    assert report["recent"][0]["bad"] is True and "truncated" in report["recent"][0]["problem"]


def test_a_running_backup_then_the_same_backup_killed(pg18, platform, store, env, tmp_path):
    backup_run(env)
    child, paused = start_backup(tmp_path, store, [("platform", pg18.location(platform).platform_url)],
                                 pause="dump-committed")
    try:
        wait_until("the pause after the dump", paused.exists, child)
        lines, report = info(env, 0)
        [running] = report["running"]
        assert running["kind"] == "backup" and running["pid"] == child.pid
        assert words(lines[0]) == "status ok (backup running)", lines
        assert field(lines, "running").startswith(f"backup {running['id']} since ")
        assert report["unfinished"] == [] and report["killed"] == [], "a running backup is not debris"
    finally:
        kill(child)

    lines, report = info(env, 1)
    assert words(lines[0]) == "status warning (killed; 1 more below)", lines
    assert report["running"] == []
    assert [k["what"] for k in report["killed"]] == [f"backup {running['id']}"]
    assert [u["root"] for u in report["unfinished"]] == [f"backups/{running['id']}"]
    assert report["unfinished"][0]["objects"] >= 1
    said = "\n".join(lines)
    assert f"unfinished: backups/{running['id']} has " in said and "`maestro backup retention` removes" in said

    assert run_maestro("backup", "retention", env=env).returncode == 0
    cleaned = info(env, 0)[1]
    assert (cleaned["unfinished"], cleaned["killed"]) == ([], [])


def test_backup_list_shows_each_backups_age(env):
    first = backup_run(env)
    table = run_maestro("backup", "list", env=env)
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "id" in line and "verified" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["id", "age", "databases", "stored", "verified", "sealed"]
    [row] = [line for line in table.stdout.splitlines() if first["id"] in line]
    age = row.split("│")[2].strip()
    assert age.endswith(" s") or age.endswith(" min"), row
    [entry] = json.loads(run_maestro("backup", "list", "--json", env=env).stdout)
    assert 0 <= entry["age_s"] < 3600


def test_a_drill_of_newest_drills_the_latest_and_info_shows_it(env):
    """`newest` is an alias of `latest` wherever a backup is named (here `drill --backup`, which
    resolves it as `restore --backup` does); the drill's record in the store is what info shows."""
    first = backup_run(env)
    drilled = run_maestro("drill", "--backup", "newest", "--json", env=env)
    assert drilled.returncode == 0, drilled.stderr
    assert json.loads(drilled.stdout)["backup_id"] == first["id"]
    lines, report = info(env, 0)
    drill = report["drill"]
    assert drill["ok"] is True and drill["backup_id"] == first["id"] and drill["source"] == "cli"
    assert 0 < drill["rto_s"] < drill["rto_target_s"] == 900
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \(cli\): ok, RTO [0-9.]+ s \(target 15 min\)",
                        field(lines, "drill")), lines
    # The help says `latest`; `newest` is only the alias.
    for command in ("restore", "drill"):
        helped = " ".join(run_maestro(command, "--help", env=env).stdout.split())
        assert "`latest`" in helped and "`newest` is accepted too" in helped, helped


def table_rows(text: str) -> list[list[str]]:
    """The cells of a rich table's body rows (one list per printed line)."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_at_80_columns_every_table_fits_and_keeps_ids_and_times_whole(env):
    """On a laptop's 80-column terminal: no line wider than the terminal, backup ids and times
    never cut (they are copied into other commands), durations as people say them; the seconds
    stay in --json. `backup verify` alone verifies the latest backup, as restore and drill
    default to it."""
    first = backup_run(env)
    narrow = {**env, "COLUMNS": "80"}
    drilled = run_maestro("drill", env=narrow)
    assert drilled.returncode == 0, drilled.stderr
    assert re.search(r"^RTO [0-9.]+ s \(target 15 min\): ok$", drilled.stdout, re.M), drilled.stdout
    assert re.search(r"^RPO ([0-9.]+ s|\d+ min( \d+ s)?) \(target 26 h\): ok$", drilled.stdout, re.M), drilled.stdout
    assert re.search(r"^\d+ btree indexes checked, 0 production aliases resolved$", drilled.stdout, re.M)
    shown = {"drill": drilled.stdout}
    for command in (["drill", "list"], ["backup", "list"], ["backup", "info"], ["restore", "cleanup", "--dry-run"],
                    ["backup", "verify"]):
        done = run_maestro(*command, env=narrow)
        assert done.returncode == 0, done.stdout + done.stderr
        shown[" ".join(command)] = done.stdout
    for command, stdout in shown.items():
        # A line naming the store is never broken (people copy the path): the terminal wraps it.
        too_wide = [line for line in stdout.splitlines() if len(line.rstrip()) > 80 and "file://" not in line]
        assert too_wide == [], f"maestro {command}:\n" + stdout

    [drill_row] = table_rows(shown["drill list"])
    assert drill_row[:2] == [re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", drill_row[0])[0], first["id"]], drill_row
    assert re.fullmatch(r"[0-9.]+ s", drill_row[2]) and re.fullmatch(r"[0-9.]+ s|\d+ min( \d+ s)?", drill_row[3])
    assert drill_row[4] == "ok (cli)"
    assert "targets: RTO 15 min, RPO 26 h" in shown["drill list"]
    [listed] = json.loads(run_maestro("drill", "list", "--json", env=narrow).stdout)
    assert (listed["rto_target_s"], listed["rpo_target_s"]) == (900, 26 * 3600) and listed["rto_s"] > 0
    assert [row[0] for row in table_rows(shown["backup list"])] == [first["id"]]
    assert [row[0] for row in table_rows(shown["backup info"])] == [first["id"]]
    assert field(shown["backup info"].splitlines(), "automation").startswith("the backup schedules and sensors start")
    assert shown["restore cleanup --dry-run"].strip() == "nothing to drop: no database left by a restore"
    assert shown["backup verify"].startswith(f"backup {first['id']} verified: ")
    verified = run_maestro("backup", "verify", "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["id"] == first["id"], verified.stderr
