"""A real Redis (Debian's `redis-server`) on a free loopback port, no persistence."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import find_program, free_port, missing_service, server_process


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """Stop the server as a crash would (SIGKILL) and wait until it is gone."""
        self.process.kill()
        self.process.wait(timeout=20)


def start_redis(tmp_path_factory) -> Iterator[RedisServer]:
    program = find_program("redis-server", Path("/usr/bin/redis-server"))
    if program is None:
        missing_service("redis-server", "install Debian's redis-server package (scripts/test does)")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no"]
    with server_process(args, port, workdir, deadline_s=30) as process:
        yield RedisServer(port, process)


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A Redis of this test's own (tests kill it or fill it)."""
    yield from start_redis(tmp_path_factory)
