"""One embedded PostgreSQL shared by many Maestro processes, as a user meets it: nothing
configured but MAESTRO_HOME, a process holding a connection (the Dagster webserver, a run
worker; here tests/embedded_child.py), and `maestro` commands run one after another and at
the same time. Attaching must never restart the server (a restart kills every other
process's connections), the server's log stays in pgdata/log, and the last live process
stops the server even when another was killed with -9."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres

from .test_cli import MAESTRO

REPO_ROOT = Path(__file__).parent.parent
DEADLINE_S = 180


@pytest.fixture
def home(tmp_path):
    """A fresh MAESTRO_HOME; whatever the test leaves running is stopped afterwards."""
    home = tmp_path / "home"
    yield home
    EmbeddedPostgres(home).stop()


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: MAESTRO_HOME only, no database or store URL."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_", "DAGSTER_"))}
    tmp = home.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**clean, "MAESTRO_HOME": str(home), "TMPDIR": str(tmp)}


def start_maestro(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([MAESTRO, *args], env=user_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(command: subprocess.Popen) -> str:
    """Wait for a `maestro` command; fail with its output unless it exits 0."""
    out, err = command.communicate(timeout=DEADLINE_S)
    assert command.returncode == 0, f"{command.args[1:]} exited {command.returncode}:\n{out}\n{err}"
    return out


def postmaster_pid(home: Path) -> int:
    return int((home / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


class Holder:
    """tests/embedded_child.py: a process attached to the server with one connection open."""

    def __init__(self, home: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.embedded_child"], cwd=REPO_ROOT,
            env={**user_env(home), "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.backend_pid = int(self._line().removeprefix("attached "))

    def _line(self) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while not select.select([self.process.stdout], [], [], 0.5)[0]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the holder process said nothing (exit {self.process.poll()}):\n{self.process.stderr.read()}")
        return self.process.stdout.readline().strip()

    def query(self, sql: str) -> str:
        """Run `sql` on the connection opened at start: 'ok VALUE' or 'error MESSAGE'."""
        self.process.stdin.write(sql.replace("\n", " ") + "\n")
        self.process.stdin.flush()
        return self._line()

    def exit(self) -> int:
        """End of input: the process exits normally, detaching from the server."""
        self.process.stdin.close()
        return self.process.wait(timeout=DEADLINE_S)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=DEADLINE_S)

    def ensure_gone(self) -> None:
        if self.process.poll() is None:
            self.kill()


def test_commands_one_after_another_and_together_never_restart_the_server(home):
    holder = Holder(home)
    try:
        server = postmaster_pid(home)
        for command in (("db", "upgrade"), ("db", "status"), ("tenants", "add", "acme"), ("tenants", "list"),
                        ("backup", "run"), ("backup", "list")):
            finish(start_maestro(home, *command))
            assert postmaster_pid(home) == server, f"`maestro {' '.join(command)}` restarted the server"
        together = [start_maestro(home, "db", "status"), start_maestro(home, "backup", "run")]
        for command in together:
            finish(command)
        assert postmaster_pid(home) == server, "two commands at once restarted the server"
        # The first process's connection lived through all of it: same backend, still answering.
        assert holder.query("SELECT pg_backend_pid()") == f"ok {holder.backend_pid}"
        assert holder.exit() == 0
    finally:
        holder.ensure_gone()


def test_two_backups_and_a_restore_started_together_all_succeed(home):
    for command in (("db", "upgrade"), ("tenants", "add", "acme"), ("backup", "run")):
        finish(start_maestro(home, *command))
    together = [start_maestro(home, "backup", "run"), start_maestro(home, "backup", "run"),
                start_maestro(home, "restore")]
    outputs = [finish(command) for command in together]
    assert "rows equal to the backup" in outputs[2]
    backups = json.loads(finish(start_maestro(home, "backup", "list", "--json")))
    assert len(backups) == 3 and all(b["verified"] for b in backups), backups


def test_a_needed_restart_keeps_the_server_log_in_pgdata(home):
    """A new data folder's first start restarts the server once (shared_preload_libraries):
    after it, the server still writes to pgdata/log, where `maestro` errors point users."""
    holder = Holder(home)
    try:
        probe = f"maestro_log_probe_{uuid.uuid4().hex[:8]}"
        assert holder.query(f"SELECT {probe}").startswith("error")
        log = (home / "pgdata" / "log").read_text()
        assert log.count("database system is ready to accept connections") == 2, log
        assert probe in log.split("database system is ready to accept connections")[-1], log
    finally:
        holder.ensure_gone()


def test_a_process_killed_while_attached_does_not_keep_the_server_running(home):
    """The last live process stops the server at exit (nothing ran `maestro db start`), even
    when another attached process was killed with -9 and never said it left."""
    first, second = Holder(home), Holder(home)
    try:
        server = postmaster_pid(home)
        first.kill()
        assert second.query("SELECT 1") == "ok 1"
        assert second.exit() == 0
        assert not EmbeddedPostgres(home).is_running(), f"postmaster {server} still running after the last process left"
    finally:
        first.ensure_gone()
        second.ensure_gone()


def test_commands_with_different_tmpdirs_start_and_stop_the_server_in_turn(home):
    """Nothing keeps the server up: each command starts it or attaches, and the last to leave
    stops it. Commands started together from different shells (each its own TMPDIR) must
    take turns at that, not start a server that another is stopping."""
    finish(start_maestro(home, "db", "upgrade"))
    for _ in range(2):
        together = []
        for number in range(4):
            tmp = home.parent / f"tmp-{number}"
            tmp.mkdir(exist_ok=True)
            together.append(subprocess.Popen([MAESTRO, "db", "status"], env={**user_env(home), "TMPDIR": str(tmp)},
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for command in together:
            finish(command)
    assert not EmbeddedPostgres(home).is_running()


def test_db_start_keeps_the_server_even_when_another_process_was_attached_first(home):
    """`maestro db start` while the webserver (here a holder) already uses the server: when
    that process exits later, the server keeps running until `maestro db stop`."""
    holder = Holder(home)
    try:
        finish(start_maestro(home, "db", "start"))
        server = postmaster_pid(home)
        assert holder.exit() == 0
        assert EmbeddedPostgres(home).is_running() and postmaster_pid(home) == server, \
            "the server stopped with the last process although `maestro db start` asked to keep it"
        finish(start_maestro(home, "db", "stop"))
        assert not EmbeddedPostgres(home).is_running()
    finally:
        holder.ensure_gone()
