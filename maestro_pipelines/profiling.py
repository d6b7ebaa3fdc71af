"""Opt-in profiling of an asset's body: where its time goes (cProfile) and its peak memory
(tracemalloc).

The core (`profile`, `ProfileResult`) is plain Python and does not import Dagster. The glue
(`profile_when_tagged`) turns it on for the assets of one run when that run carries the tag
`maestro/profile` = `true` (or `1`, `yes`): in the launchpad, "Add tags" on the run. The
profile then lands in the asset's materialization metadata: `profile_top_functions` (a
table), `peak_memory_mib` and `profiled_seconds`.

Without the tag an asset pays one dictionary lookup: no profiler, no tracemalloc. Every
import of the profilers happens inside the functions, so loading the definitions stays cheap.

Both tools are process-wide: cProfile replaces the interpreter's profile hook and tracemalloc
traces every allocation. `profile` therefore leaves alone what it did not start: if another
profiler is active, no call profile is taken (the result says so); if tracemalloc is already
tracing, it is not stopped afterwards, and the peak is measured above the memory traced when
profiling began (tracemalloc's peak is reset for that, which another tracer would notice).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PROFILE_TAG = "maestro/profile"
"""Run tag that turns profiling on for every asset of the run (values `true`, `1`, `yes`)."""
PROFILE_TAG_VALUES = frozenset({"true", "1", "yes"})
TOP_FUNCTIONS = 20
MIB = 1024 * 1024


@dataclass(frozen=True)
class FunctionStats:
    function: str  # "sklearn/ensemble/_forest.py:345(fit)" or "<built-in method ...>"
    calls: int
    cumulative_seconds: float
    own_seconds: float


@dataclass
class ProfileResult:
    top_functions: list[FunctionStats] = field(default_factory=list)
    peak_memory_mib: float = 0.0
    seconds: float = 0.0
    note: str = ""  # why something was not measured, empty when everything was


def _short_path(filename: str) -> str:
    """A file name relative to the longest sys.path entry holding it (site-packages, the repo)."""
    best = ""
    for entry in sys.path:
        if entry and filename.startswith(entry.rstrip(os.sep) + os.sep) and len(entry) > len(best):
            best = entry.rstrip(os.sep) + os.sep
    return filename[len(best):] if best else filename


def _label(filename: str, line: int, name: str) -> str:
    if filename == "~" and line == 0:  # built-in functions and methods
        return name
    return f"{_short_path(filename)}:{line}({name})"


def top_functions(profiler, limit: int = TOP_FUNCTIONS) -> list[FunctionStats]:
    """The `limit` functions with the most cumulative time in a disabled `cProfile.Profile`."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (prim calls, calls, own, cumulative, callers)
    own_module = __file__  # this module's frames are the profiler's, not the work's
    rows = [
        FunctionStats(_label(filename, line, name), calls, cumulative, own)
        for (filename, line, name), (_primitive, calls, own, cumulative, _callers) in stats.items()
        if filename != own_module and name != "<method 'disable' of '_lsprof.Profiler' objects>"
    ]
    rows.sort(key=lambda row: row.cumulative_seconds, reverse=True)
    return rows[:limit]


@contextmanager
def profile(limit: int = TOP_FUNCTIONS) -> Iterator[ProfileResult]:
    """Profile the block: the result is filled in when the block ends (also if it raises)."""
    import cProfile
    import tracemalloc

    result = ProfileResult()
    notes = []
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    else:
        tracemalloc.reset_peak()
        notes.append("tracemalloc was already tracing: peak measured above the memory traced at the start")
    baseline = tracemalloc.get_traced_memory()[0]
    profiler = None
    if sys.getprofile() is None:
        profiler = cProfile.Profile()
    else:
        notes.append("another profiler was active: no call profile")
    started = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        try:
            yield result
        finally:
            if profiler is not None:
                profiler.disable()
    finally:
        result.seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        if started_tracing:
            tracemalloc.stop()
        result.peak_memory_mib = max(0, peak - baseline) / MIB
        if profiler is not None:
            result.top_functions = top_functions(profiler, limit)
        result.note = "; ".join(notes)


# --- Dagster glue -------------------------------------------------------------------------


def profiling_requested(tags) -> bool:
    return str(tags.get(PROFILE_TAG, "")).strip().lower() in PROFILE_TAG_VALUES


def profile_metadata(result: ProfileResult) -> dict:
    """The result as materialization metadata."""
    import dagster as dg

    from maestro_pipelines.dagster_support import Column, metadata_table

    table = metadata_table(
        ({"function": row.function, "calls": row.calls,
          "cumulative_s": round(row.cumulative_seconds, 4), "own_s": round(row.own_seconds, 4)}
         for row in result.top_functions),
        [
            Column("function", "string", "file:line(function)"),
            Column("calls", "int"),
            Column("cumulative_s", "float", "seconds in the function and what it called"),
            Column("own_s", "float", "seconds in the function itself"),
        ],
    )
    metadata = {
        "profile_top_functions": table,
        "peak_memory_mib": dg.MetadataValue.float(round(result.peak_memory_mib, 3)),
        "profiled_seconds": dg.MetadataValue.float(round(result.seconds, 3)),
    }
    if result.note:
        metadata["profile_note"] = dg.MetadataValue.text(result.note)
    return metadata


def _context_of(args, kwargs):
    context = kwargs.get("context", args[0] if args else None)
    return context if hasattr(context, "add_asset_metadata") and hasattr(context, "run") else None


def profile_when_tagged(fn):
    """Decorate an asset body (under `@dg.asset`): profile it when its run has the profile tag.

    The metadata is added before the asset's output is handed to Dagster: a generator's events
    are collected while profiling and yielded afterwards; a returned `Output` or
    `MaterializeResult` is returned after the metadata is added.
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            context = _context_of(args, kwargs)
            if context is None or not profiling_requested(context.run.tags):
                yield from fn(*args, **kwargs)
                return
            with profile() as result:
                events = list(fn(*args, **kwargs))
            context.add_asset_metadata(profile_metadata(result))
            yield from events

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        context = _context_of(args, kwargs)
        if context is None or not profiling_requested(context.run.tags):
            return fn(*args, **kwargs)
        with profile() as result:
            value = fn(*args, **kwargs)
        context.add_asset_metadata(profile_metadata(result))
        return value

    return wrapper
