"""Restoring a backup: every object checked before any database is touched, each database
restored next to the live one, verified against the manifest, then (live restores only)
swapped into place in one step, the old database kept aside.

    restore point  ->  download: sha256 + zstd checked, decompressed to local files
                   ->  CREATE DATABASE <live>_restore_<stamp>; pg_restore -j N --no-owner --no-privileges
                   ->  row counts and content checksums compared with the manifest
                   ->  alembic upgrade head (platform database)
                   ->  live: terminate sessions, RENAME <live> TO <live>_pre_restore_<stamp>,
                             RENAME <live>_restore_<stamp> TO <live>  (one transaction)

A failure at any step before the swap drops what the restore created and leaves the live
databases as they were. The pre-restore databases stay until `restore_cleanup`. Works without
Dagster (the CLI restores when Dagster's own database is the thing that was lost).

pg_restore needs a file for `-j` (it seeks), so dumps are decompressed to local disk: the one
place a restore needs free space (about the uncompressed dump size, `dump_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.backup.activity import activity, running_activities
from maestro_pipelines.backup.catalog import BackupEntry, check_objects, get_backup, is_latest, list_backups, object_key
from maestro_pipelines.backup.consistency import compare_checks, table_checks
from maestro_pipelines.backup.create import DatabaseTarget, MiB, Progress
from maestro_pipelines.backup.journal import (
    SwapJournal,
    SwapStep,
    delete_journal,
    interrupted_swaps,
    journal_names,
    new_journal,
    write_journal,
)
from maestro_pipelines.backup.manifest import BackupError, BackupNotFound, DatabaseDump, utcnow
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.pgtools import (
    CHECKSUM_SESSION_OPTIONS,
    end_sessions,
    libpq_environment,
    program,
    psycopg_connect,
    quote_ident,
    where,
)
from maestro_pipelines.backup.tethered import run_tethered
from maestro_pipelines.formatting import human_bytes
from maestro_pipelines.processes import process_alive
from maestro_pipelines.redaction import hide_secret
from maestro_pipelines.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

SCRATCH = "scratch"
LIVE = "live"
LEFTOVER = re.compile(r"^(?P<live>.+?)_(?P<kind>pre_restore|restore)_(?P<stamp>\d{8}t\d{6})$")
# pg_restore 18 always sets transaction_timeout, which servers before 17 do not know; that
# one statement failing is harmless (the setting does not exist there).
_HARMLESS_ON_OLD_SERVERS = re.compile(r'unrecognized configuration parameter "transaction_timeout"')
# Creating pg_stat_statements or amcheck needs a privileged user, and Maestro works without
# them (migration 0003 goes on with a warning; the drill notes indexes it could not check): a
# restore by Maestro's own user (a managed database's LOGIN CREATEDB role, whose administrator
# created them in the live database) leaves them out of pg_restore and creates them afterwards
# where it may.
OPTIONAL_EXTENSIONS = ("pg_stat_statements", "amcheck")
# Table of contents entries (`pg_restore --list`) of an extension and of its comment:
#   215; 3079 16385 EXTENSION - pg_stat_statements
#   4242; 0 0 COMMENT - EXTENSION pg_stat_statements
_EXTENSION_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:EXTENSION - |COMMENT - EXTENSION )(?P<name>\S+)")
NAME_LIMIT = 63
"""PostgreSQL's identifier limit in bytes; longer names are silently truncated."""
MAX_JOBS = 32
"""pg_restore -j: each job is a process and a server connection; past this they only contend."""


class RestoreError(BackupError):
    """A restore that could not be done; the live databases are as they were."""


class RestoreRefused(RestoreError):
    """A restore refused before anything was touched (confirmation missing, version)."""


@dataclass
class RestoreStep:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class DatabaseRestore:
    role: str
    live: str
    """The live database's name (where it is restored to, or next to)."""
    restored_as: str
    """The database holding the restored data now: the live name after a swap."""
    kept_as: str | None = None
    """Where the old live database was renamed to (live restores whose live database existed)."""
    tables: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    url: URL | None = field(default=None, repr=False)


