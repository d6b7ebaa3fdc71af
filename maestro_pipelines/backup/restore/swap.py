"""Phase 5, swap (live restores only): the verified scratch databases into the live ones' place.

    journal written (swaps/<stamp>.json: every database, before any is renamed)
    for each database: journal step `started`; end sessions;
        RENAME <live> TO <live>_pre_restore_<stamp>, RENAME <live>_restore_<stamp> TO <live>  (one transaction)
        journal step `done`
    journal deleted

A kill at any instant leaves a journal that `maestro restore status|finish|undo` read
(`recovery.py`); pg_database says whether each database's swap happened. A swap that fails
puts back the ones already swapped, so the live databases describe one moment.
"""

from __future__ import annotations

from maestro_pipelines.backup.journal import DONE, STARTED, SwapJournal, SwapStep, delete_journal, new_journal, write_journal
from maestro_pipelines.backup.pgtools import where
from maestro_pipelines.backup.restore.state import RestoreError, RestoreRefused, RestoreState, restore_database_name
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.platform_db.admin import (
    ClientsKeepReconnecting,
    DatabaseAdminError,
    DatabaseInUse,
    database_names,
    first_line,
    rename_databases,
)
from maestro_pipelines.storage import ObjectStore

SWAPPED, NOT_SWAPPED, UNKNOWN = "swapped", "not swapped", "unknown"


def swap_database(url, live: str, restored: str, kept: str, live_exists: bool, source: str) -> None:
    """Rename live -> kept and restored -> live in one transaction, after ending the live
    database's sessions (retried: a client may reconnect in between)."""
    renames = ([(live, kept)] if live_exists else []) + [(restored, live)]
    try:
        rename_databases(url, renames, source)
    except DatabaseInUse as exc:
        raise RestoreError(
            f"Could not swap '{restored}' into place as '{live}' at {where(url)}: it is held open by "
            f"{', '.join(exc.sessions)}, which {url.username or 'the connecting user'} may not end",
            f"Ask them to disconnect (or an administrator to end them) and restore again; "
            f"the restored data is verified in '{restored}'",
        ) from None
    except ClientsKeepReconnecting as exc:
        raise RestoreError(
            f"Could not swap '{restored}' into place as '{live}': clients keep reconnecting ({exc.detail})",
            f"Stop the clients of '{live}' (Dagster daemon, webserver, MLflow) and run the restore again; "
            f"the restored data is verified in '{restored}'",
        ) from None
    except DatabaseAdminError as exc:
        raise RestoreError(
            f"Could not swap '{restored}' into place as '{live}' at {where(url)}: {exc.detail}",
            f"The restored data is verified in '{restored}'; fix the cause (rights to rename '{live}') and "
            "restore again",
        ) from None


def step_state(step: SwapStep, names: set[str]) -> str:
    """What the server's database `names` say of one journal step: swapped, not swapped, unknown."""
    if step.restored in names and step.kept not in names:
        return NOT_SWAPPED
    if step.restored not in names and step.live in names and (step.kept in names or not step.live_existed):
        return SWAPPED
    return UNKNOWN


def server_names(dest: DatabaseTarget) -> set[str]:
    return database_names(dest.url, dest.source)


def destination_for(step: SwapStep, destinations: list[DatabaseTarget]) -> DatabaseTarget:
    """The configured destination a journal step swapped (refused when the settings changed)."""
    for dest in destinations:
        if dest.role == step.role and dest.database == step.live:
            return dest
    raise RestoreRefused(
        f"The half-done restore swapped the {step.role} database '{step.live}', which the configuration does not "
        "name now",
        "Run the command with the settings the restore ran with (MAESTRO_DATABASE_URL, MLFLOW_TRACKING_URI, "
        "MAESTRO_DAGSTER_DATABASE_URL)",
    )


def run_swap(store: ObjectStore, journal: SwapJournal, destinations: list[DatabaseTarget],
             undo: bool = False) -> list[SwapStep]:
    """Swap (or with `undo` swap back) each database of `journal` that is not there yet,
    marking it started before and done after in the store; return the steps it changed."""
    changed = []
    for step in journal.steps:
        dest = destination_for(step, destinations)
        state = step_state(step, server_names(dest))
        if state == (NOT_SWAPPED if undo else SWAPPED):
            continue
        if state == UNKNOWN:
            raise RestoreError(f"Cannot {'undo' if undo else 'finish'} the swap of {step.role} ({step.live}): "
                               f"neither {step.restored} nor {step.kept} is where the swap left it",
                               "Look at the databases on the server (`maestro restore status`) and rename them by hand")
        step.state = STARTED
        write_journal(store, journal)
        if undo and step.live_existed:
            swap_database(dest.url, step.live, step.kept, step.restored, True, dest.source)
        elif undo:
            swap_database(dest.url, step.restored, step.live, step.kept, False, dest.source)
        else:
            swap_database(dest.url, step.live, step.restored, step.kept, step.live in server_names(dest), dest.source)
        step.state = DONE
        write_journal(store, journal)
        changed.append(step)
    return changed


def swap_journal(state: RestoreState) -> SwapJournal:
    """The journal of this restore's swap: every database, before any is renamed."""
    steps = [
        SwapStep(plan.role, plan.result.live, plan.scratch, restore_database_name(plan.result.live, "pre_restore", state.stamp),
                 plan.result.live in server_names(plan.dest), where(plan.dest.url))
        for plan in state.databases
    ]
    return new_journal(state.stamp, state.entry.backup_id, state.report.snapshot_at, steps)


def journaled_swap(store: ObjectStore, journal: SwapJournal, destinations: list[DatabaseTarget]) -> None:
    """Swap every database of `journal`, the journal written before the first rename and
    each step marked in it, deleted after the last. A swap that fails puts back the ones
    already swapped (the live databases describe one moment)."""
    write_journal(store, journal)
    try:
        run_swap(store, journal, destinations)
    except RestoreError as exc:
        journal.action = "undo"
        try:
            put_back = run_swap(store, journal, destinations, undo=True)
        except Exception as undo_failed:
            raise RestoreError(
                exc.problem + f"; could NOT put back the databases already swapped ({first_line(undo_failed)})",
                "`maestro restore status` says where each database is; `maestro restore undo` tries again",
            ) from exc
        delete_journal(store, journal)
        undone = f"; the databases already swapped were put back: {', '.join(s.live for s in put_back)}" if put_back else ""
        raise RestoreError(exc.problem + undone, exc.hint) from exc
    delete_journal(store, journal)


def swap(state: RestoreState) -> None:
    """The step `swap`: every verified scratch database into its live database's place, the
    old one kept as `<live>_pre_restore_<stamp>`. From here on the verified copies are kept
    whatever happens (a failed swap's message points to them)."""
    if not state.databases:
        raise RestoreRefused("Nothing to swap: the restore has no database", "Plan the restore first")

    def swap_all() -> str:
        journal = swap_journal(state)
        journaled_swap(state.store, journal, state.destinations)
        for plan, step in zip(state.databases, journal.steps):
            plan.result.kept_as = step.kept if step.live_existed else None
            plan.result.restored_as = plan.result.live
            plan.result.url = plan.dest.url
        return "swapped into place: " + ", ".join(
            step.live + (f" (old one kept as {step.kept})" if step.live_existed else " (was missing)")
            for step in journal.steps
        )

    state.log("swapping the restored databases into place")
    state.swapping = True
    state.timed("swap", swap_all)
