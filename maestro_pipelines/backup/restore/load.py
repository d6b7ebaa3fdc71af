"""Phase 3, restore: each fetched dump into a new scratch database next to the live one.

    CREATE DATABASE <live>_restore_<stamp>
    pg_restore --list, without the optional extensions  ->  pg_restore -j N --no-owner --no-privileges --use-list
    CREATE EXTENSION of the optional ones, where the user may
    alembic upgrade head (platform database, after it was verified)

Every database created is recorded in the state, so `clean_up` drops it if the restore fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from maestro_pipelines.backup.consistency import TableChecksBeside
from maestro_pipelines.backup.phases import Phase
from maestro_pipelines.backup.pgtools import (
    check_client,
    check_reads_dump,
    libpq_environment,
    program,
    ssl_only_hint,
    where,
)
from maestro_pipelines.backup.restore.check import connect_for_checks
from maestro_pipelines.backup.restore.state import DatabasePlan, RestoreError, RestoreState
from maestro_pipelines.backup.tethered import run_tethered
from maestro_pipelines.platform_db.admin import (
    DatabaseAdminError,
    DatabaseExists,
    create_database,
    first_line,
    quote_ident,
    server_version,
)
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.redaction import hide_secret

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
# A table's data entry: `3160; 0 16390 TABLE DATA public t owner`. Names are printed unquoted,
# so one with a space could be split wrongly: such tables are not named (the verify's final
# pass checks them).
_TABLE_DATA_ENTRY = re.compile(r"^(?P<id>\d+); \d+ \d+ TABLE DATA (?P<schema>\S+) (?P<name>\S+) \S+$")


def create_scratch_database(state: RestoreState, plan: DatabasePlan) -> None:
    """CREATE DATABASE `plan.scratch`, recorded in the state (dropped if the restore fails)."""
    dest = plan.dest
    try:
        create_database(dest.url, plan.scratch, dest.source)
    except DatabaseExists:
        raise RestoreError(
            f"Database '{plan.scratch}' at {where(dest.url)} was created by someone else while this restore started",
            "Another restore or drill started in the same second: run this one again",
        ) from None
    except DatabaseAdminError as exc:
        raise RestoreError(
            f"Cannot create database '{plan.scratch}' at {where(dest.url)}: {exc.detail}",
            "The restoring user needs CREATEDB (or use a user that has it) and the server free disk space",
        ) from None
    state.created.append((dest.url, plan.scratch, dest.source))


@dataclass
class RestoreList:
    """What `pg_restore --list` says of a dump, and the list to restore from."""

    use_list: Path | None
    """A --use-list file without OPTIONAL_EXTENSIONS; None when the dump holds none of them."""
    left_out: list[str]
    entries: int
    """Table of contents entries to restore."""
    table_data: dict[str, tuple[str, str]]
    """Entry id of each table's data -> (schema, table)."""


def _restore_list(path: Path, env: dict[str, str], pg_restore: str) -> RestoreList:
    """The dump's table of contents, without OPTIONAL_EXTENSIONS."""
    listed = run_tethered([pg_restore, "--list", str(path)], env)
    if listed.returncode != 0:
        raise RestoreError(
            f"pg_restore cannot read the dump {path.name}: {(listed.stderr.strip().splitlines() or [f'exit {listed.returncode}'])[0]}",
            "The live database was not touched; pick another restore point",
        )
    kept, left_out, table_data = [], set(), {}
    for line in listed.stdout.splitlines():
        match = _EXTENSION_ENTRY.match(line)
        if match and match.group("name") in OPTIONAL_EXTENSIONS:
            left_out.add(match.group("name"))
            continue
        if data := _TABLE_DATA_ENTRY.match(line):
            table_data[data.group("id")] = (data.group("schema"), data.group("name"))
        kept.append(line)
    entries = sum(1 for line in kept if line.strip() and not line.startswith(";"))
    if not left_out:
        return RestoreList(None, [], entries, table_data)
    list_path = path.with_suffix(".list")
    list_path.write_text("\n".join(kept) + "\n")
    return RestoreList(list_path, sorted(left_out), entries, table_data)


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
                    f"{extension} was not recreated in '{url.database}' ({first_line(exc)}): Maestro works without "
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
_DATA_FINISHED = re.compile(r"^pg_restore: finished item (?P<id>\d+) TABLE DATA ")


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


def _pg_restore_errors(stderr: str, returncode: int, server_version_num: int) -> str | None:
    """The first error pg_restore printed that matters, or None. Without --exit-on-error it goes
    on after an error and exits 1 at the end; the errors it printed decide (one harmless line
    on servers before 17)."""
    errors = [
        line for line in stderr.splitlines()
        if line.startswith("pg_restore: error:") and not (
            server_version_num < 170000 and _HARMLESS_ON_OLD_SERVERS.search(line)
        )
    ]
    if errors or (returncode != 0 and "warning: errors ignored on restore" not in stderr):
        # The first error is the cause; later ones usually follow from it.
        return (errors or stderr.strip().splitlines() or [f"exit {returncode}"])[0]
    return None


def _line_watcher(listing: RestoreList, parallel: bool, on_count: Callable[[int, int, str], None] | None,
                  on_table_loaded: Callable[[str, str], None] | None) -> Callable[[str], None] | None:
    """What sees each line of pg_restore --verbose: the entry counter, and the tables whose data
    is in (parallel mode: `finished item N TABLE DATA t`; serially nothing says so)."""
    counter = _EntryCounter(listing.entries, parallel, on_count) if on_count is not None else None
    if on_table_loaded is None or not parallel:
        return counter

    def watch(line: str) -> None:
        if counter is not None:
            counter(line)
        if (finished := _DATA_FINISHED.match(line)) and finished.group("id") in listing.table_data:
            on_table_loaded(*listing.table_data[finished.group("id")])

    return watch