@dataclass
class RestoreReport:
    backup_id: str
    snapshot_at: datetime
    target: str
    started_at: datetime
    steps: list[RestoreStep] = field(default_factory=list)
    databases: list[DatabaseRestore] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    artifacts_checked: int = 0
    finished_at: datetime | None = None
    notes: list[str] = field(default_factory=list)
    """Worth knowing, not failures (an optional extension the user could not recreate)."""

    @property
    def duration_s(self) -> float:
        end = self.finished_at or utcnow()
        return (end - self.started_at).total_seconds()

    @property
    def problems(self) -> list[str]:
        return [f"{d.role}: {p}" for d in self.databases for p in d.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def step_seconds(self) -> dict[str, float]:
        return {s.name: round(s.seconds, 3) for s in self.steps}


# ---- choosing the restore point -----------------------------------------------------------


def resolve_restore_point(store: ObjectStore, backup: str = "latest", before: datetime | None = None,
                          log: Callable[[str], None] | None = None) -> BackupEntry:
    """`latest` (newest verified), a backup id, or with `before` the newest verified backup
    whose snapshot is older than that time (monthly archives included).

    For `latest` and `before`, each candidate, newest first, has its objects checked with a
    head each (`check_objects`: missing, another size or recorded sha256, altered in place);
    one that no longer matches its manifest, or whose last verification failed, is skipped
    with one line to `log` naming it and why, and the next one is tried. A byte changed with
    size and records left as they were is not seen by a head: the restore's own download
    (every byte against the sha256) refuses it, and `maestro backup verify` finds it."""
    if is_latest(backup):
        backup = "latest"  # `newest` is its alias
    if before is None and backup != "latest":
        entry = get_backup(store, backup)
        if entry.manifest is None:
            raise BackupNotFound(
                f"Backup {entry.backup_id} cannot be used: {entry.problem}",
                "Pick another restore point (`maestro backup list`)",
            )
        return entry
    if before is None:
        candidates = list_backups(store)
    else:
        # Monthly archives count too: they outlive the daily backups by a year.
        candidates = sorted(
            (e for e in list_backups(store) + list_backups(store, monthly=True)
             if e.manifest and e.manifest.snapshot_at < before),
            key=lambda e: e.manifest.snapshot_at,
        )
    say = log or (lambda message: None)
    skipped: list[str] = []
    for entry in reversed(candidates):
        name = entry.backup_id + (f" (monthly archive {entry.month})" if entry.month else "")
        if entry.verification_failed:
            why = entry.bad
        elif not entry.verified:
            continue  # never verified (`backup run --no-verify`): not a candidate, nothing wrong
        elif check_objects(store, entry) is None:
            return entry
        else:
            why = f"{entry.damage}; `maestro backup verify {entry.backup_id}` checks it fully"
        skipped.append(f"{name}: {why}")
        say(f"skipping backup {skipped[-1]}")
    when = f"taken before {before.isoformat()} " if before is not None else ""
    also = f"; {len(skipped)} skipped, the latest {skipped[0]}" if skipped else ""
    raise BackupNotFound(
        f"There is no verified backup {when}in the store at {store.url}{also}",
        "Run `maestro backup list` to see the backups and their times"
        if before is not None
        else "Run `maestro backup run` (and `maestro backup verify ID`), or name a backup id",
    )


# ---- helpers -------------------------------------------------------------------------------


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dt%H%M%S")


def restore_database_name(live: str, kind: str, stamp: str) -> str:
    """`<live>_<kind>_<stamp>` (kind `restore` or `pre_restore`), kept within PostgreSQL's
    63 bytes: a longer live name is cut and followed by 8 hex digits of its hash, so the name
    is still unique to that live database (`restore_leftovers` recomputes it to match)."""
    suffix = f"_{kind}_{stamp}"
    name = f"{live}{suffix}"
    if len(name.encode()) <= NAME_LIMIT:
        return name
    tag = "_" + hashlib.sha256(live.encode()).hexdigest()[:8]
    room = NAME_LIMIT - len((tag + suffix).encode())
    prefix = live.encode()[:room].decode("utf-8", errors="ignore")  # never half a character
    return f"{prefix}{tag}{suffix}"


def _admin(url: URL) -> URL:
    return url.set(database="postgres")


def _server_version(url: URL, source: str) -> int:
    with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0])


def _database_exists(url: URL, name: str, source: str) -> bool:
    with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def _create_database(url: URL, name: str, source: str) -> None:
    import psycopg

    with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
        try:
            conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        except psycopg.errors.DuplicateDatabase:
            raise RestoreError(
                f"Database '{name}' at {where(url)} was created by someone else while this restore started",
                "Another restore or drill started in the same second: run this one again",
            ) from None
        except psycopg.Error as exc:
            raise RestoreError(
                f"Cannot create database '{name}' at {where(url)}: {_first_line(exc)}",
                "The restoring user needs CREATEDB (or use a user that has it) and the server free disk space",
            ) from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


WORKDIR_PREFIX = "maestro-restore-"


def _make_workdir() -> Path:
    # The pid in the name lets a later restore know the folder's owner is gone.
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """Remove the download folders of restores whose process died (killed, OOM, power): each
    holds a whole decompressed dump, the disk space the next restore needs."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _taken_names(url: URL, source: str) -> set[str]:
    with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def _free_stamp(store: ObjectStore, destinations: list[DatabaseTarget], start: datetime) -> str:
    """The first one-second stamp from `start` on that names no existing database of any
    destination and no running restore: a restore or drill started in the same second
    (a scheduled drill while on-call restores) must not take over the other's databases."""
    taken: set[str] = set()
    for dest in destinations:
        taken |= _taken_names(dest.url, dest.source)
    running = running_restore_stamps(store)
    for offset in range(3600):
        stamp = _stamp(start + timedelta(seconds=offset))
        names = {restore_database_name(d.database, kind, stamp) for d in destinations for kind in ("restore", "pre_restore")}
        if stamp not in running and not names & taken:
            return stamp
    raise RestoreRefused(
        "Every restore name for the next hour is taken on the destination servers",
        "Drop old restores with `maestro restore cleanup`",
    )


