"""The CLI's progress display: bytes of dumps and downloads, and every step of a restore or drill.

On a terminal, a line per running task with a bar (or a spinner when the amount is unknown),
what it is on (the table pg_restore restores, the index amcheck checks) and the time elapsed;
sizes in the one unit of formatting.human_bytes. Without a terminal (a pipe, CI, a file) no
bars: one line per task when it ends, which a log keeps readably.

It is fed by the libraries' two callbacks: `progress(label, done, expected)` (bytes; the
backup library's Progress) and `phase(Phase)` (backup.phases.PhaseProgress).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from maestro_pipelines.formatting import human_bytes

BYTES = "bytes"


class _Amount(ProgressColumn):
    """`585.3 KiB / 1.2 MiB` for bytes, `120 / 245 entries` for counted steps, nothing for spinners."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "")
        if not unit or task.total is None:
            return Text("")
        if unit == BYTES:
            return Text(f"{human_bytes(task.completed)} / {human_bytes(task.total)}", style="progress.download")
        return Text(f"{int(task.completed):,} / {int(task.total):,} {unit}", style="progress.download")


class _Speed(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if task.fields.get("unit") != BYTES or not speed:
            return Text("")
        return Text(f"{human_bytes(speed)}/s", style="progress.data.speed")


class _Current(ProgressColumn):
    """What the step is on (a table, an index): cut short rather than squeezing the bar."""

    def render(self, task) -> Text:
        return Text(task.fields.get("current", ""), no_wrap=True, overflow="ellipsis", style="dim")


class CommandProgress:
    """Progress of one command on `console` (stderr). Drawn from the first report on: a command
    refused before any work draws nothing (an empty bar leaves a blank line above its error).

    `verb` names byte tasks (`download platform (maestro)`). With `keep`, finished tasks stay on
    the screen (backup run: the dump and verify bars are its record); without, each disappears
    when done and the command's table is the record."""

    def __init__(self, console: Console, verb: str, keep: bool = True):
        self.console, self.verb, self.keep = console, verb, keep
        self.live = console.is_terminal
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.byte_tasks: dict[str, list] = {}
        """label -> [done, started, last seen, said]: for the lines printed without a terminal."""
        self.last_seen = time.monotonic()
        self.phase_lines = None
        if not self.live:
            from maestro_pipelines.backup.phases import PhaseLog

            self.phase_lines = PhaseLog(lambda line: console.print(line, highlight=False, soft_wrap=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            return self.bar.__exit__(*exc)
        if exc[0] is None:
            self._say_bytes()
        return None

    def _progress(self) -> Progress:
        if self.bar is None:
            fixed = {"no_wrap": True}  # only what the step is on gives way on a narrow terminal
            self.bar = Progress(
                SpinnerColumn(finished_text="[green]✓[/green]"),
                TextColumn("{task.description}", table_column=Column(**fixed)),
                BarColumn(bar_width=20),
                _Amount(table_column=Column(**fixed)),
                _Speed(table_column=Column(**fixed)),
                TimeElapsedColumn(table_column=Column(**fixed)),
                _Current(),
                console=self.console,
                transient=not self.keep,
            )
            self.bar.__enter__()
        return self.bar

    def _task(self, name: str, total: int | None, unit: str) -> int:
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = self._progress().add_task(name, total=total, unit=unit, current="")
        return task

    def __call__(self, label: str, done: int, expected: int | None) -> None:
        """Bytes of a dump, a verification or a download (`expected` may be an estimate)."""
        name = f"{self.verb} {label}"
        if not self.live:
            # A task starts when the one before it was last heard of (reports come every few MiB).
            now = time.monotonic()
            state = self.byte_tasks.setdefault(name, [0, self.last_seen, now, False])
            state[0], state[2], self.last_seen = done, now, now
            return
        # The database's size is only an estimate of the dump's: never let the bar pass it.
        total = max(expected or 0, done) or None
        self._progress().update(self._task(name, total, BYTES), completed=done, total=total)

    def phase(self, phase) -> None:
        """A step of a restore or drill starting, advancing or ending."""
        if not self.live:
            if phase.finished:
                self._say_bytes()  # the download's lines before the step that contains them
            self.phase_lines(phase)
            return
        task = self._task(phase.name, phase.total, phase.unit)
        bar = self._progress()
        if phase.finished:
            shown = {t.id: t for t in bar.tasks}
            total = shown[task].total if shown[task].total is not None else 1
            bar.update(task, completed=total, total=total, current="", visible=self.keep)
            if not self.keep:  # the download bars belong to the step that just ended
                for other in shown.values():
                    if other.fields.get("unit") == BYTES and other.id != task:
                        bar.update(other.id, visible=False)
        else:
            bar.update(task, completed=phase.done, total=phase.total, unit=phase.unit, current=phase.current)

    def _say_bytes(self) -> None:
        for name, state in self.byte_tasks.items():
            done, first, last, said = state
            if not said:
                state[3] = True
                self.console.print(f"{name}: {human_bytes(done)} in {last - first:.1f} s", highlight=False)