def run_pg_restore(url: URL, path: Path, jobs: int, server_version_num: int,
                   on_count: Callable[[int, int, str], None] | None = None,
                   client_programs: Path | None = None,
                   on_table_loaded: Callable[[str, str], None] | None = None) -> list[str]:
    """pg_restore -j into `url`'s (empty) database; any error but the known harmless one fails.
    `on_count(done, total, current)` follows its table of contents entries as they are restored;
    `on_table_loaded(schema, table)` is told of each table whose rows are all in (with jobs > 1).
    `client_programs`: the folder of the pg_restore to use (MAESTRO_PG_BIN; None: the wheel's).
    Returns notes (optional extensions that could not be recreated)."""
    env = libpq_environment(url, "maestro-restore")
    pg_restore = program("pg_restore", client_programs)
    listing = _restore_list(path, env, pg_restore)
    command = [
        pg_restore, "--no-owner", "--no-privileges", f"--jobs={max(1, jobs)}",
        f"--dbname={url.database}", "--no-password", str(path),
    ]
    if listing.use_list is not None:
        command.insert(-1, f"--use-list={listing.use_list}")
    watcher = _line_watcher(listing, jobs > 1, on_count, on_table_loaded)
    if watcher is not None:
        command.insert(1, "--verbose")
    if on_count is not None:
        on_count(0, listing.entries, "")
    # Tethered: if this process is killed, pg_restore and its -j workers die with it.
    result = run_tethered(command, env, on_stderr_line=watcher)
    shown = _pg_restore_errors(result.stderr, result.returncode, server_version_num)
    if shown is not None:
        raise RestoreError(
            f"pg_restore into '{url.database}' at {where(url)} failed: {hide_secret(shown, url.password)}",
            ssl_only_hint(pg_restore, shown)
            or "The live database was not touched; fix the cause (disk space, permissions, extensions) and restore again",
        )
    return _create_optional_extensions(url, listing.left_out)


def check_client_programs(state: RestoreState) -> None:
    """Before anything is fetched: each destination's pg_restore (MAESTRO_PG_BIN's, else the
    wheel's) exists, reads this backup's dumps, and can do the SSL its URL asks for."""
    for plan in state.databases:
        pg_restore = program("pg_restore", plan.dest.client_programs)
        check_reads_dump(pg_restore, state.manifest.pg_dump_version, state.entry.backup_id)
        check_client(pg_restore, plan.dest.url, libpq_environment(plan.dest.url), plan.dest.source)


def _start_checks_beside(state: RestoreState, plan: DatabasePlan) -> TableChecksBeside | None:
    """The verify's table checks, started now on tables pg_restore has loaded (with -j > 1 and
    a manifest that lists tables); `verify_database` takes what they did."""
    if state.jobs <= 1 or not plan.dump.tables:
        return None
    plan.checks_beside = TableChecksBeside(
        lambda: connect_for_checks(plan),
        checksums=any(t.checksum for t in plan.dump.tables),
    )
    return plan.checks_beside


def restore_database(state: RestoreState, plan: DatabasePlan) -> None:
    """The step `pg_restore <role>`: the fetched dump into a new scratch database, each table's
    checks starting as soon as its rows are in (`TableChecksBeside`)."""
    if plan.file is None:
        raise RestoreError(f"The {plan.role} dump was not fetched", "Run the fetch phase before restoring it")
    name = f"pg_restore {plan.role}"
    version = server_version(plan.dest.url, plan.dest.source)
    phases = state.phases

    def restore_one() -> str:
        create_scratch_database(state, plan)
        entries: list[int] = []

        def on_count(done: int, total: int, current: str) -> None:
            entries[:] = [total]
            phases(Phase(name, done, total, "entries", current))

        checks = _start_checks_beside(state, plan)
        try:
            notes = run_pg_restore(plan.scratch_url, plan.file, state.jobs, version,
                                   on_count if phases is not None else None, plan.dest.client_programs,
                                   on_table_loaded=checks.table_loaded if checks is not None else None)
        except BaseException:
            if checks is not None:
                checks.stop(cancel=True)  # its connection must not hold the scratch database open
            raise
        state.report.notes.extend(f"{plan.role}: {note}" for note in notes)
        counted = f"{entries[0]:,} entries into " if entries else ""
        return f"{counted}{where(plan.scratch_url)}"

    state.log(f"restoring {plan.role} into {plan.scratch} (pg_restore -j {state.jobs})")
    state.timed(name, restore_one)


def migrate_database(state: RestoreState, plan: DatabasePlan) -> None:
    """The step `migrations (platform)`: the restored platform database upgraded to this
    version's schema (after it was compared with the backup, which describes the old one)."""
    if plan.role != "platform" or not state.upgrade_platform:
        return
    from maestro_pipelines.platform_db.location import DatabaseLocation
    from maestro_pipelines.platform_db.migrate import upgrade

    def migrate() -> str:
        outcome = upgrade(DatabaseLocation(platform_url=plan.scratch_url, source=plan.dest.source))
        return f"{outcome.before} -> {outcome.after}"

    state.timed("migrations (platform)", migrate)
