"""The recovery window of one server: from the oldest usable base backup's stop (the earliest
point a recovery is consistent) to the end of the contiguous WAL run that follows the newest
usable one; and the WAL gaps: segments missing between the oldest base backup's start_wal
and the newest segment archived. A gap after the newest verified base backup's start means
no recovery can go past it (an error in `maestro backup info`); one before it only narrows
the window.

Only the store is read (one listing of the server's WAL folder, the base backups' records
and heads). Timeline switches: a segment of a timeline that branched off (its history file
names the parent) continues its parent's run.

No backup key is needed for the window: names, sizes and the base backups' records (which are
not sealed). Only sealed history files cannot be read without it: a timeline then counts as
branched off the one before it, as it almost always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from maestro_pipelines.backup.manifest import _iso
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.base import BaseEntry, check_base_objects, list_base_backups
from maestro_pipelines.crypto.keys import BackupKeyError
from maestro_pipelines.storage import ObjectStore


@dataclass(frozen=True)
class WalSegment:
    name: str
    size: int
    last_modified: datetime | None


@dataclass(frozen=True)
class WalGap:
    """Segments `first` to `last` (inclusive) are missing from the store."""

    first: str
    last: str
    count: int
    after_newest_verified: bool = False
    """True: it lies after the newest verified base backup's start: no recovery past it."""

    def describe(self) -> str:
        return self.first if self.count == 1 else f"{self.first} to {self.last} ({self.count} segments)"


@dataclass
class RecoveryWindow:
    system_id: str
    earliest_time: datetime | None = None
    earliest_lsn: str | None = None
    latest_time: datetime | None = None
    """When the last segment of the run was archived: recovery reaches the last transaction in it."""
    latest_lsn: str | None = None
    latest_wal: str | None = None
    newest_wal: str | None = None
    gaps: list[WalGap] = field(default_factory=list)
    usable: list[str] = field(default_factory=list)
    """Base backups a recovery can start from (intact, chain intact, WAL start..stop archived), oldest first."""
    bases: list[BaseEntry] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    """base_id -> why a recovery cannot start from it."""
    segments: int = 0
    wal_bytes: int = 0

    @property
    def recoverable(self) -> bool:
        return self.earliest_time is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "system_id": self.system_id,
            "earliest": {"time": _iso(self.earliest_time) if self.earliest_time else None, "lsn": self.earliest_lsn},
            "latest": {"time": _iso(self.latest_time) if self.latest_time else None, "lsn": self.latest_lsn,
                       "wal": self.latest_wal},
            "newest_wal": self.newest_wal,
            "gaps": [{"first": g.first, "last": g.last, "segments": g.count,
                      "after_newest_verified": g.after_newest_verified} for g in self.gaps],
            "base_backups": [{"id": b.base_id, "kind": b.record.kind if b.record else None,
                              "parent": b.record.parent if b.record else None,
                              "finished_at": _iso(b.record.finished_at) if b.record else None,
                              "start_wal": b.record.start_wal if b.record else None,
                              "stored_bytes": b.record.compressed_bytes if b.record else None,
                              "verified": b.verified, "usable": b.base_id in self.usable,
                              "problem": self.unusable.get(b.base_id)} for b in self.bases],
            "segments": self.segments,
            "wal_bytes": self.wal_bytes,
        }


def list_segments(store: ObjectStore, system_id: str, month: str | None = None) -> tuple[list[WalSegment], list[str]]:
    """(segments, other WAL file names: history and backup history files) under the server's wal/."""
    segments, others = [], []
    for info in store.list(layout.wal_prefix(system_id, month), with_metadata=False):
        name = layout.wal_name_of_key(info.key)
        if name is None:
            continue
        if layout.SEGMENT.match(name):
            segments.append(WalSegment(name, info.size, info.last_modified))
        else:
            others.append(name)
    return segments, others


def timeline_parents(store: ObjectStore, system_id: str, history_names: list[str], month: str | None = None) -> dict[int, int]:
    """timeline -> its parent, from the history files (the last line of `<tli>.history`)."""
    import zstandard

    from maestro_pipelines.backup.pitr.walkeys import key_finder
    from maestro_pipelines.backup.sealing import open_object
    from maestro_pipelines.errors import MaestroError

    parents = {}
    for name in history_names:
        if not layout.HISTORY.match(name):
            continue
        key = layout.wal_key(system_id, name, month)
        try:
            with open_object(store, key, key_finder(store, system_id, month), f"{key} in {store.url}") as reader:
                text = zstandard.ZstdDecompressor().decompressobj().decompress(reader.read()).decode("utf-8", "replace")
        except BackupKeyError:  # sealed, no key here: the usual branch (see the module's docstring)
            parents[int(name[:8], 16)] = int(name[:8], 16) - 1
            continue
        except (MaestroError, zstandard.ZstdError):  # damaged or gone: verify says so
            continue
        lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if lines and lines[-1][0].isdigit():
            parents[int(name[:8], 16)] = int(lines[-1][0])
    return parents