def _check_may_swap(destinations: list[DatabaseTarget]) -> None:
    """A live restore renames every live database; refuse up front, before anything is
    restored, when the connecting user may not rename one of them (superuser, or member of
    the owning role with CREATEDB), so no restore ever swaps some databases and not others."""
    for dest in destinations:
        with psycopg_connect(_admin(dest.url), autocommit=True, source=dest.source) as conn:
            row = conn.execute(
                "SELECT r.rolsuper, r.rolcreatedb, d.datname IS NULL, "
                "coalesce(pg_has_role(d.datdba, 'MEMBER'), true), pg_get_userbyid(d.datdba) "
                "FROM pg_roles r LEFT JOIN pg_database d ON d.datname = %s WHERE r.rolname = current_user",
                [dest.database],
            ).fetchone()
        superuser, createdb, missing, owns, owner = row
        if superuser or (createdb and (missing or owns)):
            continue
        user = dest.url.username or "the connecting user"
        need = "CREATEDB" if not createdb else f"to own it (it belongs to {owner})"
        raise RestoreRefused(
            f"{user} may not rename the live database '{dest.database}' at {where(dest.url)}: it needs {need}",
            f"Nothing was restored. Restore as its owner or a superuser, or run "
            f"ALTER DATABASE {quote_ident(dest.database)} OWNER TO {quote_ident(user)} (and ALTER ROLE ... CREATEDB); "
            "a scratch restore needs neither",
        )


class DatabaseInUse(RestoreError):
    """A database kept open by sessions the connecting user may not end (another role's)."""


def drop_database(url: URL, name: str, source: str = "database") -> None:
    """DROP DATABASE, ending its sessions first. WITH (FORCE) ends them all, but only for a
    user that may end every one of them: a managed database's user (LOGIN CREATEDB) may not
    end a superuser's session nor an autovacuum worker's. It then ends its own role's, lets
    plain DROP DATABASE stop autovacuum (the server does), and raises DatabaseInUse naming
    any other role's sessions, dropping nothing."""
    import psycopg

    _dispose_engines()
    quoted = quote_ident(name)
    with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
        try:
            conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            return
        except psycopg.errors.InsufficientPrivilege:
            pass  # FORCE checks every session before ending any: nothing was ended
        others: list[str] = []
        for _attempt in range(3):  # a client of ours may reconnect in between
            others = end_sessions(conn, [name])
            try:
                # Waits up to 5 s for sessions to end (one just closed is still exiting).
                conn.execute(f"DROP DATABASE IF EXISTS {quoted}")
                return
            except psycopg.errors.ObjectInUse:
                if others:
                    break
            except psycopg.Error as exc:
                raise RestoreError(f"Cannot drop '{name}' at {where(url)}: {_first_line(exc)}",
                                   "Drop it as its owner or an administrator") from None
    user = url.username or "the connecting user"
    raise DatabaseInUse(
        f"'{name}' at {where(url)} is in use by {', '.join(others) or 'clients that keep reconnecting'}, "
        f"which {user} may not end",
        "Ask them to disconnect (or an administrator to end them), then run it again",
    )


def _dispose_engines() -> None:
    # Pooled connections of this process would keep a database busy (rename, drop).
    from maestro_pipelines.platform_db.connection import dispose_engines

    dispose_engines()


def _timed(report, name: str, fn: Callable[[], str | None], phases: PhaseProgress | None = None):
    """Run one step into `report.steps` (a RestoreReport or DrillReport), telling `phases` when it
    starts and ends."""
    started = time.monotonic()
    if phases is not None:
        phases(Phase(name))
    detail = fn()
    step = RestoreStep(name, time.monotonic() - started, detail or "")
    report.steps.append(step)
    if phases is not None:
        phases(Phase(name, finished=True, seconds=step.seconds, detail=step.detail))


def download_dump(store: ObjectStore, entry: BackupEntry, dump: DatabaseDump, path: Path,
                  progress: Progress | None = None) -> None:
    """Stream one dump from the store into `path`, decompressed; the store's reader checks the
    sha256 at the last byte, zstd its frame checksum; the size must match the manifest."""
    import zstandard

    key = object_key(entry, dump.key)
    try:
        info = store.head(key)
    except ObjectNotFound:
        raise RestoreError(
            f"{key} of backup {entry.backup_id} is missing from the store at {store.url}",
            "Nothing was restored. Pick another restore point (`maestro backup list`)",
        ) from None
    if info.size != dump.compressed_bytes or info.sha256 != dump.sha256:
        # Only what differs; the sha256 is the one the store recorded at write time (a truncated
        # object keeps it), so it is never shown as if it were the hash of the bytes there now.
        if info.size != dump.compressed_bytes:
            differs = f"it has {info.size} bytes, the manifest says {dump.compressed_bytes} (truncated or replaced)"
        else:
            recorded = f"sha256 {info.sha256[:12]}..." if info.sha256 else "no sha256"
            differs = f"the store records {recorded} for it, the manifest says {dump.sha256[:12]}... (replaced)"
        raise RestoreError(
            f"{key} in the store at {store.url} does not match backup {entry.backup_id}'s manifest: {differs}",
            "Nothing was restored. Pick another restore point (`maestro backup list`)",
        )
    written = 0
    label = f"{dump.role} ({dump.database})"
    try:
        with store.open_read(key) as raw, open(path, "wb") as out:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=MiB)
            while True:
                block = reader.read(4 * MiB)
                if not block:
                    break
                out.write(block)
                written += len(block)
                if progress is not None and written % (64 * MiB) < 4 * MiB:
                    progress(label, written, dump.dump_bytes)
    except (ChecksumMismatch, zstandard.ZstdError) as exc:  # damage; a store outage propagates as itself
        raise RestoreError(
            f"{key} of backup {entry.backup_id} is damaged: {getattr(exc, 'problem', exc)}",
            "Nothing was restored. Pick another restore point (`maestro backup list`)",
        ) from None
    if written != dump.dump_bytes:
        raise RestoreError(
            f"{key} of backup {entry.backup_id} decompresses to {written} bytes, the manifest says {dump.dump_bytes}",
            "Nothing was restored. Pick another restore point (`maestro backup list`)",
        )
    if progress is not None:
        progress(label, written, dump.dump_bytes)


