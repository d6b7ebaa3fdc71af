"""What `maestro restore` and `maestro drill` print while they work, read as a CI log reads it:
the installed entry point with its output piped (no terminal), against a platform and an
MLflow database (with a production model) on the embedded PostgreSQL.

Without a terminal there are no bars: one line per step as it ends, every long step
included (pg_restore per database, amcheck, the MLflow smoke test), sizes in one unit, places
a user can go to, and nothing meant for a markdown renderer."""

from __future__ import annotations

import re
from pathlib import Path

from maestro_pipelines.backup import list_backups
from maestro_pipelines.formatting import human_bytes

from ..test_cli import run_maestro

RESTORE_STEPS = ("download and check", "pg_restore platform", "verify platform", "migrations (platform)",
                 "pg_restore mlflow", "verify mlflow", "artifacts")
DRILL_STEPS = RESTORE_STEPS + ("amcheck platform", "amcheck mlflow", "mlflow registry smoke test",
                               "drop scratch databases")
SIZE = re.compile(r"\b[\d.,]+ ([KMGT]?i?B|[kMGT]B)\b")


def step_lines(stderr: str, step: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{step}: ")]


def assert_places_are_real(line: str, password: str | None) -> None:
    """`... on socket /folder` names a folder that exists; `host:port/db` carries no password."""
    socket = re.search(r" on socket (\S+)", line)
    if socket:
        assert Path(socket.group(1)).is_dir(), line
    else:
        assert re.search(r"\S+:\d+/\w+", line), line
    assert not password or password not in line


def test_restore_and_drill_print_one_line_per_step_when_piped(drill_env, tmp_path):
    env = {"MAESTRO_HOME": str(tmp_path / "cli-home"), "MAESTRO_DATABASE_URL": drill_env.databases.platform_url,
           "MAESTRO_STORE_URL": drill_env.store_dir.as_uri()}
    backup = run_maestro("backup", "run", env=env)
    assert backup.returncode == 0, backup.stderr
    [manifest] = [entry.manifest for entry in list_backups(drill_env.store())]
    for dump in manifest.databases:  # the dump's line and the table say the same size
        [line] = [line for line in backup.stderr.splitlines() if line.startswith(f"dump {dump.role} (")]
        [row] = [row for row in backup.stdout.splitlines() if f" {dump.role} " in row]
        assert human_bytes(dump.dump_bytes) in line and human_bytes(dump.dump_bytes) in row, (line, row)

    restore = run_maestro("restore", env=env)
    assert restore.returncode == 0, restore.stderr
    drill = run_maestro("drill", env=env)
    assert drill.returncode == 0, drill.stderr

    for result, steps in ((restore, RESTORE_STEPS), (drill, DRILL_STEPS)):
        said = result.stdout + result.stderr
        assert "━" not in result.stderr and "**" not in said, result.stderr  # no bars, no markdown
        for step in steps:
            assert len(step_lines(result.stderr, step)) == 1, f"{step}:\n{result.stderr}"
        # One unit for sizes, and the same number for the same dump wherever it is shown.
        assert {unit for unit in SIZE.findall(said)} <= {"B", "KiB", "MiB", "GiB"}, said
        for dump in manifest.databases:
            [line] = [line for line in result.stderr.splitlines() if line.startswith(f"download {dump.role} (")]
            assert human_bytes(dump.dump_bytes) in line, line
        [restored] = step_lines(result.stderr, "pg_restore platform")
        assert re.search(r": [\d,]+ entries into ", restored), restored
        assert_places_are_real(restored, drill_env.databases.server.admin_url.password)
    [smoke] = step_lines(drill.stderr, "mlflow registry smoke test")
    assert "1 production aliases resolve" in smoke, smoke
    [amcheck] = step_lines(drill.stderr, "amcheck mlflow")
    assert re.search(r": [1-9]\d* btree indexes", amcheck), amcheck


def test_restore_job_logs_each_step_as_plain_text(drill_env):
    """The Dagster restore job logs the same steps, one line each as it ends, in text the run's
    log shows as it is (the markdown goes to the metadata only)."""
    drill_env.take_backup()
    result = drill_env.run("restore_database")
    assert result.success
    logs = [e.user_message for e in drill_env.instance.all_logs(result.run_id) if e.user_message]
    for step in RESTORE_STEPS:  # when it ends (a long one also says where it is on the way)
        ended = [m for m in logs if m.startswith(f"{step}: ") and re.search(r" \(\d+\.\d s\)$", m)]
        assert len(ended) == 1, (step, logs)
    [done] = [message for message in logs if message.startswith("Restore of backup ")]
    assert "- platform: restored into " in done and "**" not in done and "`" not in done, done
