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
from maestro_pipelines.objectives import BASE_BACKUP_MAX_AGE, BASE_BACKUPS_KEPT, DAILY_BACKUPS_KEPT, MONTHLY_ARCHIVES_KEPT
from maestro_pipelines.storage import ObjectStore


@dataclass(frozen=True)
class RetentionPolicy:
    daily: int = DAILY_BACKUPS_KEPT
    """Days (with at least one backup) whose newest backup is kept."""
    monthly: int = MONTHLY_ARCHIVES_KEPT
    """Monthly archives kept."""
    stale_after: timedelta = DEFAULT_STALE_AFTER
    """An unfinished backup folder younger than this may still be in progress: kept."""
    base_kept: int = BASE_BACKUPS_KEPT
    """The physical tier: the latest base backups of each server kept (with their parents)."""
    base_max_age: timedelta | None = BASE_BACKUP_MAX_AGE
    """...and every base backup younger than this (None: by count only)."""

    def __post_init__(self) -> None:
        if self.daily < 1 or self.monthly < 0:
            raise ValueError("retention keeps at least 1 daily backup and 0 or more monthly archives")
        if self.base_kept < 1:
            raise ValueError("retention keeps at least 1 base backup per server")


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
    pitr: list["BaseRetentionPlan"] = field(default_factory=list)
    """The physical tier's, one per server (base backups and WAL)."""
    delete_pitr_months: list[str] = field(default_factory=list)
    """Months whose physical-tier archive (`monthly/<month>/pitr/`) is beyond `policy.monthly`."""


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
        plan.pitr = apply_base_retention(store, policy, now, dead, dry_run=True)
        plan.delete_pitr_months = _expire_pitr_months(store, policy, dry_run=True)
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
    plan.pitr = apply_base_retention(store, policy, now, dead)
    plan.delete_pitr_months = _expire_pitr_months(store, policy)
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


# ---- the physical tier: base backups and WAL (issue 16) ----------------------------------


@dataclass
class BaseRetentionPlan:
    """One server's: base backups kept and deleted (with why), WAL expired before `wal_cutoff`."""

    system_id: str
    keep: list[tuple[str, str]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)
    wal_cutoff: str | None = None
    """The oldest kept base backup's start_wal: every WAL file before it expires, none from it on."""
    delete_wal: list[str] = field(default_factory=list)
    delete_incomplete: list[str] = field(default_factory=list)
    keep_keys: list[tuple[str, str]] = field(default_factory=list)
    """WAL key records kept (store key, why): the data keys of the sealed WAL that stays."""
    delete_keys: list[str] = field(default_factory=list)
    """WAL key records no WAL file kept names, older than KEY_RECORD_GRACE."""


KEY_RECORD_GRACE = timedelta(days=2)
"""A WAL key record this young is kept even if no WAL names it: a push may have made it and
not yet stored the segment sealed with it (a push reuses the record of its day)."""
UNKNOWN_KEY = "?"
"""In `wal_keys`: a WAL object whose metadata does not say whether or with which key it is
sealed (not written by `wal push`, or its metadata lost): then no key record is deleted."""


def _finished(entry) -> datetime:
    if entry.record is not None:
        return entry.record.finished_at
    return datetime.strptime(entry.base_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=utcnow().tzinfo)


