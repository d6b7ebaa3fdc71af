"""Half-done live swaps: what the server says each database is, and finishing or undoing one.

The journal (`journal.py`) says which databases a live restore swaps; each database's swap
is one transaction (`swap.py`), so pg_database tells whether it happened:

    swapped      <restored> is gone, <live> exists (and <kept>, when there was a live one)
    not swapped  <restored> exists, <kept> does not
    unknown      anything else (renamed or dropped by hand): finish and undo refuse

`finish_swap` swaps the databases not yet swapped (the restore's own loop, journaled the
same way), `undo_swap` swaps back those already swapped, so every live database is from one
moment: all from the backup, or all as before the restore. Neither drops anything: the old
live databases stay as `<live>_pre_restore_<stamp>` (finish), the verified restored copies
as `<live>_restore_<stamp>` (undo), until `maestro restore cleanup --confirm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.journal import SwapJournal, SwapStep, delete_journal, interrupted_swaps
from maestro_pipelines.backup.restore.state import RestoreRefused
from maestro_pipelines.backup.restore.swap import (
    NOT_SWAPPED,
    SWAPPED,
    UNKNOWN,
    destination_for,
    run_swap,
    server_names,
    step_state,
)
from maestro_pipelines.backup.types import DatabaseTarget
from maestro_pipelines.storage import ObjectStore


@dataclass
class HalfDoneSwap:
    journal: SwapJournal
    states: list[tuple[SwapStep, str]]

    @property
    def primary(self) -> str:
        """What `--confirm` must name: the platform database, else the first one swapped."""
        steps = self.journal.steps
        return next((s.live for s in steps if s.role == "platform"), steps[0].live)

    def lines(self) -> list[str]:
        backup = self.journal.backup_id
        said = []
        for step, state in self.states:
            head = f"{step.role} ({step.live} at {step.where}): "
            if state == SWAPPED:
                kept = f"; the old one is kept as {step.kept}" if step.live_existed else " (there was none before)"
                said.append(head + f"from backup {backup}{kept}")
            elif state == NOT_SWAPPED:
                said.append(head + f"as it was before the restore; backup {backup}'s verified copy waits in {step.restored}")
            else:
                said.append(head + f"UNKNOWN: neither {step.restored} nor {step.kept} is where the swap left it "
                            "(renamed or dropped by hand?)")
        return said

    def describe(self) -> str:
        return (f"the live restore of backup {self.journal.backup_id} (started "
                f"{self.journal.started_at:%Y-%m-%d %H:%M:%S} UTC on {self.journal.host}) stopped half way: "
                + "; ".join(self.lines()))

    def hint(self) -> str:
        return (f"Run `maestro restore finish --confirm {self.primary}` to put backup {self.journal.backup_id} in "
                f"place everywhere, or `maestro restore undo --confirm {self.primary}` to put every database back "
                "as it was; nothing is dropped either way")


def half_done_state(journal: SwapJournal, destinations: list[DatabaseTarget]) -> HalfDoneSwap:
    states = []
    for step in journal.steps:
        states.append((step, step_state(step, server_names(destination_for(step, destinations)))))
    return HalfDoneSwap(journal, states)


def half_done_swaps(store: ObjectStore, destinations: list[DatabaseTarget]) -> list[HalfDoneSwap]:
    """The interrupted swaps in the store, each database's state read from its server."""
    return [half_done_state(journal, destinations) for journal in interrupted_swaps(store)]


def _one_half_done(store: ObjectStore, destinations: list[DatabaseTarget], confirm: str | None) -> HalfDoneSwap:
    found = half_done_swaps(store, destinations)
    if not found:
        raise RestoreRefused("There is no half-done live restore to finish or undo",
                             "`maestro restore status` lists them; a restore still running is not one")
    half = found[0]
    if any(state == UNKNOWN for _step, state in half.states):
        raise RestoreRefused(half.describe(), "Rename the databases by hand; finish and undo only move what the "
                                              "journal names")
    if confirm != half.primary:
        raise RestoreRefused(half.describe(), half.hint())
    return half


def finish_swap(store: ObjectStore, destinations: list[DatabaseTarget], confirm: str | None,
                log: Callable[[str], None] | None = None) -> HalfDoneSwap:
    """Swap into place the databases a killed live restore had not swapped yet."""
    return _recover(store, destinations, confirm, undo=False, log=log)


def undo_swap(store: ObjectStore, destinations: list[DatabaseTarget], confirm: str | None,
              log: Callable[[str], None] | None = None) -> HalfDoneSwap:
    """Put back the old live databases a killed live restore had already swapped."""
    return _recover(store, destinations, confirm, undo=True, log=log)


def _recover(store, destinations, confirm, undo: bool, log) -> HalfDoneSwap:
    say = log or (lambda message: None)
    half = _one_half_done(store, destinations, confirm)
    journal = half.journal
    journal.action = "undo" if undo else "finish"
    # Under the restore's own marker: while this runs, nobody else sees the swap as half done.
    with activity(store, "restore", journal.stamp):
        for step in run_swap(store, journal, destinations, undo=undo):
            say(f"{'put back' if undo else 'swapped into place'}: {step.role} ({step.live})")
        delete_journal(store, journal)
    return half_done_state(journal, destinations)