def _lineage(timeline: int, parents: dict[int, int]) -> set[int]:
    """`timeline` and every timeline that descends from it."""
    family, grew = {timeline}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return family


def _numbers(segments: list[WalSegment], timelines: set[int], seg_size: int) -> dict[int, WalSegment]:
    """Segment number -> the segment (on the highest timeline of `timelines` that has it)."""
    found: dict[int, WalSegment] = {}
    for segment in sorted(segments, key=lambda s: s.name[:8]):
        if layout.segment_timeline(segment.name) in timelines:
            found[layout.segment_number(segment.name, seg_size)] = segment
    return found


def _gaps(present: dict[int, WalSegment], start: int, timeline: int, seg_size: int) -> list[tuple[int, int]]:
    """Ranges of numbers missing from `start` to the highest number present."""
    gaps, missing_from = [], None
    for number in range(start, max(present, default=start - 1) + 1):
        if number not in present and missing_from is None:
            missing_from = number
        elif number in present and missing_from is not None:
            gaps.append((missing_from, number - 1))
            missing_from = None
    return gaps


def _usable(store: ObjectStore, entry: BaseEntry, by_id: dict[str, BaseEntry], present: dict[int, WalSegment],
            seg_size: int) -> str | None:
    """Why a recovery cannot start from `entry`, or None."""
    problem = entry.bad or check_base_objects(store, entry)
    if problem:
        return problem
    record, parent = entry.record, entry.record.parent
    while parent is not None:
        ancestor = by_id.get(parent)
        if ancestor is None or ancestor.bad or check_base_objects(store, ancestor):
            return f"its parent {parent} is missing or damaged"
        parent = ancestor.record.parent
    first, last = (layout.segment_number(n, seg_size) for n in (record.start_wal, record.stop_wal))
    missing = [n for n in range(first, last + 1) if n not in present]
    if missing:
        return f"WAL it needs is missing ({layout.segment_name(record.timeline, missing[0] * seg_size, seg_size)})"
    return None


def recovery_window(store: ObjectStore, system_id: str, month: str | None = None) -> RecoveryWindow:
    """The window of server `system_id` (see the module's docstring)."""
    window = RecoveryWindow(str(system_id))
    window.bases = list_base_backups(store, system_id, month)
    segments, others = list_segments(store, system_id, month)
    window.segments, window.wal_bytes = len(segments), sum(s.size for s in segments)
    window.newest_wal = max((s.name for s in segments), key=lambda n: (n[8:], n[:8]), default=None)
    records = [b for b in window.bases if b.record is not None]
    if not records:
        return window
    seg_size = records[0].record.wal_segment_size
    parents = timeline_parents(store, system_id, others, month)
    present = _numbers(segments, _lineage(min(b.record.timeline for b in records), parents), seg_size)
    by_id = {b.base_id: b for b in window.bases}
    for entry in records:
        why = _usable(store, entry, by_id, present, seg_size)
        if why is None:
            window.usable.append(entry.base_id)
        else:
            window.unusable[entry.base_id] = why
    for entry in window.bases:
        if entry.record is None:
            window.unusable[entry.base_id] = entry.problem or "its record cannot be read"
    verified = [b for b in records if b.verified and b.base_id in window.usable]
    newest_verified_start = layout.segment_number(verified[-1].record.start_wal, seg_size) if verified else None
    oldest_start = min(layout.segment_number(b.record.start_wal, seg_size) for b in records)
    for first, last in _gaps(present, oldest_start, records[0].record.timeline, seg_size):
        after = newest_verified_start is not None and last >= newest_verified_start
        tl = records[-1].record.timeline
        window.gaps.append(WalGap(layout.segment_name(tl, first * seg_size, seg_size),
                                  layout.segment_name(tl, last * seg_size, seg_size), last - first + 1, after))
    _ends(window, by_id, present, seg_size)
    return window


