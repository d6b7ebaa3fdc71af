"""Run a program tethered to this process: when this process dies, even by SIGKILL, the
program and every process it forked die too.

pg_restore -j N forks N workers, each with its own server connection. A restore killed
with SIGKILL (OOM killer, `kill -9`, a Dagster run terminated hard) used to leave them
running, still writing into a database nobody will use and holding it open. So pg_restore
is started through this file run as a script (stdlib only, no package import):

    python tethered.py PARENT_PID pg_restore ...

The tether is a new process group (the tether, pg_restore and its workers) and, on Linux,
prctl(PR_SET_PDEATHSIG, SIGTERM): when the parent dies the kernel signals the tether, which
kills its whole group with SIGKILL. The parent death signal is not inherited across fork,
which is why the tether stays in between rather than setting it on pg_restore alone.
Elsewhere (macOS) there is no parent death signal: the program runs untethered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def tethered_command(command: list[str]) -> list[str]:
    """`command` run through the tether on Linux, as it is elsewhere."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *command]


def run_tethered(command: list[str], env: dict[str, str],
                 on_stderr_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(tethered_command(command), capture_output=True, text=True), and if this
    process stops waiting (Ctrl-C, an exception) the whole group is killed, not the tether alone.
    `on_stderr_line` sees each line of stderr as it comes (pg_restore --verbose: progress)."""
    process = subprocess.Popen(tethered_command(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        if on_stderr_line is None:
            stdout, stderr = process.communicate()
        else:
            stdout, stderr = _communicate_by_line(process, on_stderr_line)
    except BaseException:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the tether leads its own group
        except (ProcessLookupError, PermissionError):  # not yet its own group
            process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _communicate_by_line(process: subprocess.Popen, on_line: Callable[[str], None]) -> tuple[str, str]:
    """communicate(), stderr read line by line here while a thread drains stdout (a full
    stdout pipe would otherwise stall the program)."""
    import threading

    chunks: list[str] = []
    drain = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    drain.start()
    lines = []
    for line in process.stderr:
        lines.append(line)
        on_line(line.rstrip("\n"))
    drain.join()
    process.wait()
    return "".join(chunks), "".join(lines)


def _die_with_parent(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    _die_with_parent(parent)
    child = subprocess.Popen(command)
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
