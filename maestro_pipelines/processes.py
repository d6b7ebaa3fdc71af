"""Processes on this host, for the markers and handle lists that must tell a live process from
one that was killed (kill -9 leaves no chance to clean up)."""

from __future__ import annotations


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host. A process killed with -9 stays a
    zombie until its parent reaps it: that counts as dead. Another user's process we may not
    look at counts as alive."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