def _ends(window: RecoveryWindow, by_id: dict[str, BaseEntry], present: dict[int, WalSegment], seg_size: int) -> None:
    """Latest: the end of the WAL run after the newest usable base backup's stop; earliest: the
    stop of the oldest usable one whose WAL reaches that run without a gap (older ones can
    only recover to points before a gap: usable, outside the window)."""
    if not window.usable:
        return
    newest = by_id[window.usable[-1]].record
    number = layout.segment_number(newest.stop_wal, seg_size)
    while number + 1 in present:
        number += 1
    last = present[number]
    window.latest_wal = last.name
    window.latest_lsn = layout.format_lsn((number + 1) * seg_size)
    window.latest_time = max(filter(None, [last.last_modified, newest.finished_at]))
    earliest = newest
    for base_id in reversed(window.usable[:-1]):
        record = by_id[base_id].record
        first = layout.segment_number(record.start_wal, seg_size)
        if any(n not in present for n in range(first, layout.segment_number(newest.stop_wal, seg_size) + 1)):
            break
        earliest = record
    window.earliest_time, window.earliest_lsn = earliest.finished_at, earliest.stop_lsn


def servers_in_store(store: ObjectStore) -> list[str]:
    """System identifiers with a folder under pitr/."""
    found = set()
    for info in store.list(f"{layout.PITR_PREFIX}/", with_metadata=False):
        head = info.key.split("/")[1] if info.key.count("/") >= 2 else ""
        if layout.SYSTEM_ID.match(head):
            found.add(head)
    return sorted(found)


# ---- reading every segment back ------------------------------------------------------------


@dataclass
class WalVerifyReport:
    system_id: str
    first: str | None = None
    last: str | None = None
    segments: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    storage_only: str | None = None
    """Why some sealed segments got the storage checks only (their key not at hand), or None."""
    storage_segments: int = 0
    """How many: their key record is there, their size and the sha256 of the ciphertext match."""

    @property
    def ok(self) -> bool:
        return not self.problems


class _HeadKeeper:
    """A sink for a decompressed segment that keeps only its first page."""

    def __init__(self) -> None:
        self.head = b""

    def write(self, chunk: bytes) -> None:
        if len(self.head) < 64:
            self.head += chunk[: 64 - len(self.head)]


def _sealed_from(window: RecoveryWindow, seg_size: int) -> list[tuple[int, bool]]:
    """(start segment number, WAL sealed) of each usable base backup, by start: a segment
    must be sealed when the newest base backup starting at or before it says WAL was then."""
    by_id = {b.base_id: b for b in window.bases}
    records = [by_id[b].record for b in window.usable]
    return sorted((layout.segment_number(r.start_wal, seg_size), bool(r.wal_sealed)) for r in records)


def _plain_ok(starts: list[tuple[int, bool]], name: str, seg_size: int) -> bool:
    number = layout.segment_number(name, seg_size)
    before = [sealed for start, sealed in starts if start <= number]
    return not (before and before[-1])


def verify_wal(store: ObjectStore, system_id: str, progress=None) -> WalVerifyReport:
    """Read back every segment a recovery can need (from the oldest usable base backup's start;
    all of them without one): the store's sha256, each sealed chunk, zstd, the archived
    `wal_sha256`, and the position the segment's first page names. A sealed segment whose key
    is not at hand gets the storage checks only (`wal.check_segment_bytes`). Gaps are
    `recovery_window`'s to say."""
    from maestro_pipelines.backup.pitr.wal import check_segment_bytes

    window = recovery_window(store, system_id)
    by_id = {b.base_id: b for b in window.bases}
    since = by_id[window.usable[0]].record.start_wal if window.usable else ""
    seg_size = by_id[window.usable[0]].record.wal_segment_size if window.usable else layout.DEFAULT_SEGMENT_SIZE
    starts = _sealed_from(window, seg_size)
    report = WalVerifyReport(system_id)
    for segment in list_segments(store, system_id)[0]:
        if segment.name < since:
            continue
        report.first = report.first or segment.name
        report.last, report.segments = segment.name, report.segments + 1
        report.bytes_read += segment.size
        problem, storage_only = check_segment_bytes(store, system_id, segment.name, _HeadKeeper(),
                                                    _plain_ok(starts, segment.name, seg_size))
        if storage_only:
            report.storage_only, report.storage_segments = report.storage_only or storage_only, report.storage_segments + 1
        if problem:
            report.problems.append(problem)
        if progress is not None:
            progress(f"WAL of {system_id}", report.bytes_read, None)
    return report