def plan_base_retention(system_id: str, bases: list, wal_names: list[str], policy: RetentionPolicy,
                        now: datetime, key_records: list | None = None,
                        wal_keys: dict[str, str | None] | None = None) -> BaseRetentionPlan:
    """Pure: which base backups (`pitr.base.BaseEntry`, objects already checked) and WAL files
    of one server go. Kept: the newest verified base backup, the newest `policy.base_kept`,
    those younger than `policy.base_max_age`, and every parent of a kept incremental. WAL
    expires before the oldest kept base backup's start_wal; never at or after it (so never
    between the newest verified base backup and now). Without any kept base backup, no WAL goes.
    WAL key records (`walkeys.KeyRecordName`s) go when no WAL file that stays names their key
    id (`wal_keys`: WAL name -> key id, None for plaintext) and they are older than the grace."""
    from maestro_pipelines.backup.pitr import layout

    plan = BaseRetentionPlan(system_id)
    ordered = sorted(bases, key=lambda e: e.base_id, reverse=True)
    by_id = {e.base_id: e for e in ordered}
    newest_verified = next((e for e in ordered if e.verified), None)
    kept: dict[str, str] = {}
    for rank, entry in enumerate(ordered):
        if entry is newest_verified:
            kept[entry.base_id] = "newest verified base backup"
        elif entry.record is not None and rank < policy.base_kept:
            kept[entry.base_id] = f"one of the latest {policy.base_kept}"
        elif entry.record is not None and policy.base_max_age is not None and now - _finished(entry) < policy.base_max_age:
            kept[entry.base_id] = "younger than the retention age"
    for base_id in list(kept):
        parent = by_id[base_id].record.parent if by_id[base_id].record else None
        while parent is not None and parent in by_id:
            kept.setdefault(parent, f"parent of {base_id}")
            parent = by_id[parent].record.parent if by_id[parent].record else None
    for entry in ordered:
        if entry.base_id in kept:
            plan.keep.append((entry.base_id, kept[entry.base_id]))
        else:
            plan.delete.append((entry.base_id, entry.bad or "older than the base backups kept"))
    starts = [by_id[b].record.start_wal for b in kept if by_id[b].record is not None]
    if starts:
        cutoff = min(starts, key=lambda name: (layout.segment_number(name), name[:8]))
        plan.wal_cutoff = cutoff
        plan.delete_wal = [name for name in wal_names if _wal_before(name, cutoff)]
    _plan_key_records(plan, key_records or [], wal_keys, now)
    return plan


def _plan_key_records(plan: BaseRetentionPlan, key_records: list, wal_keys: dict[str, str | None] | None,
                      now: datetime) -> None:
    """Which key records stay: every one a remaining WAL file names, every young one, and all
    of them when a remaining WAL file's key is unknown (or no `wal_keys` was given)."""
    expired = set(plan.delete_wal)
    staying = {UNKNOWN_KEY} if wal_keys is None else {key_id for name, key_id in wal_keys.items() if name not in expired}
    horizon = f"{now - KEY_RECORD_GRACE:%Y%m%d}"
    for record in key_records:
        if UNKNOWN_KEY in staying:
            plan.keep_keys.append((record.key, "a WAL file kept does not say its key"))
        elif record.key_id in staying:
            plan.keep_keys.append((record.key, "names WAL that is kept"))
        elif record.day >= horizon:
            plan.keep_keys.append((record.key, "made in the last days (its WAL may be on the way)"))
        else:
            plan.delete_keys.append(record.key)


def _wal_before(name: str, cutoff: str) -> bool:
    """A segment (or a backup history file, or a partial) wholly before segment `cutoff`;
    timeline history files stay (tiny, and recovery reads them to follow timelines)."""
    from maestro_pipelines.backup.pitr import layout

    if layout.HISTORY.match(name):
        return False
    return layout.segment_number(name[:24]) < layout.segment_number(cutoff)


