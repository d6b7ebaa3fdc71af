"""Retention: keep the newest backup of each of the last N days with backups and the last M
monthly archives; never the newest verified backup; never while a backup or restore runs.

`plan_retention` is pure (entries and a clock in, decisions out) so the rules are tested on
synthetic histories; `apply_retention` lists the store, plans, and deletes manifest first
(the backup stops existing in one step), then the rest of its objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from maestro_pipelines.backup.activity import DEFAULT_STALE_AFTER, running_activities, stale_activities
from maestro_pipelines.backup.catalog import BackupEntry, incomplete_backups, list_backups
from maestro_pipelines.backup.manifest import MANIFEST_NAME, VERIFIED_NAME, utcnow
from maestro_pipelines.storage import ObjectStore


@dataclass(frozen=True)
class RetentionPolicy:
    daily: int = 7
    """Days (with at least one backup) whose newest backup is kept."""
    monthly: int = 12
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
    """Roots of backups that never got a manifest and are older than stale_after."""
    delete_markers: list[str] = field(default_factory=list)
    """Activity markers left by killed processes (older than stale_after)."""
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
            plan.keep.append((entry, "newest verified backup"))
            kept_days.add(day)
            verified_days.add(day)
        elif day in kept_days and entry.verified and day not in verified_days:
            # A verified backup is not deleted because an unverified one ran later that day.
            plan.keep.append((entry, f"newest verified backup of {day}"))
            verified_days.add(day)
        elif day in kept_days:
            plan.delete.append((entry, f"a newer backup of {day} is kept"))
        elif len(kept_days) < policy.daily:
            kept_days.add(day)
            if entry.verified:
                verified_days.add(day)
            plan.keep.append((entry, f"newest backup of {day}"))
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
    running = running_activities(store, now, policy.stale_after)
    if running:
        described = ", ".join(f"{a.kind} {a.ident} (since {a.started_at:%Y-%m-%d %H:%M} UTC on {a.host})" for a in running)
        return RetentionPlan(skipped=f"not deleting anything while these run: {described}")
    plan = plan_retention(list_backups(store), list_backups(store, monthly=True), policy)
    for root, _names in incomplete_backups(store).items():
        backup_id = root.rsplit("/", 1)[-1]
        try:
            started = datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=now.tzinfo)
        except ValueError:
            continue
        if now - started >= policy.stale_after:
            plan.delete_incomplete.append(root)
    plan.delete_markers = stale_activities(store, now, policy.stale_after)
    if dry_run:
        return plan
    for entry, _why in plan.delete:
        names = [i.key.rsplit("/", 1)[-1] for i in store.list(entry.root + "/", with_metadata=False)]
        _delete_backup(store, entry.root, [n for n in names if n not in (MANIFEST_NAME, VERIFIED_NAME)])
    for root in plan.delete_incomplete:
        for info in store.list(root + "/", with_metadata=False):
            store.delete(info.key)
    for key in plan.delete_markers:
        store.delete(key)
    return plan
