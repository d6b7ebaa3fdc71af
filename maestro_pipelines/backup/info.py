"""`maestro backup info`: is the database protected, and since when? One look at the store.

Like `pgbackrest info`: a status (ok / warning / error) with every reason, the latest and the
oldest restorable backup with their age, the RPO now against its target, the last backups'
sizes and durations with their verification state, the monthly archives, the latest drill,
and anything half done (a backup or restore running, one killed, a live swap left half way).

Restorable means what a restore would take: verified, and every object still matching the
manifest (one head per object, `check_objects`: the check `maestro backup list` makes).
`latest` is the backup `maestro restore` takes by default (daily backups only, like the RPO
sensor); `oldest` may be a monthly archive (`maestro restore --before` reaches those).

Only the store is read, never a database server: it answers when the databases are the
thing that was lost. Its levels:

- error: no restorable backup; the RPO target missed; the latest backup is BAD; a live
  restore stopped half way (the live databases are from two moments).
- warning: the latest backup not verified yet; the RPO within `RPO_WARNING_MARGIN` of its
  target; a backup killed (its marker or unfinished folder left behind); older BAD backups;
  the latest drill failed.
- ok: none of these (a backup or restore running is said in the status line, not a warning).

Encryption: which key-encryption key new backups use (its id, never the key), how many
records each KEK wraps (every record under backups/, monthly/, pitr/ and drills/ is read for
its envelope: `rekey.key_census`), which old key can be retired. Warnings: a cloud store
without a key (its backups are readable by whoever reads the bucket), and records wrapped by
a key that is not configured (those backups cannot be read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from maestro_pipelines.automation import AUTOMATION_ON_COMMAND, AUTOMATION_STATUS_COMMAND
from maestro_pipelines.backup.activity import Activity, running_activities, stale_activities
from maestro_pipelines.backup.catalog import (
    BackupEntry,
    check_objects,
    incomplete_archives,
    incomplete_backups,
    list_backups,
)
from maestro_pipelines.backup.drill_history import DrillRecord, list_drills
from maestro_pipelines.backup.journal import SwapJournal, interrupted_swaps
from maestro_pipelines.backup.manifest import _iso, utcnow
from maestro_pipelines.backup.rekey import key_census, needs_key_hint
from maestro_pipelines.backup.sealing import keyring_of, unencrypted_warning
from maestro_pipelines.objectives import RPO_TARGET, RPO_WARNING_MARGIN
from maestro_pipelines.formatting import counted, human_duration
from maestro_pipelines.storage import ObjectStore

OK, WARNING, ERROR = "ok", "warning", "error"
EXIT_CODES = {OK: 0, WARNING: 1, ERROR: 2}
"""`maestro backup info`'s exit code by status: the monitoring-plugin convention (Nagios,
Icinga, Sensu), so a check can run the command as it is."""
RECENT_BACKUPS = 5
"""How many of the last backups `info` details."""


@dataclass(frozen=True)
class Finding:
    """One reason the status is not ok: what is wrong and the command that helps."""

    level: str
    message: str
    hint: str = ""


@dataclass
class EncryptionStatus:
    """The keys as `backup info` shows them: ids only."""

    current: str | None = None
    """The KEK new backups are wrapped by; None: new backups are not encrypted."""
    source: str | None = None
    """Where it is configured (MAESTRO_BACKUP_KEY, MAESTRO_BACKUP_KMS_KEY_ID)."""
    required: bool = False
    old: list[str] = field(default_factory=list)
    """MAESTRO_BACKUP_OLD_KEYS' ids."""
    records: dict[str, int] = field(default_factory=dict)
    """KEK id -> records wrapped by it."""
    plain: int = 0
    """Records without an envelope (backups from before a key was configured)."""
    warning: str | None = None
    """A cloud store without a key: `sealing.unencrypted_warning`."""

    @property
    def unconfigured(self) -> dict[str, int]:
        """KEK id -> records, for KEKs configured neither as current nor as old."""
        known = set(self.old) | {self.current}
        return {kek: n for kek, n in self.records.items() if kek not in known}

    def as_dict(self) -> dict[str, Any]:
        return {"current": {"id": self.current, "source": self.source} if self.current else None,
                "required": self.required, "records": dict(self.records), "plain_records": self.plain,
                "old_keys": [{"id": kek, "records": self.records.get(kek, 0), "retire": not self.records.get(kek)}
                             for kek in self.old],
                "unconfigured": [{"id": kek, "records": n} for kek, n in self.unconfigured.items()],
                "warning": self.warning}


