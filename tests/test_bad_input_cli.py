"""Bad input to `maestro`, as a user types it: one clear line on stderr naming what is wrong
and what to do, exit code 1, never "unexpected", never a traceback, never a screenful.

Every command runs as the installed entry point in its own process (`run_maestro`). The
cases refused before anything is opened share nothing: MAESTRO_DATABASE_URL points at a port
nothing listens on, so a value that slipped through to the database would fail with
"nothing accepts connections" instead of the expected line. The cases that need a backup
share one embedded server and store (a module fixture), each making the backup it damages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

from .backup.conftest import wait_until
from .services import free_port
from .test_cli import MAESTRO, run_maestro

LONG_NAME = "a" * 10_000


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 1, exactly one non-empty stderr line, an `error:` naming each of `expected`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert_error_line(lines[0], *expected)
    return lines[0]


def assert_error_line(line: str, *expected: str) -> None:
    assert line.startswith("error: "), line
    assert "unexpected" not in line and "Traceback" not in line, line
    for fragment in expected:
        assert fragment in line, (fragment, line)


@pytest.fixture
def nowhere(tmp_path) -> dict[str, str]:
    """A configuration whose database cannot be reached: whatever is refused here was refused
    before the database (or the store) was touched."""
    (tmp_path / "store").mkdir()
    return {
        "MAESTRO_HOME": str(tmp_path / "home"),
        "MAESTRO_DATABASE_URL": f"postgresql://maestro:pw@127.0.0.1:{free_port()}/maestro",
        "MAESTRO_STORE_URL": (tmp_path / "store").as_uri(),
    }


REFUSED_UP_FRONT = {
    # Gates are fractions in [0, 1]; NaN, infinities and 1e309 (which parses as infinity) too.
    "gate-nan": (["tenants", "add", "acme", "--min-accuracy", "nan"], ["accuracy gate nan", "from 0 to 1", "--min-accuracy"]),
    "gate-minus-inf": (["tenants", "add", "acme", "--min-accuracy", "-inf"], ["accuracy gate -inf", "--min-accuracy"]),
    "gate-1e309": (["tenants", "add", "acme", "--min-accuracy", "1e309"], ["accuracy gate inf", "--min-accuracy"]),
    "gate-above-one": (["tenants", "add", "acme", "--min-accuracy", "1.5"], ["accuracy gate 1.5", "from 0 to 1"]),
    "gate-negative": (["tenants", "add", "acme", "--min-f1", "-3"], ["f1 gate -3", "--min-f1"]),
    "gate-roc-auc": (["tenants", "add", "acme", "--min-roc-auc", "2"], ["roc_auc gate 2", "--min-roc-auc"]),
    "tolerance-negative": (["tenants", "add", "acme", "--regression-tolerance", "-0.1"],
                           ["regression tolerance -0.1", "--regression-tolerance"]),
    "tenant-name-long": (["tenants", "add", LONG_NAME], ["not a valid tenant name", "10,000 characters", "1 to 63"]),
    # Brackets are text, not Rich markup: "pip install 'maestro-pipelines[s3]'" lost its [s3].
    "tenant-name-brackets": (["tenants", "add", "acme[red]"], ["'acme[red]' is not a valid tenant name"]),
    "archive-far-future": (["backup", "archive", "--month", "9999-12"], ["9999-12 has not begun", "--month"]),
    "archive-not-a-month": (["backup", "archive", "--month", "2026-13"], ["'2026-13' is not a month", "YYYY-MM"]),
    "level-too-high": (["backup", "run", "--level", "99"], ["compression level 99", "-7 to 22"]),
    "level-too-low": (["backup", "run", "--level", "-200"], ["compression level -200", "-7 to 22"]),
    "restore-jobs-zero": (["restore", "--jobs", "0"], ["0 parallel pg_restore jobs", "1 to 32"]),
    "restore-jobs-negative": (["restore", "--jobs", "-5"], ["-5 parallel pg_restore jobs", "1 to 32"]),
    "restore-jobs-too-many": (["restore", "--jobs", "33"], ["33 parallel pg_restore jobs", "1 to 32"]),
    "restore-same-database-twice": (["restore", "--databases", "platform,platform"],
                                    ["'platform' twice", "at most once"]),
    "restore-empty-database": (["restore", "--databases", "platform,,mlflow"], ["empty database role"]),
    "restore-target-uppercase": (["restore", "--target", "LIVE"], ["Unknown restore target 'LIVE'", "'live'"]),
    "drill-jobs-zero": (["drill", "--jobs", "0"], ["0 parallel pg_restore jobs", "1 to 32"]),
    "drill-rto-nan": (["drill", "--rto-minutes", "nan"], ["RTO target nan", "--rto-minutes"]),
    "drill-rto-zero": (["drill", "--rto-minutes", "0"], ["RTO target 0", "above 0"]),
    "drill-rpo-1e309": (["drill", "--rpo-hours", "1e309"], ["RPO target inf", "--rpo-hours"]),
    "retention-daily-zero": (["backup", "retention", "--daily", "0"], ["retention policy refused", "--daily 1"]),
}


@pytest.mark.parametrize("args, expected", REFUSED_UP_FRONT.values(), ids=REFUSED_UP_FRONT.keys())
def test_bad_values_are_refused_in_one_line_before_anything_is_opened(nowhere, args, expected):
    result = run_maestro(*args, env=nowhere)
    line = assert_one_error_line(result, *expected)
    assert "nothing accepts connections" not in line
    # Nothing announced, nothing half done: the only output is the refusal.
    assert result.stdout.strip() == ""
    if LONG_NAME in args:
        assert len(result.stdout + result.stderr) < 300, len(result.stderr)


USAGE_ERRORS = {
    # What the command line itself refuses (a word for a number, a typo in an option): one
    # line too, exit 2 as for every usage error, not a framed box with the usage above it.
    "gate-not-a-number": (["tenants", "add", "acme", "--min-accuracy", "abc"],
                          ["Invalid value for '--min-accuracy'", "maestro tenants add --help"]),
    "jobs-not-a-number": (["restore", "--jobs", "x"], ["Invalid value for '--jobs'", "maestro restore --help"]),
    "unknown-option": (["db", "status", "--verbose"], ["No such option: --verbose", "maestro db status --help"]),
    "missing-argument": (["tenants", "add"], ["Missing argument 'NAME'", "maestro tenants add --help"]),
    "unknown-command": (["backup", "frobnicate"], ["No such command 'frobnicate'", "maestro backup --help"]),
    # `maestro restore latest`: the backup goes after --backup, and the error says so.
    "restore-backup-as-word": (["restore", "latest"], ["No such command 'latest'", "maestro restore --backup latest"]),
    # Brackets in what the user typed are text, not Rich markup that swallows them.
    "brackets-kept": (["db", "status", "--x[red]"], ["No such option: --x[red]", "maestro db status --help"]),
}


@pytest.mark.parametrize("args, expected", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_are_one_line_too(nowhere, args, expected):
    result = run_maestro(*args, env=nowhere)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert_error_line(lines[0], *expected)
    assert result.stdout.strip() == ""


def test_a_one_letter_password_is_hidden_without_mangling_the_message(pg15):
    """A role whose password is one letter ("e"): the error about a missing database still
    reads as it should (hiding every "e" used to turn it into `databas*** "..." do***s not
    ***xist`, which also hid what was wrong). Needs password authentication, which Debian's
    PostgreSQL 15 here uses over TCP."""
    import psycopg

    role = f"cli_pw_{os.getpid()}"
    admin = pg15.admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'e'")
    try:
        url = pg15.admin_url.set(drivername="postgresql", username=role, password="e", database="no_such_db")
        result = run_maestro("db", "status", env={"MAESTRO_DATABASE_URL": url.render_as_string(hide_password=False)})
        line = assert_one_error_line(result, "database 'no_such_db' does not exist", "MAESTRO_DATABASE_URL")
        assert "***" not in line and ":e@" not in line
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


# ---- cases that need a backup: one embedded server and store for all of them ---------------


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """An embedded server kept running (as `maestro db start` keeps it) with a migrated
    platform database; the store is the home's `store` folder."""
    home = tmp_path_factory.mktemp("bad-input") / "home"
    env = {"MAESTRO_HOME": str(home)}
    started = run_maestro("db", "start", env=env)
    assert started.returncode == 0, started.stderr
    try:
        upgraded = run_maestro("db", "upgrade", env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        yield home, env
    finally:
        EmbeddedPostgres(home).stop()


def new_backup(env: dict[str, str]) -> str:
    import json

    run = run_maestro("backup", "run", "--json", env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["id"]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_refused_live_restore_announces_nothing(shared_home):
    """`maestro restore --target live` without --confirm is refused in one line; it used to
    print "restoring ... into the LIVE databases" first, as if it had begun."""
    home, env = shared_home
    backup_id = new_backup(env)
    result = run_maestro("restore", "--backup", backup_id, "--target", "live", env=env)
    assert_one_error_line(result, "replaces them", "--confirm maestro")
    assert "restoring" not in result.stdout + result.stderr


def test_a_truncated_dump_is_reported_by_its_size_not_a_sha256_it_does_not_have(shared_home):
    """A dump cut short in the store: the restore says it has fewer bytes than the manifest,
    and shows no sha256: the one the store recorded at write time (and the manifest's, the
    same) is not the hash of what is there now."""
    home, env = shared_home
    backup_id = new_backup(env)
    dump = home / "store" / "backups" / backup_id / "platform.dump.zst"
    size = dump.stat().st_size
    os.truncate(dump, size // 2)
    result = run_maestro("restore", "--backup", backup_id, env=env)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert_error_line(line, f"backups/{backup_id}/platform.dump.zst", f"{size // 2} bytes", str(size))
    assert "sha256" not in line


def test_a_drill_whose_restore_failed_does_not_say_rpo_ok(shared_home):
    """The drilled backup's dump is damaged, so the drill's restore fails: the drill exits 1,
    says why, and no longer prints "RPO ... ok" as if the backup were a good restore point."""
    home, env = shared_home
    backup_id = new_backup(env)
    os.truncate(home / "store" / "backups" / backup_id / "platform.dump.zst", 10)
    result = run_maestro("drill", "--backup", backup_id, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "drill FAILED" in result.stderr and "platform.dump.zst" in result.stderr
    rpo_lines = [line for line in result.stdout.splitlines() if line.startswith("RPO")]
    assert rpo_lines and all("ok" not in line.split(":", 1)[-1] for line in rpo_lines), result.stdout
    assert "RPO not judged" in result.stdout


def test_a_corrupt_archive_source_is_named_not_its_destination(shared_home):
    """The month's newest verified backup rots in place (a byte flipped, size and mtime kept,
    so only reading it shows it): `maestro backup archive` names the damaged object under
    backups/, not the monthly/ key it was being copied to, which does not exist."""
    home, env = shared_home
    backup_id = new_backup(env)
    dump = home / "store" / "backups" / backup_id / "platform.dump.zst"
    stat = dump.stat()
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    os.utime(dump, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    month = time.strftime("%Y-%m", time.gmtime())
    result = run_maestro("backup", "archive", "--month", month, env=env)
    assert_one_error_line(result, f"Object 'backups/{backup_id}/platform.dump.zst'", "is corrupt")


def _socket_dir(home: Path) -> Path:
    found = EmbeddedPostgres(home).socket_dir()
    assert found is not None
    return found


def _the_dump(pid: int):
    """The backup's dump process (`pg_dump --version`, run first, is a pg_dump child too)."""
    try:
        return next((p for p in psutil.Process(pid).children(recursive=True)
                     if p.name() == "pg_dump" and any(a.startswith("--snapshot=") for a in p.cmdline())), None)
    except psutil.NoSuchProcess:
        return None


def test_a_killed_pg_dump_says_it_was_killed(shared_home):
    """pg_dump killed from outside (the OOM killer, an operator) mid-backup: the backup fails
    in one line saying pg_dump was killed by SIGKILL, not "no message". pg_dump is held on a
    table lock so the kill lands while it runs; it is found as the CLI's child process."""
    import psycopg

    home, env = shared_home
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
    with psycopg.connect(host=str(_socket_dir(home)), user="postgres", dbname="maestro") as locker:
        locker.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        backup = subprocess.Popen([MAESTRO, "backup", "run", "--no-verify"], env={**clean, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            pg_dump = wait_until("pg_dump under the backup", lambda: _the_dump(backup.pid), backup)
            os.kill(pg_dump.pid, signal.SIGKILL)
            stdout, stderr = (output.decode() for output in backup.communicate(timeout=120))
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.communicate()
        locker.rollback()
    result = subprocess.CompletedProcess(backup.args, backup.returncode, stdout, stderr)
    assert result.returncode == 1, stdout + stderr
    [line] = error_lines(result)
    assert_error_line(line, "pg_dump of platform database 'maestro'", "killed by SIGKILL")
    assert "no message" not in line


def test_the_jobs_refuse_what_the_cli_refuses():
    """The Launchpad's restore and drill configs take the same ranges as the CLI: the values
    refused above are refused there too, with a message naming the field."""
    import pydantic

    from maestro_pipelines.assets.drills import DrillConfig
    from maestro_pipelines.jobs.restore import RestoreConfig

    for config, values, field in (
        (RestoreConfig, {"jobs": 0}, "jobs"), (RestoreConfig, {"jobs": 33}, "jobs"),
        (RestoreConfig, {"databases": ["platform", "platform"]}, "twice"),
        (RestoreConfig, {"target": "LIVE"}, "target"),
        (DrillConfig, {"jobs": -5}, "jobs"), (DrillConfig, {"rto_target_minutes": float("nan")}, "rto_target_minutes"),
        (DrillConfig, {"rpo_target_hours": float("inf")}, "rpo_target_hours"),
    ):
        with pytest.raises(pydantic.ValidationError, match=field):
            config(**values)
    # The configs write the library's limits out (importing it would load SQLAlchemy with the
    # definitions): the same edges on both sides.
    from maestro_pipelines.backup.drill import MAX_RPO_HOURS, MAX_RTO_MINUTES
    from maestro_pipelines.backup.restore import MAX_JOBS

    assert RestoreConfig(jobs=MAX_JOBS, databases=["platform", "mlflow"]).jobs == MAX_JOBS
    assert DrillConfig(jobs=MAX_JOBS, rto_target_minutes=MAX_RTO_MINUTES, rpo_target_hours=MAX_RPO_HOURS).jobs == MAX_JOBS
    for config, field, limit in ((RestoreConfig, "jobs", MAX_JOBS + 1), (DrillConfig, "jobs", MAX_JOBS + 1),
                                 (DrillConfig, "rto_target_minutes", MAX_RTO_MINUTES + 1),
                                 (DrillConfig, "rpo_target_hours", MAX_RPO_HOURS + 1)):
        with pytest.raises(pydantic.ValidationError, match=field):
            config(**{field: limit})


def test_backup_archive_takes_its_default_month_on_the_schedules_clock(nowhere):
    """`maestro backup archive` without --month archives the previous month in MAESTRO_TIMEZONE,
    as the monthly_archive asset and its schedule do (it took UTC's): a time zone that is not
    one is refused in one line before the store is opened, and --month needs no time zone."""
    result = run_maestro("backup", "archive", env={**nowhere, "MAESTRO_TIMEZONE": "Mars/Olympus"})
    assert_one_error_line(result, "MAESTRO_TIMEZONE 'Mars/Olympus' is not a time zone", "IANA name")
    assert result.stdout.strip() == ""
    from maestro_pipelines.clock import previous_month

    tokyo_new_year = datetime(2026, 12, 31, 16, 30, tzinfo=timezone.utc)  # 01:30 on 1 January in Tokyo
    assert previous_month(tokyo_new_year, "Asia/Tokyo") == "2026-12"
    assert previous_month(tokyo_new_year, "UTC") == "2026-11"
