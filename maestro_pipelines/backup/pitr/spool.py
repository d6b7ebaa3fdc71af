"""The pusher: moves the WAL files the embedded server's archive_command spooled into the
store, one Maestro process per MAESTRO_HOME.

The server runs archive_command as its own OS user (`embedded_postgres` when Maestro runs as
root), which cannot run a Maestro installed in root's home folder; so the command is a few
lines of shell that copy each finished WAL file into `MAESTRO_HOME/wal-spool`
(`platform_db.embedded.spool_archive_command`), and this process, started by whichever
Maestro process starts the server or attaches and finds no pusher alive, pushes each file
with `push_wal` and deletes it only once the store has it.

    python -m maestro_pipelines.backup.pitr.spool MAESTRO_HOME

It holds `MAESTRO_HOME/.wal-pusher.lock` while it runs (a second one leaves at once), writes
its pid to `wal-pusher.pid`, logs to `wal-pusher.log` (what it could not push, and why), and
leaves when told (SIGTERM, `maestro db stop`) or when the server has been gone for
LINGER_S, in both cases after pushing what the spool still holds.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.layout import WalError
from maestro_pipelines.backup.pitr.wal import push_wal
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage import StoreError
from maestro_pipelines.platform_db.embedded import PUSHER_LOCK, PUSHER_PID, WAL_SPOOL

POLL_S = 1.0
"""How often the spool is looked at: a segment waits at most this long (the RPO is
archive_timeout plus this)."""
LINGER_S = 10.0
"""How long the server may be gone before the pusher leaves: a restart (a first start's
settings, `pg_ctl restart`) takes a few seconds, and the restarted server needs a pusher."""
REFUSED = "refused"
"""spool/refused/: files that cannot be archived (another file under the name in the store, a
damaged header): kept for the operator, and named by `maestro wal status`."""


def refused(spool: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(spool / REFUSED))
    except FileNotFoundError:
        return []


def spooled(spool: Path) -> list[Path]:
    """The complete WAL files in the spool, oldest position first (temporary copies, named
    `.<name>.tmp` by archive_command, are not WAL names)."""
    try:
        names = [entry.name for entry in os.scandir(spool) if entry.is_file() and layout.is_wal_name(entry.name)]
    except FileNotFoundError:
        return []
    return [spool / name for name in sorted(names)]


class Pusher:
    def __init__(self, home: Path, store, log=None):
        self.home = Path(home)
        self.pgdata = self.home / "pgdata"
        self.spool = self.home / WAL_SPOOL
        self.store = store
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        # A plain flag, not a threading.Event: the SIGTERM handler sets it, and Event.set()
        # from a handler deadlocks when the signal lands while the main thread holds the
        # Event's lock inside its own wait() (seen: a pusher that never left).
        self.stop_requested = False
        self._last_error: str | None = None

    def push_spooled(self) -> int:
        """Push every spooled file; return how many left the spool. A failing store stops the
        pass (the next one retries); a refused file is moved aside, not retried forever."""
        moved = 0
        for path in spooled(self.spool):
            try:
                # A segment names its server; a history file does not: pg_control does.
                system_id = None if layout.SEGMENT.match(path.name) else self._system_id()
            except WalError as exc:
                self._say(f"cannot push {path.name} yet: {exc}")
                return moved
            try:
                push_wal(self.store, path, system_id)
            except (StoreError, OSError) as exc:  # the store (or the disk) may come back: retry
                self._say(f"cannot push {path.name} yet: {exc}")
                return moved
            except WalError as exc:  # the file itself is refused: set aside, the rest goes on
                self._say(f"refused {path.name}, kept in {self.spool / REFUSED}: {exc}")
                (self.spool / REFUSED).mkdir(exist_ok=True)
                os.replace(path, self.spool / REFUSED / path.name)
                continue
            except MaestroError as exc:
                self._say(f"cannot push {path.name} yet: {exc}")
                return moved
            path.unlink(missing_ok=True)
            moved += 1
        self._last_error = None
        return moved

    def _system_id(self) -> str:
        return layout.control_system_id(self.pgdata)

    def _say(self, line: str) -> None:
        """Log a problem once, not once a second while it lasts."""
        if line != self._last_error:
            self._last_error = line
            self.log(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}")

    def request_stop(self, *_signal_args) -> None:
        """Safe in a signal handler: the loop sees it within one poll."""
        self.stop_requested = True

    def server_alive(self) -> bool:
        from maestro_pipelines.processes import process_alive

        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return process_alive(pid)

    def run(self, poll_s: float = POLL_S, linger_s: float = LINGER_S) -> None:
        while True:
            self._serve(poll_s, linger_s)
            self.push_spooled()  # what the server archived last, before it stopped
            # A Maestro process that started the server again just now saw this pusher alive
            # and started none: keep serving, unless told to stop.
            if self.stop_requested or not self.server_alive():
                return

    def _serve(self, poll_s: float, linger_s: float) -> None:
        """Push, poll, until told to stop or the server has been gone for `linger_s`."""
        gone_since = None
        while not self.stop_requested:
            self.push_spooled()
            if self.server_alive():
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > linger_s:
                return
            time.sleep(poll_s)  # a signal's handler runs during it; the loop then sees the flag


def main(argv: list[str]) -> int:
    import fasteners

    from maestro_pipelines.crypto import keyring_from_settings
    from maestro_pipelines.settings import load_settings
    from maestro_pipelines.storage import open_configured_store

    home = Path(argv[0]).resolve()
    lock = fasteners.InterProcessLock(home / PUSHER_LOCK)
    if not lock.acquire(blocking=False):
        return 0  # another pusher serves this home
    try:
        settings = load_settings()
        (home / PUSHER_PID).write_text(f"{os.getpid()}\n{settings.backup_keys_identity}\n")
        store = open_configured_store(settings.store_url, home, settings.store_environment,
                                      keyring=keyring_from_settings(settings))
        pusher = Pusher(home, store)
        signal.signal(signal.SIGTERM, pusher.request_stop)
        signal.signal(signal.SIGINT, pusher.request_stop)
        pusher.run()
    finally:
        (home / PUSHER_PID).unlink(missing_ok=True)
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