def encryption_status(store: ObjectStore) -> EncryptionStatus:
    keyring = keyring_of(store)
    census = key_census(store)
    current = keyring.current
    return EncryptionStatus(current.id if current else None, current.source if current else None, keyring.required,
                            [k.id for k in keyring.old], census.by_kek, census.plain, unencrypted_warning(store))


@dataclass
class BackupInfo:
    checked_at: datetime
    store_url: str
    rpo_target: timedelta
    automation_stopped: bool = False
    """The embedded default: the backup schedules and the RPO sensor start stopped."""
    backups: list[BackupEntry] = field(default_factory=list)
    """Committed daily backups, oldest first, their objects checked."""
    archives: list[BackupEntry] = field(default_factory=list)
    latest: BackupEntry | None = None
    oldest: BackupEntry | None = None
    restorable: int = 0
    running: list[Activity] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    """Markers of processes killed inside a backup or restore."""
    unfinished: dict[str, int] = field(default_factory=dict)
    """Folders without a manifest that no running process writes (root -> objects in it)."""
    half_done: list[SwapJournal] = field(default_factory=list)
    drill: DrillRecord | None = None
    """The latest recorded drill (`maestro drill`, the dr_drill asset), None without one."""
    findings: list[Finding] = field(default_factory=list)
    readable: bool = True
    """False: the store could not be opened or read, nothing above is known."""
    pitr: list[Any] = field(default_factory=list)
    """The physical tier: one `pitr.window.RecoveryWindow` per server with base backups or WAL."""
    encryption: EncryptionStatus = field(default_factory=EncryptionStatus)

    @property
    def status(self) -> str:
        levels = {finding.level for finding in self.findings}
        return ERROR if ERROR in levels else WARNING if WARNING in levels else OK

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def age(self, entry: BackupEntry | None) -> timedelta | None:
        """How old the data in `entry` is now (its snapshot's age)."""
        if entry is None or entry.manifest is None:
            return None
        return self.checked_at - entry.manifest.snapshot_at

    @property
    def rpo(self) -> timedelta | None:
        """The RPO now: what a loss at this moment would lose, the latest restorable's age."""
        return self.age(self.latest)

    def status_line(self) -> str:
        """`ok`, `ok (backup running)`, `error (no restorable backup; 1 more below)`."""
        worst = [f for f in self.findings if f.level == self.status]
        if worst:
            more = len(self.findings) - 1
            return f"{self.status} ({worst[0].message.split(':')[0]}" + (f"; {more} more below)" if more else ")")
        if self.running:
            return f"ok ({', '.join(sorted({a.kind for a in self.running}))} running)"
        return OK

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `maestro backup info --json`: times ISO 8601 UTC, durations and ages in
        seconds (`*_s`), sizes in bytes (`*_bytes`)."""
        rpo = self.rpo
        return {
            "status": self.status,
            "reasons": [{"level": f.level, "message": f.message, "hint": f.hint} for f in self.findings],
            "checked_at": _iso(self.checked_at),
            "store": self.store_url,
            "readable": self.readable,
            "rpo": {"target_s": self.rpo_target.total_seconds(), "age_s": _seconds(rpo),
                    "ok": rpo is not None and rpo <= self.rpo_target},
            "latest": self.entry_dict(self.latest),
            "oldest": self.entry_dict(self.oldest),
            "restorable": self.restorable,
            "backups": len(self.backups),
            "recent": [self.entry_dict(e) for e in reversed(self.backups[-RECENT_BACKUPS:])],
            "monthly": [self.entry_dict(e) for e in self.archives],
            "running": [{"kind": a.kind, "id": a.ident, "started_at": _iso(a.started_at), "host": a.host, "pid": a.pid,
                         "heartbeat_at": _iso(a.heartbeat_at) if a.heartbeat_at else None} for a in self.running],
            "killed": [{"marker": key, "what": _marker_name(key)} for key in self.killed],
            "unfinished": [{"root": root, "objects": n} for root, n in self.unfinished.items()],
            "half_done_restores": [{"backup_id": j.backup_id, "stamp": j.stamp, "started_at": _iso(j.started_at),
                                    "host": j.host, "pid": j.pid, "summary": j.summary()} for j in self.half_done],
            # A default, not Dagster's state (never read here): `status` says what runs now.
            "automation": {"stopped_by_default": self.automation_stopped,
                           "turn_on": AUTOMATION_ON_COMMAND if self.automation_stopped else None,
                           "status": AUTOMATION_STATUS_COMMAND},
            "drill": _drill_dict(self.drill),
            "pitr": [{**window.as_dict(), "latest_age_s": _seconds(self.checked_at - window.latest_time)
                      if window.latest_time else None} for window in self.pitr],
            "encryption": self.encryption.as_dict(),
        }

    def entry_dict(self, entry: BackupEntry | None) -> dict[str, Any] | None:
        if entry is None:
            return None
        manifest = entry.manifest
        return {
            "id": entry.backup_id,
            "month": entry.month,
            "started_at": _iso(manifest.started_at) if manifest else None,
            "snapshot_at": _iso(manifest.snapshot_at) if manifest else None,
            "age_s": _seconds(self.age(entry)),
            "databases": [d.role for d in manifest.databases] if manifest else [],
            "dump_bytes": manifest.dump_bytes if manifest else None,
            "stored_bytes": entry.stored_bytes if manifest else None,
            "duration_s": round(manifest.duration_s, 3) if manifest else None,
            "verified": entry.verified,
            "verified_at": _iso(entry.verification.verified_at) if entry.verified else None,
            "bad": entry.bad is not None,
            "problem": entry.bad,
        }


def _seconds(delta: timedelta | None) -> float | None:
    return None if delta is None else round(delta.total_seconds(), 1)


def _drill_dict(drill: DrillRecord | None) -> dict[str, Any] | None:
    if drill is None:
        return None
    return {"started_at": _iso(drill.started_at), "ok": drill.ok, "source": drill.where, "backup_id": drill.backup_id,
            "rto_s": drill.rto_s, "rto_target_s": drill.rto_target_s, "rpo_s": drill.rpo_s,
            "rpo_target_s": drill.rpo_target_s, "problems": drill.problems}


def backup_info(store: ObjectStore, now: datetime | None = None, rpo_target: timedelta = RPO_TARGET,
                automation_stopped: bool = False) -> BackupInfo:
    """What the store says about the backups now (`now`: the clock they are judged by)."""
    now = now or utcnow()
    info = BackupInfo(now, store.url, rpo_target, automation_stopped)
    info.backups = _checked(store, list_backups(store))
    info.archives = _checked(store, list_backups(store, monthly=True))
    daily = [e for e in info.backups if e.verified]
    every = sorted(daily + [e for e in info.archives if e.verified], key=lambda e: e.manifest.snapshot_at)
    info.latest = daily[-1] if daily else None
    info.oldest = every[0] if every else None
    info.restorable = len(every)
    info.running = running_activities(store, now)
    info.killed = stale_activities(store, now)
    info.unfinished = _unfinished(store, info.running)
    info.half_done = interrupted_swaps(store)
    info.drill = _latest_drill(store)
    info.pitr = _recovery_windows(store)
    info.encryption = encryption_status(store)
    info.findings = _errors(info) + _warnings(info) + _pitr_findings(info.pitr) + _encryption_findings(info.encryption)
    return info


def _recovery_windows(store: ObjectStore) -> list:
    from maestro_pipelines.backup.pitr.window import recovery_window, servers_in_store

    return [recovery_window(store, system_id) for system_id in servers_in_store(store)]


def _pitr_findings(windows: list) -> list[Finding]:
    """The physical tier's: a WAL gap after the newest verified base backup is an error (no
    recovery past it), one before it a warning; WAL without a usable base backup too."""
    found = []
    for window in windows:
        server = f"server {window.system_id}"
        for gap in window.gaps:
            if gap.after_newest_verified:
                found.append(Finding(ERROR, f"WAL gap: {server} is missing {gap.describe()} after its newest verified "
                                     "base backup: no point-in-time recovery past the gap",
                                     "Take a base backup now (`maestro backup run --kind base`) and find why archiving "
                                     "missed them (the server's pg_stat_archiver and log)"))
            else:
                found.append(Finding(WARNING, f"WAL gap: {server} is missing {gap.describe()}: the recovery window "
                                     "starts after it", "Older base backups cannot be recovered past the gap"))
        if window.bases and not window.usable:
            newest = window.bases[-1].base_id
            found.append(Finding(ERROR, f"no usable base backup: none of the {len(window.bases)} base backups of "
                                 f"{server} can start a recovery (the newest, {newest}: {window.unusable.get(newest)})",
                                 "Check that the server's WAL reaches the store (archive_command), then run "
                                 "`maestro backup run --kind base`"))
        elif not window.bases and window.segments:
            found.append(Finding(WARNING, f"WAL without a base backup: {server} archives WAL but has no base backup",
                                 "Run `maestro backup run --kind base` (the nightly backup takes one)"))
    return found


def _checked(store: ObjectStore, entries: list[BackupEntry]) -> list[BackupEntry]:
    for entry in entries:
        if entry.verified:
            check_objects(store, entry)  # a damaged one is then BAD, not restorable
    return entries


def _unfinished(store: ObjectStore, running: list[Activity]) -> dict[str, int]:
    """Backup and archive folders without a manifest whose backup (archive) is not running.
    A backup writes its marker before its folder, so one that is not running never finishes."""
    busy = {(a.kind, a.ident) for a in running}
    found = {root: len(names) for root, names in incomplete_backups(store).items()
             if ("backup", root.rsplit("/", 1)[-1]) not in busy}
    for root in incomplete_archives(store):
        if ("archive", root.split("/")[1]) not in busy:
            found[root] = len(list(store.list(root + "/", with_metadata=False)))
    return found


def _latest_drill(store: ObjectStore) -> DrillRecord | None:
    records = list_drills(store, limit=1).records
    return records[-1] if records else None


def _errors(info: BackupInfo) -> list[Finding]:
    found = []
    if info.latest is None:
        unverified = [e for e in info.backups if not e.verified and not e.bad]
        hint = (f"Run `maestro backup verify {unverified[-1].backup_id}`, or `maestro backup run` for a new one"
                if unverified else "Run `maestro backup run` (it verifies the backup it takes)")
        what = (f"none of the {len(info.backups)} backups in the store is verified and intact"
                if info.backups else "the store holds no backup")
        found.append(Finding(ERROR, f"no restorable backup: {what}", hint))
    elif info.rpo > info.rpo_target:
        found.append(Finding(
            ERROR,
            f"RPO missed: the latest restorable backup, {info.latest.backup_id}, holds the data as of "
            f"{info.latest.manifest.snapshot_at:%Y-%m-%d %H:%M} UTC, {human_duration(info.rpo.total_seconds())} ago "
            f"(target {human_duration(info.rpo_target.total_seconds())})",
            "Run `maestro backup run` now, then find out why the nightly backup did not run or failed",
        ))
    newest = info.backups[-1] if info.backups else None
    if newest is not None and newest.bad:
        fallback = f"; `maestro restore` takes {info.latest.backup_id}" if info.latest else ""
        found.append(Finding(ERROR, f"latest backup BAD: {newest.backup_id}: {newest.bad}",
                             f"Run `maestro backup run` for a good one{fallback}"))
    for journal in info.half_done:
        found.append(Finding(ERROR, f"half-done restore: {journal.summary()}",
                             "Run `maestro restore status`, then `maestro restore finish` or `maestro restore undo`"))
    return found


def _warnings(info: BackupInfo) -> list[Finding]:
    found = []
    newest = info.backups[-1] if info.backups else None
    if newest is not None and not newest.verified and not newest.bad and info.latest is not None:
        found.append(Finding(WARNING, f"latest backup not verified: {newest.backup_id}",
                             f"Run `maestro backup verify {newest.backup_id}`"))
    margin = min(RPO_WARNING_MARGIN, info.rpo_target / 2)
    if info.rpo is not None and info.rpo_target - margin < info.rpo <= info.rpo_target:
        left = human_duration((info.rpo_target - info.rpo).total_seconds())
        found.append(Finding(WARNING, f"RPO close to its target: {left} left before it is missed",
                             "The next backup is due: run `maestro backup run` if the nightly one did not"))
    for key in info.killed:
        found.append(Finding(WARNING, f"killed: {_marker_name(key)} stopped without cleaning up (its process is gone)",
                             "`maestro backup retention` removes what it left"))
    for root, objects in info.unfinished.items():
        found.append(Finding(WARNING, f"unfinished: {root} has {objects} objects and no manifest (killed or failed)",
                             "It cannot be restored; `maestro backup retention` removes it"))
    older_bad = [e.backup_id for e in info.backups[:-1] + info.archives if e.bad]
    if older_bad:
        found.append(Finding(WARNING, f"BAD backups: {len(older_bad)} older backups cannot be restored "
                             f"({', '.join(older_bad[:3])}{', ...' if len(older_bad) > 3 else ''})",
                             "`maestro backup list` says why"))
    if info.drill is not None and not info.drill.ok:
        problem = info.drill.problems[0] if info.drill.problems else "no detail recorded"
        found.append(Finding(WARNING, f"latest drill failed: {info.drill.started_at:%Y-%m-%d %H:%M} UTC: {problem}",
                             "Run `maestro drill` to see it again"))
    return found


def _encryption_findings(status: EncryptionStatus) -> list[Finding]:
    found = []
    if status.warning:
        # "unencrypted" first: the status line shows what comes before the first colon.
        warning, _, fix = status.warning.partition("; set ")
        found.append(Finding(WARNING, f"unencrypted: {warning}", f"Set {fix}" if fix else ""))
    for kek, records in status.unconfigured.items():
        found.append(Finding(WARNING, f"backups under a key not configured: {counted(records, 'record')} "
                             f"{'is' if records == 1 else 'are'} encrypted with backup key {kek}, which is not "
                             "configured, so those backups cannot be read",
                             needs_key_hint(kek)))
    return found


def _marker_name(key: str) -> str:
    """`backup 20261201T020000Z-1a2b3c` from `activity/backup-20261201T020000Z-1a2b3c.json`."""
    kind, _, ident = key.rsplit("/", 1)[-1].removesuffix(".json").partition("-")
    return f"{kind} {ident}" if ident else key


def store_unreadable(store_url: str, problem: str, now: datetime | None = None,
                     rpo_target: timedelta = RPO_TARGET, automation_stopped: bool = False) -> BackupInfo:
    """The info when the store cannot be opened or read: an error, nothing is known."""
    info = BackupInfo(now or utcnow(), store_url, rpo_target, automation_stopped, readable=False)
    info.findings = [Finding(ERROR, f"store unreadable: {problem}",
                             "Check MAESTRO_STORE_URL and the store's credentials; nothing can be said about the backups")]
    return info
