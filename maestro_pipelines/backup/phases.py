"""How a long backup, restore or drill says what it is doing while it does it: `Phase` events
to a `PhaseProgress` callback (the CLI's bars, `PhaseLog`'s lines for Dagster's run log and for
a console without a terminal). No Dagster."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Phase:
    """A step of a restore or drill as it happens, for a progress display: sent when the step
    starts (done 0), as it advances (done of total units, the item it is on), and once when it
    ends (finished, with its seconds and detail, as in the report's steps)."""

    name: str
    done: int = 0
    total: int | None = None
    """None: how much there is to do is not known (a spinner, not a bar)."""
    unit: str = ""
    current: str = ""
    finished: bool = False
    seconds: float = 0.0
    detail: str = ""


PhaseProgress = Callable[[Phase], None]


class PhaseLog:
    """Phases as lines to `log` (a Dagster run's log, a console without a terminal): one when a
    step ends, `name: detail (seconds)`; with `milestones`, also where a long counted step is
    (`pg_restore platform: 1,200 of 4,000 entries, on TABLE DATA ...`) at each further tenth,
    at most every MILESTONE_SECONDS: an hour-long pg_restore says where it is, a short one not."""

    MILESTONE_SECONDS = 10.0

    def __init__(self, log: Callable[[str], None], milestones: bool = False):
        self.log, self.milestones = log, milestones
        self.said: dict[str, tuple[int, float]] = {}
        """step -> (tenth last said, when): from the step's start."""

    def __call__(self, phase: Phase) -> None:
        if phase.finished:
            self.said.pop(phase.name, None)
            self.log(f"{phase.name}: {phase.detail or 'done'} ({phase.seconds:.1f} s)")
            return
        now = time.monotonic()
        tenth, when = self.said.setdefault(phase.name, (0, now))
        if not (self.milestones and phase.total) or now - when < self.MILESTONE_SECONDS:
            return
        reached = phase.done * 10 // phase.total
        if tenth < reached < 10:
            self.said[phase.name] = (reached, now)
            on = f", on {phase.current}" if phase.current else ""
            self.log(f"{phase.name}: {phase.done:,} of {phase.total:,} {phase.unit}{on}")
