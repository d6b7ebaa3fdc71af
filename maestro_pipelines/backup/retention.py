"""Retention: keep the newest backup of each of the last N days with backups and the last M
monthly archives; never the newest verified backup whose objects are intact; never while a
backup or restore runs. It also sweeps what failed or killed backups and archives left:
folders without a manifest (under backups/ and monthly/) and unfinished uploads.

`plan_retention` is pure (entries and a clock in, decisions out) so the rules are tested on
synthetic histories; `apply_retention` lists the store, plans, and deletes manifest first
(the backup stops existing in one step), then the rest of its objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from maestro_pipelines.backup.activity import DEFAULT_STALE_AFTER, running_activities, stale_activities
from maestro_pipelines.backup.catalog import (
    BackupEntry,
    check_objects,
    incomplete_archives,
    incomplete_backups,
    list_backups,
)
from maestro_pipelines.backup.manifest import BACKUPS_PREFIX, MANIFEST_NAME, MONTHLY_PREFIX, VERIFIED_NAME, utcnow
from maestro_pipelines.objectives import DAILY_BACKUPS_KEPT, MONTHLY_ARCHIVES_KEPT
from maestro_pipelines.storage import ObjectStore


@dataclass(frozen=True)
class RetentionPolicy:
    daily: int = DAILY_BACKUPS_KEPT
    """Days (with at least one backup) whose newest backup is kept."""
    monthly: int = MONTHLY_ARCHIVES_KEPT
    """Monthly archives kept."""
    stale_after: timedelta = DEFAULT_STALE_AFTER
    """An unfinished backup folder younger than this may still be in progress: kept."""

    def __post_init__(self) -> None:
        if self.daily < 1 or self.monthly < 0:
            raise ValueError("retention keeps at least 1 daily backup and 0 or more monthly archives")


@dataclass
class RetentionPlan:
    keep: list[tuple[BackupEntry, str]] = field(default_factory=list)
    delete: list[tuple[BackupEntry, str]] = field(default_factory=list)
    delete_incomplete: list[str] = field(default_factory=list)
    """Folders of backups and monthly archives that never got a manifest and that no process
    can still be writing (see `_unfinished_roots`)."""
    discarded: list[str] = field(default_factory=list)
    """What unfinished uploads left that was removed (S3 multipart uploads, temporary objects)."""
    delete_markers: list[str] = field(default_factory=list)
    """Activity markers left by killed processes (pid gone, or no heartbeat for minutes)."""
    skipped: str | None = None
    """Why nothing was deleted (a backup or restore is running)."""


def _started(entry: BackupEntry) -> datetime:
    # A tampered/unreadable manifest has no time: order it by its id, which encodes the time.
    if entry.started_at is not None:
        return entry.started_at
    return datetime.strptime(entry.backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=utcnow().tzinfo)


def plan_retention(daily: list[BackupEntry], monthly: list[BackupEntry], policy: RetentionPolicy) -> RetentionPlan:
    plan = RetentionPlan()
    ordered = sorted(daily, key=_started, reverse=True)
    newest_verified = next((e for e in ordered if e.verified), None)
    kept_days: set = set()
    verified_days: set = set()  # kept days whose newest verified backup is kept
    for entry in ordered:
        day = _started(entry).date()
        if entry is newest_verified:
            plan.keep.append((entry, "latest verified backup"))
            kept_days.add(day)
            verified_days.add(day)
        elif day in kept_days and entry.verified and day not in verified_days:
            # A verified backup is not deleted because an unverified one ran later that day.
            plan.keep.append((entry, f"latest verified backup of {day}"))
            verified_days.add(day)
        elif day in kept_days:
            plan.delete.append((entry, f"a newer backup of {day} is kept"))
        elif len(kept_days) < policy.daily:
            kept_days.add(day)
            if entry.verified:
                verified_days.add(day)
            plan.keep.append((entry, f"latest backup of {day}"))
        else:
            plan.delete.append((entry, f"older than the last {policy.daily} days with backups"))
    months = sorted({e.month for e in monthly if e.month}, reverse=True)
    kept_months = set(months[: policy.monthly])
    for entry in monthly:
        if entry.month in kept_months:
            plan.keep.append((entry, f"monthly archive {entry.month}"))
        else:
            plan.delete.append((entry, f"older than the last {policy.monthly} monthly archives"))
    return plan


def _delete_backup(store: ObjectStore, root: str, names: list[str]) -> None:
    # Manifest first: from that moment the backup does not exist, whatever happens next.
    store.delete(f"{root}/{MANIFEST_NAME}")
    store.delete(f"{root}/{VERIFIED_NAME}")
    for name in names:
        store.delete(f"{root}/{name}")


def apply_retention(store: ObjectStore, policy: RetentionPolicy | None = None, now: datetime | None = None,
                    dry_run: bool = False) -> RetentionPlan:
    policy = policy or RetentionPolicy()
    now = now or utcnow()
    # Markers of dead processes (pid gone on this host, or no heartbeat) do not count.
    running = running_activities(store, now)
    if running:
        described = ", ".join(f"{a.kind} {a.ident} (since {a.started_at:%Y-%m-%d %H:%M} UTC on {a.host})" for a in running)
        return RetentionPlan(skipped=f"not deleting anything while these run: {described}")
    daily = list_backups(store)
    for entry in reversed(daily):
        # The newest verified backup is kept only if it is still intact (a head per object);
        # a damaged one no longer counts as verified, so the next intact one is protected.
        if entry.verified and check_objects(store, entry) is None:
            break
    plan = plan_retention(daily, list_backups(store, monthly=True), policy)
    plan.delete_markers = stale_activities(store, now)
    dead = [_marker_of(key) for key in plan.delete_markers]
    plan.delete_incomplete = _unfinished_roots(store, policy, now, dead)
    if dry_run:
        return plan
    for entry, _why in plan.delete:
        names = [i.key.rsplit("/", 1)[-1] for i in store.list(entry.root + "/", with_metadata=False)]
        _delete_backup(store, entry.root, [n for n in names if n not in (MANIFEST_NAME, VERIFIED_NAME)])
    for root in plan.delete_incomplete:
        for info in store.list(root + "/", with_metadata=False):
            store.delete(info.key)
    # What unfinished uploads left (S3 multipart uploads, temporary objects): of the roots
    # removed and of processes known dead at once, of anyone once older than stale_after.
    prefixes = {root + "/" for root in plan.delete_incomplete}
    prefixes |= {f"{BACKUPS_PREFIX}/{ident}/" for kind, ident in dead if kind == "backup"}
    prefixes |= {f"{MONTHLY_PREFIX}/{ident}/" for kind, ident in dead if kind == "archive"}
    for prefix in sorted(prefixes):
        plan.discarded += store.discard_unfinished(prefix)
    plan.discarded += store.discard_unfinished("", started_before=now - policy.stale_after)
    for key in plan.delete_markers:
        store.delete(key)
    return plan


def _marker_of(key: str) -> tuple[str, str]:
    """(kind, ident) of an activity marker's key `activity/<kind>-<ident>.json`."""
    kind, _, ident = key.rsplit("/", 1)[-1].removesuffix(".json").partition("-")
    return kind, ident


def _unfinished_roots(store: ObjectStore, policy: RetentionPolicy, now: datetime,
                      dead: list[tuple[str, str]]) -> list[str]:
    """Folders without a manifest that no process can still be writing: a backup's whose
    marker is a dead process's or whose id (its start) is older than stale_after; a monthly
    archive's whose month's archive marker is dead or whose newest object is that old. A
    young folder without any marker is kept: a backup that just started may not have
    written its marker when the markers were read."""
    dead_backups = {ident for kind, ident in dead if kind == "backup"}
    dead_months = {ident for kind, ident in dead if kind == "archive"}
    roots = []
    for root in incomplete_backups(store):
        backup_id = root.rsplit("/", 1)[-1]
        try:
            started = datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=now.tzinfo)
        except ValueError:
            continue
        if backup_id in dead_backups or now - started >= policy.stale_after:
            roots.append(root)
    if not dead_months or not running_activities(store, now):  # an archive may have started since
        for root, written in incomplete_archives(store).items():
            if root.split("/")[1] in dead_months or (written is not None and now - written >= policy.stale_after):
                roots.append(root)
    return roots
