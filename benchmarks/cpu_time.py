"""Where a run's time goes on this machine: CPU seconds of each party and the disk.

A floor such as `pg_dump > /dev/null` is bound by something: the CPU of the PostgreSQL
server backend, of pg_dump/pg_restore, or the disk. These helpers measure it from /proc so a
benchmark can print it as rows, and so a target that cannot be met on the cores there are
is shown to be so, measured (`CPU seconds of every party > cores x wall`).

- `ServerCPU(pgdata)`: the server's CPU seconds, every process of it: the postmaster's own and
  its reaped children's (`cutime`/`cstime`, where a backend's time goes when it exits), plus
  the live children's (io workers, checkpointer, backends still running);
- `children_cpu()`: this process's waited-for children (pg_dump, pg_restore), `RUSAGE_CHILDREN`;
- `self_cpu()`: this process, all threads;
- `machine_busy()`: busy CPU seconds of the whole machine (/proc/stat): anything else running
  on it shows here and not in the parties above;
- `disk_write_throughput(folder)`: sequential write + fsync of a file in `folder` (MB/s).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def _children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


class ServerCPU:
    """CPU seconds of one PostgreSQL server (all its processes) since it started."""

    def __init__(self, pgdata: Path):
        self.postmaster = int((Path(pgdata) / "postmaster.pid").read_text().split()[0])
        self.baseline_children = len(_children(self.postmaster))

    def seconds(self) -> float:
        fields = _stat_fields(self.postmaster)
        # utime stime cutime cstime are fields 14-17 of /proc/pid/stat (index 11-14 here).
        ticks = sum(int(x) for x in fields[11:15])
        for child in _children(self.postmaster):
            try:
                ticks += sum(int(x) for x in _stat_fields(child)[11:13])
            except (OSError, ValueError):  # exited between the listing and the read: in cutime now
                pass
        return ticks / TICK

    def settled_seconds(self, limit_s: float = 3.0) -> float:
        """`seconds()` once the backends of the run just measured have exited (their time
        then is in the postmaster's cutime), waiting at most `limit_s` (not timed)."""
        deadline = time.monotonic() + limit_s
        while len(_children(self.postmaster)) > self.baseline_children and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.seconds()


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every core; idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK


class Parties:
    """CPU seconds of each party over one timed span: `with Parties(server) as p: ...`,
    then `p.figures(wall)`. `ours` is this process; `tools` its waited-for children."""

    def __init__(self, server: ServerCPU | None):
        self.server = server

    def __enter__(self):
        self._start = (self_cpu(), children_cpu(), self.server.seconds() if self.server else 0.0, machine_busy())
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._started
        server = self.server.settled_seconds() if self.server else 0.0
        end = (self_cpu(), children_cpu(), server, machine_busy())
        self.ours_s, self.tools_s, self.server_s, self.machine_s = (b - a for a, b in zip(self._start, end))

    def figures(self) -> dict:
        parties = self.ours_s + self.tools_s + self.server_s
        return {"wall_s": self.wall_s, "ours_cpu_s": self.ours_s, "tools_cpu_s": self.tools_s,
                "server_cpu_s": self.server_s, "parties_cpu_s": parties, "machine_busy_s": self.machine_s,
                "cores_busy": parties / self.wall_s if self.wall_s else None}


def disk_write_throughput(folder: Path, size_mb: int = 256) -> float:
    """MB/s of writing `size_mb` MB to a new file in `folder` and fsyncing it (the page cache
    absorbs the writes: the fsync is what waits for the disk)."""
    block = os.urandom(4 * 1024 * 1024)
    path = Path(folder) / "disk-throughput.probe"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < size_mb * MB:
            written += os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        seconds = time.perf_counter() - started
        path.unlink(missing_ok=True)
    return written / MB / seconds


def bound_by(figures: dict, tool: str, cores: int | None = None) -> str:
    """What a run of these figures was bound by, from its CPU seconds: every core busy, or
    one party busy for about the whole wall time (a serial process at ~100% of its core, or a
    server with more processes busier still), or neither (waiting: disk, pipes)."""
    cores = cores or os.cpu_count() or 1
    wall = figures["wall_s"]
    if figures["parties_cpu_s"] >= 0.9 * cores * wall:
        return f"bound by CPU: all {cores} cores busy"
    single = [(name, seconds) for name, seconds in (("the server", figures["server_cpu_s"]),
                                                    (tool, figures["tools_cpu_s"]),
                                                    ("our process", figures["ours_cpu_s"])) if seconds >= 0.85 * wall]
    if single:
        name, seconds = max(single, key=lambda item: item[1])
        return f"bound by the CPU of {name} ({seconds / wall:.2f} cores busy on average, over the wall time)"
    return "not CPU-bound: no core saturated, waits (disk, pipes, locks) take the rest"


def cpu_row(label: str, figures: dict, tool: str, cores: int | None = None) -> dict:
    """One row: `label`'s CPU seconds by party, their sum against cores x wall, what bound it."""
    from benchmarks.report import r, row

    cores = cores or os.cpu_count() or 1
    parts = [(name, figures[key]) for name, key in (("ours", "ours_cpu_s"), (tool, "tools_cpu_s"),
                                                     ("server", "server_cpu_s")) if figures[key] >= 0.005]
    capacity = cores * figures["wall_s"]
    text = " + ".join(f"{name} {seconds:.2f}" for name, seconds in parts) + f" = {figures['parties_cpu_s']:.2f}"
    return row(f"  {label}: CPU s by process vs {cores} cores x wall {figures['wall_s']:.2f} s", text, r(capacity),
               r(figures["parties_cpu_s"] / capacity), f"{bound_by(figures, tool, cores)}; "
               f"machine busy {figures['machine_busy_s']:.2f} s", None)


def reach_row(label: str, figures: dict, floor_s: float, target: float, cores: int | None = None) -> dict:
    """Whether `target` x the floor is within reach at all on this machine: `label`'s CPU
    seconds (every party) divided by the cores is the shortest wall time that work can take,
    however well it overlaps; above target x floor, no overlap can meet the target."""
    from benchmarks.report import r, row

    cores = cores or os.cpu_count() or 1
    shortest = figures["parties_cpu_s"] / cores
    budget = cores * target * floor_s
    parts = " + ".join(f"{name} {figures[key]:.2f}" for name, key in (("ours", "ours_cpu_s"), ("tools", "tools_cpu_s"),
                                                                      ("server", "server_cpu_s")))
    verdict = (f"within reach: {parts} = {figures['parties_cpu_s']:.2f} CPU s <= {cores} cores x {target:g} x floor = {budget:.2f}"
               if shortest <= target * floor_s else
               f"OUT OF REACH on {cores} cores: {parts} = {figures['parties_cpu_s']:.2f} CPU s > {cores} cores x {target:g} x floor = {budget:.2f}")
    return row(f"  {label}: shortest possible wall = CPU s of every party / {cores} cores, vs {target:g}x the floor (s)",
               r(shortest), r(target * floor_s), r(shortest / floor_s), verdict + " (ratio: x floor)", None)