def _restore_list(path: Path, env: dict[str, str]) -> tuple[Path | None, list[str], int]:
    """A `pg_restore --use-list` file without OPTIONAL_EXTENSIONS, the extensions left out
    and the number of entries to restore; (None, [], entries) when the dump holds none of them."""
    listed = run_tethered([program("pg_restore"), "--list", str(path)], env)
    if listed.returncode != 0:
        raise RestoreError(
            f"pg_restore cannot read the dump {path.name}: {(listed.stderr.strip().splitlines() or [f'exit {listed.returncode}'])[0]}",
            "The live database was not touched; pick another restore point",
        )
    kept, left_out = [], set()
    for line in listed.stdout.splitlines():
        match = _EXTENSION_ENTRY.match(line)
        if match and match.group("name") in OPTIONAL_EXTENSIONS:
            left_out.add(match.group("name"))
            continue
        kept.append(line)
    entries = sum(1 for line in kept if line.strip() and not line.startswith(";"))
    if not left_out:
        return None, [], entries
    list_path = path.with_suffix(".list")
    list_path.write_text("\n".join(kept) + "\n")
    return list_path, sorted(left_out), entries


def _create_optional_extensions(url: URL, extensions: list[str]) -> list[str]:
    """CREATE EXTENSION where the user may; notes for the ones it may not."""
    import psycopg

    notes = []
    with psycopg_connect(url, autocommit=True, source="restored database") as conn:
        for extension in extensions:
            try:
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {quote_ident(extension)}")
            except psycopg.Error as exc:
                notes.append(
                    f"{extension} was not recreated in '{url.database}' ({_first_line(exc)}): Maestro works without "
                    f"it; an administrator can run CREATE EXTENSION {extension}"
                )
    return notes


# pg_restore --verbose says what it does, one line per table of contents entry: serially
# (-j 1, and the schema before the parallel part) `creating TABLE "public.t"`, `processing data
# for table "public.t"`, `executing SEQUENCE SET ...`; in parallel mode `processing item 225
# TABLE t` (serial part), `launching item 3160 TABLE DATA t` and `finished item 3160 ...`.
_ENTRY_DONE_PARALLEL = re.compile(r"^pg_restore: (?:processing|finished) item (?P<id>\d+) (?P<what>.*)$")
_ENTRY_LAUNCHED = re.compile(r"^pg_restore: launching item \d+ (?P<what>.*)$")
_ENTRY_DONE_SERIAL = re.compile(r"^pg_restore: (?:creating|processing data for table|executing) (?P<what>.*)$")


class _EntryCounter:
    """pg_restore --verbose's stderr lines -> entries done of the --list count, the item it is on."""

    def __init__(self, total: int, parallel: bool, on_count: Callable[[int, int, str], None]):
        self.total, self.parallel, self.on_count = total, parallel, on_count
        self.done_ids: set[str] = set()
        self.done = 0

    def __call__(self, line: str) -> None:
        if self.parallel:
            match = _ENTRY_DONE_PARALLEL.match(line) or _ENTRY_LAUNCHED.match(line)
            if match is None:
                return
            if "id" in match.groupdict():
                self.done_ids.add(match.group("id"))
            self.done = len(self.done_ids)
        else:
            match = _ENTRY_DONE_SERIAL.match(line)
            if match is None:
                return
            self.done += 1
        # A few entries (ENCODING, SEARCHPATH) are said but not listed: never past the total.
        self.on_count(min(self.done, self.total), self.total, match.group("what").replace('"', ""))