def apply_base_retention(store: ObjectStore, policy: RetentionPolicy, now: datetime,
                         dead: list[tuple[str, str]], dry_run: bool = False) -> list[BaseRetentionPlan]:
    """Plan and apply the physical tier's retention for every server in the store (the caller
    made sure no backup or restore runs)."""
    from maestro_pipelines.backup.pitr.base import (ACTIVITY_KIND, check_base_objects, incomplete_base_backups,
                                                    list_base_backups, remove_base_folder)
    from maestro_pipelines.backup.pitr.layout import wal_key
    from maestro_pipelines.backup.pitr.walkeys import key_records
    from maestro_pipelines.backup.pitr.window import list_segments, servers_in_store

    plans = []
    dead_bases = {ident.split("-", 1)[1] for kind, ident in dead if kind == ACTIVITY_KIND and "-" in ident}
    unfinished = incomplete_base_backups(store)
    # A server whose only object is a killed backup's temporary file lists as nothing: its marker names it.
    marked = {ident.split("-", 1)[0] for kind, ident in dead if kind == ACTIVITY_KIND and "-" in ident}
    for system_id in sorted(set(servers_in_store(store)) | {sid for sid in marked if sid.isdigit()}):
        bases = list_base_backups(store, system_id)
        for entry in bases:
            check_base_objects(store, entry)  # a damaged one is not verified: the next intact one is protected
        segments, others = list_segments(store, system_id)
        records = key_records(store, system_id)
        plan = plan_base_retention(system_id, bases, [s.name for s in segments] + others, policy, now, records,
                                   _wal_key_ids(store, system_id, records, now))
        for root in unfinished:
            if root.split("/")[1] == system_id:
                base_id = root.rsplit("/", 1)[-1]
                started = datetime.strptime(base_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=now.tzinfo)
                if base_id in dead_bases or now - started >= policy.stale_after:
                    plan.delete_incomplete.append(root)
        plans.append(plan)
        if dry_run:
            continue
        roots = {e.base_id: e.root for e in bases}
        for base_id, _why in plan.delete:
            remove_base_folder(store, roots[base_id])  # base.json first: it stops existing in one step
        for root in plan.delete_incomplete + _dead_roots(system_id, dead, ACTIVITY_KIND):
            remove_base_folder(store, root)  # with what its unfinished upload left (a temporary file)
        for name in plan.delete_wal:
            store.delete(wal_key(system_id, name))
        for key in plan.delete_keys:  # after the WAL they keyed: a crash between leaves a record too many
            store.delete(key)
    return plans


def _wal_key_ids(store: ObjectStore, system_id: str, records: list, now: datetime) -> dict[str, str | None]:
    """WAL name -> the key id its metadata names (None: plaintext; UNKNOWN_KEY: not said).
    Listed with metadata (a HEAD per object on S3) only when a key record is old enough to go."""
    from maestro_pipelines.backup.pitr import layout

    if not any(record.day < f"{now - KEY_RECORD_GRACE:%Y%m%d}" for record in records):
        return {}  # nothing could go: no need to know (saves S3 a HEAD per WAL object)
    found: dict[str, str | None] = {}
    for info in store.list(layout.wal_prefix(system_id), with_metadata=True):
        name = layout.wal_name_of_key(info.key)
        if name is not None:
            sealed_by = info.metadata.get(layout.WAL_KEY_ID_KEY)
            found[name] = sealed_by if sealed_by or layout.WAL_SHA256_KEY in info.metadata else UNKNOWN_KEY
    return found


def plan_pitr_months(months: list[str], policy: RetentionPolicy) -> list[str]:
    """Pure: the months whose physical-tier archive goes (all but the newest `policy.monthly`)."""
    ordered = sorted(set(months), reverse=True)
    return sorted(ordered[policy.monthly:])


def _expire_pitr_months(store: ObjectStore, policy: RetentionPolicy, dry_run: bool = False) -> list[str]:
    from maestro_pipelines.backup.pitr.layout import BASE_RECORD, PITR_PREFIX

    months = {info.key.split("/")[1] for info in store.list(f"{MONTHLY_PREFIX}/", with_metadata=False)
              if info.key.split("/")[2:3] == [PITR_PREFIX]}
    expired = plan_pitr_months(sorted(months), policy)
    for month in [] if dry_run else expired:
        keys = [info.key for info in store.list(f"{MONTHLY_PREFIX}/{month}/{PITR_PREFIX}/", with_metadata=False)]
        for key in sorted(keys, key=lambda k: not k.endswith("/" + BASE_RECORD)):  # base.json first
            store.delete(key)
    return expired


def _dead_roots(system_id: str, dead: list[tuple[str, str]], kind: str) -> list[str]:
    """Base folders of this server whose backup's process is known gone (its marker is dead)."""
    from maestro_pipelines.backup.pitr.layout import BASE_ID, base_root

    roots = []
    for marker_kind, ident in dead:
        sid, _, base_id = ident.partition("-")
        if marker_kind == kind and sid == system_id and BASE_ID.match(base_id):
            roots.append(base_root(sid, base_id))
    return roots
