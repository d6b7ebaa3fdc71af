"""Phase 6, clean up: what one restore leaves behind, and what restores left on the servers.

`clean_up` ends every restore: a failure before the swap drops the databases it created (the
live ones are as they were), and its own work folder goes either way. The scratch databases
of a restore that succeeded stay (that is the point of a scratch restore), and so do the old
live databases a live restore kept aside, until `restore_cleanup` (`maestro restore cleanup`,
the `restore_cleanup_job`), which drops the scratch ones and, confirmed, the old live ones.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import URL

from maestro_pipelines.backup.activity import remove_stale_activities, running_activities
from maestro_pipelines.backup.journal import journal_names
from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.restore.state import STAMP_FORMAT, RestoreRefused, RestoreState, restore_database_name
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.formatting import counted, human_bytes
from maestro_pipelines.platform_db.admin import DatabaseInUse, database_sizes, drop_database
from maestro_pipelines.storage import ObjectStore

LEFTOVER = re.compile(r"^(?P<live>.+?)_(?P<kind>pre_restore|restore)_(?P<stamp>\d{8}t\d{6})$")


def clean_up(state: RestoreState, failed: bool) -> None:
    """After the other phases: when the restore `failed` before its swap, drop every database it
    created (best effort: the restore's own error is the one raised); remove its own work folder."""
    for plan in state.databases:  # a table check still running would hold its database open
        if plan.checks_beside is not None:
            plan.checks_beside.stop(cancel=True)
    if failed and not state.swapping:
        for url, name, source in state.created:
            try:
                drop_database(url, name, source)
            except Exception:
                pass
        state.created.clear()
    if state.own_workdir and state.workdir is not None:
        shutil.rmtree(state.workdir, ignore_errors=True)


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
    def what(self) -> str:
        return "old live database" if self.kind == "pre_restore" else "scratch restore"

    @property
    def created_at(self) -> datetime:
        return datetime.strptime(self.stamp, STAMP_FORMAT).replace(tzinfo=utcnow().tzinfo)


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
        size = "size unknown" if leftover.size_bytes is None else human_bytes(leftover.size_bytes)
        hours = max(0.0, ((now or utcnow()) - leftover.created_at).total_seconds() / 3600)
        age = f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
        details = f"{leftover.name} ({leftover.what} of {leftover.live}, {size}, {age} old)"
        if self.action.startswith("kept: "):
            return f"kept {details}: {self.action.removeprefix('kept: ')}"
        return f"{self.action} {details}"


def running_restore_stamps(store: ObjectStore) -> set[str]:
    """Stamps of the restores and drills whose activity marker says they are running
    (a dead process's marker does not count)."""
    return {a.ident for a in running_activities(store) if a.kind == "restore"}


def restore_leftovers(destinations: list[DatabaseTarget], every: bool = False) -> list[Leftover]:
    """Databases restores left on the destinations' servers: `<live>_pre_restore_<stamp>`
    and `<live>_restore_<stamp>` of the configured live databases; with `every`, also those
    of other live names on the same servers (`configured` False), each once, with its size."""
    found: dict[tuple, Leftover] = {}
    for dest in destinations:
        rows = database_sizes(dest.url, dest.source)
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


def cleanup_summary(items: list[CleanupItem], dry_run: bool) -> str:
    """`nothing to drop`, or `dropped 1 database, kept 2 databases`: the CLI's and the job's last line."""
    if not items:
        return "nothing to drop: no database left by a restore"
    dropped, kept = sum(item.dropped for item in items), sum(not item.dropped for item in items)
    said = [f"{'would drop' if dry_run else 'dropped'} {counted(dropped, 'database')}"] if dropped else []
    said += [f"kept {counted(kept, 'database')}"] if kept else []
    return ", ".join(said)


def raise_for_in_use(items: list[CleanupItem]) -> None:
    """After the cleanup's report: fail naming the leftovers other roles' sessions kept open."""
    in_use = [item.in_use for item in items if item.in_use]
    if in_use:
        dropped = sum(item.action == "dropped" for item in items)
        raise DatabaseInUse(
            f"Kept {len(in_use)} restore leftovers, {dropped} dropped: " + "; ".join(in_use),
            "Ask those sessions to disconnect (or an administrator to end them), then run the cleanup again",
        )
