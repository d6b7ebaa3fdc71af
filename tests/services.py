"""Starting real servers for tests: free ports, readiness by polling, clean stops.

Test fixtures start each server on 127.0.0.1 on a free port, wait until it accepts
connections (polling the port, never a fixed sleep), and stop it by its PID afterwards.
Servers that need a package installed first (MariaDB, Azurite, bqemulator) are installed by
`scripts/test`; when one is missing the tests that need it skip locally and fail under CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).parent.parent
CACHE = REPO_ROOT / ".cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_service(what: str, how: str) -> None:
    """Skip when a service cannot run here; under CI a missing service is a failure."""
    message = f"{what} is not available: {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_program(name: str, *candidates: Path) -> str | None:
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def wait_for_port(port: int, process: subprocess.Popen | None, log: Path | None, deadline_s: float = 60) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + deadline_s
    while True:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s") from None
            time.sleep(0.1)


@contextmanager
def server_process(
    args: list[str], port: int, workdir: Path, env: dict[str, str] | None = None, deadline_s: float = 60
) -> Iterator[subprocess.Popen]:
    """Run `args` until the block ends; ready once `port` accepts connections."""
    log_path = workdir / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        args, cwd=workdir, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, process, log_path, deadline_s)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        log.close()


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most (start, end) intervals open at one moment (one ending as another starts: not
    both): how many runs ran at once, from their start and end times."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = most = 0
    for _, change in edges:
        open_now += change
        most = max(most, open_now)
    return most