def run_pg_restore(url: URL, path: Path, jobs: int, server_version_num: int,
                   on_count: Callable[[int, int, str], None] | None = None) -> list[str]:
    """pg_restore -j into `url`'s (empty) database; any error but the known harmless one fails.
    `on_count(done, total, current)` follows its table of contents entries as they are restored.
    Returns notes (optional extensions that could not be recreated)."""
    env = libpq_environment(url, "maestro-restore")
    list_path, optional, entries = _restore_list(path, env)
    command = [
        program("pg_restore"), "--no-owner", "--no-privileges", f"--jobs={max(1, jobs)}",
        f"--dbname={url.database}", "--no-password", str(path),
    ]
    if list_path is not None:
        command.insert(-1, f"--use-list={list_path}")
    counter = None
    if on_count is not None:
        command.insert(1, "--verbose")
        counter = _EntryCounter(entries, jobs > 1, on_count)
        on_count(0, entries, "")
    # Tethered: if this process is killed, pg_restore and its -j workers die with it.
    result = run_tethered(command, env, on_stderr_line=counter)
    errors = [
        line for line in result.stderr.splitlines()
        if line.startswith("pg_restore: error:") and not (
            server_version_num < 170000 and _HARMLESS_ON_OLD_SERVERS.search(line)
        )
    ]
    # pg_restore without --exit-on-error goes on after an error and exits 1 at the end; the
    # errors it printed decide (one harmless line on servers before 17).
    if errors or (result.returncode != 0 and "warning: errors ignored on restore" not in result.stderr):
        # The first error is the cause; later ones usually follow from it.
        shown = (errors or result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
        shown = hide_secret(shown, url.password)
        raise RestoreError(
            f"pg_restore into '{url.database}' at {where(url)} failed: {shown}",
            "The live database was not touched; fix the cause (disk space, permissions, extensions) and restore again",
        )
    return _create_optional_extensions(url, optional)


def _swap(url: URL, live: str, restored: str, kept: str, live_exists: bool, source: str) -> None:
    """Rename live -> kept and restored -> live in one transaction, after ending the live
    database's sessions (retried: a client may reconnect in between)."""
    import psycopg

    _dispose_engines()
    last: Exception | None = None
    for _attempt in range(10):
        with psycopg_connect(_admin(url), autocommit=True, source=source) as conn:
            try:
                others = end_sessions(conn, [live, restored])
                with conn.transaction():
                    if live_exists:
                        conn.execute(f"ALTER DATABASE {quote_ident(live)} RENAME TO {quote_ident(kept)}")
                    conn.execute(f"ALTER DATABASE {quote_ident(restored)} RENAME TO {quote_ident(live)}")
                return
            except psycopg.errors.ObjectInUse as exc:  # someone reconnected between terminate and rename
                if others:  # or another role's session, which this user may not end
                    raise RestoreError(
                        f"Could not swap '{restored}' into place as '{live}' at {where(url)}: it is held open by "
                        f"{', '.join(others)}, which {url.username or 'the connecting user'} may not end",
                        f"Ask them to disconnect (or an administrator to end them) and restore again; "
                        f"the restored data is verified in '{restored}'",
                    ) from None
                last = exc
            except psycopg.Error as exc:
                raise RestoreError(
                    f"Could not swap '{restored}' into place as '{live}' at {where(url)}: {_first_line(exc)}",
                    f"The restored data is verified in '{restored}'; fix the cause (rights to rename '{live}') and "
                    "restore again",
                ) from None
    raise RestoreError(
        f"Could not swap '{restored}' into place as '{live}': clients keep reconnecting ({last})",
        f"Stop the clients of '{live}' (Dagster daemon, webserver, MLflow) and run the restore again; "
        f"the restored data is verified in '{restored}'",
    )


def _check_half_done(store: ObjectStore, destinations: list[DatabaseTarget], target: str) -> list[str]:
    """A live restore is refused while an earlier one is half done (finish or undo it first);
    a scratch restore goes ahead and says so (returned as notes)."""
    if target != LIVE:
        return [journal.summary() for journal in interrupted_swaps(store)]
    from maestro_pipelines.backup.recovery import half_done_swaps  # recovery imports this module

    for half in half_done_swaps(store, destinations):
        raise RestoreRefused(half.describe(), "Nothing was restored. " + half.hint())
    return []


def _swap_journal(entry: BackupEntry, stamp: str, report: RestoreReport, plans: list) -> SwapJournal:
    """The journal of this restore's swap: every database, before any is renamed."""
    steps = [
        SwapStep(result.role, result.live, result.restored_as, restore_database_name(result.live, "pre_restore", stamp),
                 _database_exists(dest.url, result.live, dest.source), where(dest.url))
        for result, (_dump, dest) in zip(report.databases, plans)
    ]
    return new_journal(stamp, entry.backup_id, report.snapshot_at, steps)


def _journaled_swap(store: ObjectStore, journal: SwapJournal, destinations: list[DatabaseTarget]) -> None:
    """Swap every database of `journal`, the journal written before the first rename and
    each step marked in it, deleted after the last: a kill at any instant leaves a journal
    that `maestro restore status|finish|undo` read. A swap that fails puts back the ones
    already swapped (the live databases describe one moment)."""
    from maestro_pipelines.backup.recovery import run_swap  # recovery imports this module

    write_journal(store, journal)
    try:
        run_swap(store, journal, destinations)
    except RestoreError as exc:
        journal.action = "undo"
        try:
            put_back = run_swap(store, journal, destinations, undo=True)
        except Exception as undo_failed:
            raise RestoreError(
                exc.problem + f"; could NOT put back the databases already swapped ({_first_line(undo_failed)})",
                "`maestro restore status` says where each database is; `maestro restore undo` tries again",
            ) from exc
        delete_journal(store, journal)
        undone = f"; the databases already swapped were put back: {', '.join(s.live for s in put_back)}" if put_back else ""
        raise RestoreError(exc.problem + undone, exc.hint) from exc
    delete_journal(store, journal)


def check_artifacts(store: ObjectStore, entry: BackupEntry) -> tuple[int, list[str]]:
    """(artifacts listed, keys missing or changed in the store) for the backup's artifact manifest."""
    manifest = entry.manifest
    if manifest is None or manifest.artifacts is None:
        return 0, []
    body = json.loads(store.get_bytes(object_key(entry, manifest.artifacts.key)))
    present = {info.key: info for info in store.list(body["prefix"], with_metadata=False)}
    missing = []
    for item in body["objects"]:
        info = present.get(item["key"])
        if info is None:
            missing.append(item["key"])
        elif info.size != item["size"]:
            missing.append(f"{item['key']} (size {info.size}, the backup recorded {item['size']})")
    return len(body["objects"]), missing


# ---- the restore --------------------------------------------------------------------------


def check_restore_request(target: object, roles: list[str] | None, jobs: object) -> None:
    """Refuse a restore request that cannot mean anything, before any store or server is
    read: the CLI and the restore job both pass here."""
    if target not in (SCRATCH, LIVE):
        shown = str(target)[:20]
        raise RestoreRefused(f"Unknown restore target '{shown}'", "Use 'scratch' (default) or 'live', in lowercase")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise RestoreRefused(
            f"{jobs!r} parallel pg_restore jobs is out of range", f"Use a whole number from 1 to {MAX_JOBS} (default 2)"
        )
    seen: set[str] = set()
    for role in roles or []:
        if not isinstance(role, str) or not role.strip():
            raise RestoreRefused("An empty database role was given", "Name roles like platform,mlflow,dagster")
        if role in seen:
            raise RestoreRefused(f"The databases to restore name '{role[:20]}' twice",
                                 "Name each of platform, mlflow and dagster at most once")
        seen.add(role)


def restore_backup(
    store: ObjectStore,
    entry: BackupEntry,
    destinations: list[DatabaseTarget],
    target: str = SCRATCH,
    confirm: str | None = None,
    roles: list[str] | None = None,
    jobs: int = 2,
    workdir: Path | None = None,
    progress: Progress | None = None,
    upgrade_platform: bool = True,
    log: Callable[[str], None] | None = None,
    phases: PhaseProgress | None = None,
) -> RestoreReport:
    """Restore `entry` into the servers of `destinations` (role -> the live database's URL).
    `progress` follows the download's bytes, `phases` every step from the download on.

    target `scratch` (default): restored databases stay next to the live ones as
    `<live>_restore_<stamp>` (report.databases[i].restored_as). target `live`: swapped into
    place; needs `confirm` equal to the platform database's name (or, without a platform
    database among the roles, the first one's)."""
    say = log or (lambda message: None)
    check_restore_request(target, roles, jobs)
    manifest = entry.manifest
    if manifest is None:
        raise RestoreRefused(f"Backup {entry.backup_id} has no readable manifest", "Pick another restore point")
    by_role = {d.role: d for d in destinations}
    wanted = roles or [d.role for d in manifest.databases if d.role in by_role]
    for role in wanted:
        if role not in by_role:
            raise RestoreRefused(f"No database is configured for the backup's '{role}' database",
                                 "Configure it (MLFLOW_TRACKING_URI, MAESTRO_DAGSTER_DATABASE_URL) or leave it out")
        manifest.database(role)  # refuses roles the backup does not hold
    if not wanted:
        raise RestoreRefused(f"Backup {entry.backup_id} holds none of the configured databases",
                             f"It holds: {', '.join(d.role for d in manifest.databases)}")
    if target == LIVE:
        primary = by_role["platform"].database if "platform" in wanted else by_role[wanted[0]].database
        if confirm != primary:
            wrong = f", and the confirmation '{confirm[:60]}' does not name {primary}" if confirm else ""
            raise RestoreRefused(
                f"Restoring into the live databases ({', '.join(by_role[r].database for r in wanted)}) "
                f"replaces them{wrong}",
                f"Confirm with --confirm {primary} (job: confirm: {primary}); the old ones are kept aside until "
                "`maestro restore cleanup`",
            )
        _check_may_swap([by_role[role] for role in wanted])
    half_done_notes = _check_half_done(store, destinations, target)
    started_at = utcnow()
    stamp = _free_stamp(store, [by_role[role] for role in wanted], started_at)
    report = RestoreReport(entry.backup_id, manifest.snapshot_at, target, started_at)
    report.notes.extend(half_done_notes)
    for note in half_done_notes:
        say(f"warning: {note}")
    plans = []
    for role in wanted:
        dest = by_role[role]
        live = dest.database
        report.databases.append(DatabaseRestore(role, live, restore_database_name(live, "restore", stamp), url=dest.url))
        plans.append((manifest.database(role), dest))

    def versions() -> str:
        details = []
        for dump, dest in plans:
            server = _server_version(dest.url, dest.source)
            if server // 10000 < dump.server_major:
                raise RestoreRefused(
                    f"Backup {entry.backup_id}'s {dump.role} database comes from PostgreSQL {dump.server_version}, "
                    f"newer than the target server at {where(dest.url)} (PostgreSQL {server // 10000})",
                    "Restore onto a server of the same or a newer major version",
                )
            details.append(f"{dump.role}: PostgreSQL {dump.server_major} -> {server // 10000}")
        return "; ".join(details)

    _timed(report, "check versions", versions)
    # Said only now: a refused restore (confirmation, permissions, versions) never announces itself.
    say(f"restoring backup {entry.backup_id} (snapshot {manifest.snapshot_at:%Y-%m-%d %H:%M:%S} UTC) into "
        f"{'the LIVE databases' if target == LIVE else 'scratch databases'}")
    own_dir = workdir is None
    if own_dir:
        for stale in remove_stale_workdirs():
            say(f"removed {stale}, left by a restore whose process is gone")
    folder = _make_workdir() if own_dir else Path(workdir)
    created: list[tuple[URL, str, str]] = []
    swapping = False
    try:
        with activity(store, "restore", stamp):
            files: dict[str, Path] = {}

            def download() -> str:
                stored = dumped = 0
                for dump, _dest in plans:
                    path = folder / f"{dump.role}.dump"
                    download_dump(store, entry, dump, path, progress)
                    files[dump.role] = path
                    stored, dumped = stored + dump.compressed_bytes, dumped + dump.dump_bytes
                # Compressed, as in the store (`backup list`'s size adds the backup's artifact list);
                # unpacked: what pg_restore reads.
                return (f"{len(plans)} dump{'' if len(plans) == 1 else 's'}, {human_bytes(stored)} compressed read "
                        f"({human_bytes(dumped)} unpacked), sha256 and sizes match the manifest")

            say(f"downloading backup {entry.backup_id} (every object checked before any database is touched)")
            _timed(report, "download and check", download, phases)

            for (dump, dest), result in zip(plans, report.databases):
                restored_url = dest.url.set(database=result.restored_as)
                server_version = _server_version(dest.url, dest.source)

                def restore_one(name: str = f"pg_restore {dump.role}") -> str:
                    _create_database(dest.url, result.restored_as, dest.source)
                    created.append((dest.url, result.restored_as, dest.source))
                    entries: list[int] = []

                    def on_count(done: int, total: int, current: str) -> None:
                        entries[:] = [total]
                        phases(Phase(name, done, total, "entries", current))

                    notes = run_pg_restore(restored_url, files[dump.role], jobs, server_version,
                                           on_count if phases is not None else None)
                    report.notes.extend(f"{dump.role}: {note}" for note in notes)
                    counted = f"{entries[0]:,} entries into " if entries else ""
                    return f"{counted}{where(restored_url)}"

                say(f"restoring {dump.role} into {result.restored_as} (pg_restore -j {jobs})")
                _timed(report, f"pg_restore {dump.role}", restore_one, phases)

                def verify_one() -> str:
                    conn = psycopg_connect(restored_url, options=CHECKSUM_SESSION_OPTIONS, source=dest.source)
                    try:
                        checks = table_checks(conn, checksums=any(t.checksum for t in dump.tables))
                    finally:
                        conn.close()
                    result.problems = compare_checks(dump.tables, checks)
                    result.tables = len(checks)
                    result.rows = sum(t.rows for t in checks)
                    return f"{result.tables} tables, {result.rows:,} rows compared: " + (
                        "equal to the manifest" if not result.problems else f"{len(result.problems)} differences"
                    )

                _timed(report, f"verify {dump.role}", verify_one, phases)
                if result.problems:
                    raise RestoreError(
                        f"The restored {dump.role} database does not match backup {entry.backup_id}: "
                        + "; ".join(result.problems[:5]),
                        "The live database was not touched; pick another restore point",
                    )
                if dump.role == "platform" and upgrade_platform:
                    from maestro_pipelines.platform_db.location import DatabaseLocation
                    from maestro_pipelines.platform_db.migrate import upgrade

                    def migrate() -> str:
                        outcome = upgrade(DatabaseLocation(platform_url=restored_url, source=dest.source))
                        return f"{outcome.before} -> {outcome.after}"

                    _timed(report, "migrations (platform)", migrate, phases)
                result.url = restored_url

            def artifacts() -> str:
                report.artifacts_checked, report.missing_artifacts = check_artifacts(store, entry)
                if report.missing_artifacts:
                    return f"{len(report.missing_artifacts)} of {report.artifacts_checked} model artifacts missing"
                return f"all {report.artifacts_checked} model artifacts present"

            _timed(report, "artifacts", artifacts, phases)

            if target == LIVE:
                def swap() -> str:
                    journal = _swap_journal(entry, stamp, report, plans)
                    _journaled_swap(store, journal, [dest for _dump, dest in plans])
                    for result, step, (_dump, dest) in zip(report.databases, journal.steps, plans):
                        result.kept_as = step.kept if step.live_existed else None
                        result.restored_as = result.live
                        result.url = dest.url
                    return "swapped into place: " + ", ".join(
                        step.live + (f" (old one kept as {step.kept})" if step.live_existed else " (was missing)")
                        for step in journal.steps
                    )

                say("swapping the restored databases into place")
                # From here on the verified copies are kept whatever happens: a failed swap's
                # message points to them.
                swapping = True
                _timed(report, "swap", swap, phases)
    except BaseException:
        if not swapping:
            for url, name, source in created:
                try:
                    drop_database(url, name, source)
                except Exception:
                    pass
        raise
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
    report.finished_at = utcnow()
    return report


# ---- leftovers ---------------------------------------------------------------------------


@dataclass
class Leftover:
    name: str
    kind: str
    """pre_restore (an old live database kept aside) or restore (a scratch restore)."""
    live: str
    url: URL = field(repr=False)
    source: str = "database"
    size_bytes: int | None = None
    """None when the user may not connect to it (pg_database_size needs CONNECT)."""
    configured: bool = True
    """False: `live` is not one of the configured databases (another installation's?)."""

    @property
    def stamp(self) -> str:
        """The stamp of the restore that made it (its activity marker's ident)."""
        return LEFTOVER.match(self.name).group("stamp")

    @property
    def created_at(self) -> datetime:
        return datetime.strptime(self.stamp, "%Y%m%dt%H%M%S").replace(tzinfo=utcnow().tzinfo)


@dataclass
class CleanupItem:
    """One leftover and what cleanup did with it."""

    leftover: Leftover
    action: str
    """dropped, would drop, or `kept: <why>`."""
    in_use: str | None = None
    """Why it could not be dropped: sessions the user may not end (DatabaseInUse)."""

    @property
    def dropped(self) -> bool:
        return self.action in ("dropped", "would drop")

    def describe(self, now: datetime | None = None) -> str:
        """`<action> <name> (<what> of <live>, <size>, <age> old)[: why kept]`: the CLI's and the job's line."""
        leftover = self.leftover
        what = "old live database" if leftover.kind == "pre_restore" else "scratch restore"
        size = "size unknown" if leftover.size_bytes is None else human_bytes(leftover.size_bytes)
        hours = max(0.0, ((now or utcnow()) - leftover.created_at).total_seconds() / 3600)
        age = f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
        details = f"{leftover.name} ({what} of {leftover.live}, {size}, {age} old)"
        if self.action.startswith("kept: "):
            return f"kept {details}: {self.action.removeprefix('kept: ')}"
        return f"{self.action} {details}"


def running_restore_stamps(store: ObjectStore) -> set[str]:
    """Stamps of the restores and drills whose activity marker says they are running
    (a dead process's marker does not count)."""
    return {a.ident for a in running_activities(store) if a.kind == "restore"}


_LEFTOVER_SIZES = (
    "SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT') THEN pg_database_size(oid) END "
    "FROM pg_database ORDER BY datname"
)


def restore_leftovers(destinations: list[DatabaseTarget], every: bool = False) -> list[Leftover]:
    """Databases restores left on the destinations' servers: `<live>_pre_restore_<stamp>`
    and `<live>_restore_<stamp>` of the configured live databases; with `every`, also those
    of other live names on the same servers (`configured` False), each once, with its size."""
    found: dict[tuple, Leftover] = {}
    for dest in destinations:
        with psycopg_connect(_admin(dest.url), autocommit=True, source=dest.source) as conn:
            rows = conn.execute(_LEFTOVER_SIZES).fetchall()
        server = (dest.url.host, dest.url.port, str(sorted(dest.url.query.items())))
        for name, size in rows:
            match = LEFTOVER.match(name)
            if not match:
                continue
            ours = name == restore_database_name(dest.database, match.group("kind"), match.group("stamp"))
            if ours or (every and (server, name) not in found):
                live = dest.database if ours else match.group("live")
                found[(server, name)] = Leftover(name, match.group("kind"), live, dest.url, dest.source, size, ours)
    return sorted(found.values(), key=lambda leftover: (leftover.stamp, leftover.name))


def cleanup_confirmation(destinations: list[DatabaseTarget]) -> str:
    """What `confirm` must be for cleanup to drop old live databases: the platform database's name."""
    return next((d.database for d in destinations if d.role == "platform"), destinations[0].database)


def _cleanup_decision(leftover: Leftover, running: set[str], needed: set[str], drop_kept: bool,
                      confirmation: str) -> str | None:
    """Why `leftover` is kept, or None when it may go."""
    if not leftover.configured:
        return f"kept: {leftover.live} is not one of the configured databases"
    if leftover.name in needed:
        return "kept: a half-done live restore needs it (`maestro restore status`)"
    if leftover.stamp in running:
        return "kept: its restore is running"
    if leftover.kind == "pre_restore" and not drop_kept:
        return f"kept: the way back from that restore; drop it with --confirm {confirmation}"
    return None


def restore_cleanup(destinations: list[DatabaseTarget], dry_run: bool = False,
                    store: ObjectStore | None = None, confirm: str | None = None) -> list[CleanupItem]:
    """Every leftover of a restore on the destinations' servers and what was done with it:
    scratch restores (`<live>_restore_<stamp>`) are dropped; old live databases
    (`<live>_pre_restore_<stamp>`, the only way back from a wrong restore) only when
    `confirm` names the platform database. Never dropped: those of restores still running
    and those a half-done live restore needs (the activity markers and journals in
    `store`), and those of databases that are not configured. The CLI and the cleanup job
    both call this, with the same defaults."""
    confirmation = cleanup_confirmation(destinations)
    if confirm and confirm != confirmation:
        raise RestoreRefused(f"The confirmation '{confirm[:70]}' does not name the platform database",
                             f"Confirm with --confirm {confirmation} (job: confirm: {confirmation}); nothing was dropped")
    running, needed = set(), set()
    if store is not None:
        from maestro_pipelines.backup.activity import remove_stale_activities

        if not dry_run:
            remove_stale_activities(store, ("restore",))  # a killed restore's marker: gone, so remove it
        running, needed = running_restore_stamps(store), journal_names(store)
    items = []
    for leftover in restore_leftovers(destinations, every=True):
        kept = _cleanup_decision(leftover, running, needed, confirm == confirmation, confirmation)
        items.append(CleanupItem(leftover, kept or ("would drop" if dry_run else "dropped")))
        if kept or dry_run:
            continue
        try:
            drop_database(leftover.url, leftover.name, leftover.source)
        except DatabaseInUse as exc:  # the others are still dropped
            items[-1].action, items[-1].in_use = "kept: in use", exc.problem
    return items


def raise_for_in_use(items: list[CleanupItem]) -> None:
    """After the cleanup's report: fail naming the leftovers other roles' sessions kept open."""
    in_use = [item.in_use for item in items if item.in_use]
    if in_use:
        dropped = sum(item.action == "dropped" for item in items)
        raise DatabaseInUse(
            f"Kept {len(in_use)} restore leftovers, {dropped} dropped: " + "; ".join(in_use),
            "Ask those sessions to disconnect (or an administrator to end them), then run the cleanup again",
        )
