"""Serving WAL from the store to a temporary server's restore_command.

The server runs restore_command as its own OS user (`embedded_postgres` when Maestro runs as
root), which cannot run Maestro from a virtualenv in root's home. So restore_command is a
tiny shell script that asks this process for a file through a folder the server user owns:

    restore_command = 'sh <feed>/restore.sh %f %p'
    restore.sh: touch <feed>/<f>.want; wait until <feed>/<f> (mv to %p, exit 0) or
                <feed>/<f>.none (exit 1) appears

and the `WalFeeder` thread here answers each request with `wal.fetch_wal` (the store's
sha256, zstd's checksum, the segment's own header checked against its name and server).
It also puts the next few segments in the folder ahead of time, which the script takes
without asking: replay rarely waits for the store or for a round trip. A segment that is
damaged, or missing while later ones are in the store (a gap), is no end of the archive:
the feeder records it as `problem`, answers `none`, and the recovery is abandoned with that
line (PostgreSQL would otherwise take the hole for the end of the archive and promote there).
Sealed WAL is opened with its key record's data key as it is fetched; a segment that fails
authentication is damaged like any other, and a backup key that is not configured is the
recovery's one line. Recovering from a base backup taken while the WAL was sealed, a
plaintext segment from its start on is refused (`sealed_from`): nobody with the key wrote it.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.layout import WalError
from maestro_pipelines.backup.pitr.wal import fetch_wal
from maestro_pipelines.crypto.keys import BackupKeyError
from maestro_pipelines.storage import ObjectStore

PREFETCH = 4
"""Segments fetched ahead of the one replay asked for (4 x 16 MiB of local disk at most)."""
POLL_S = 0.02
SCRIPT_WAIT_S = 600
"""restore.sh gives up after this long without an answer (this process died)."""

RESTORE_SCRIPT = """#!/bin/sh
# restore_command of a temporary recovery server: asks the Maestro process for WAL file $1.
feed="$(dirname "$0")"
# Fetched ahead already: no request, no wait.
if [ -f "$feed/$1" ]; then mv -f "$feed/$1" "$2" && exit 0; exit 1; fi
: > "$feed/$1.want" || exit 1
waited=0
while [ "$waited" -lt {limit} ]; do
  if [ -f "$feed/$1" ]; then mv -f "$feed/$1" "$2" && exit 0; exit 1; fi
  if [ -f "$feed/$1.none" ]; then rm -f "$feed/$1.none"; exit 1; fi
  [ -d "$feed" ] || exit 1
  sleep 0.05
  waited=$((waited + 1))
done
exit 1
"""


def write_restore_script(feed: Path) -> Path:
    script = feed / "restore.sh"
    script.write_text(RESTORE_SCRIPT.replace("{limit}", str(int(SCRIPT_WAIT_S / 0.05))))
    script.chmod(0o755)
    return script


def check_segment(data_head: bytes, name: str, system_id: str) -> None:
    """A segment's first page names the server and the position its file name says: a
    segment of another server or another place (an object replaced in the store) is refused."""
    sysid, timeline, seg_size = layout.segment_header(data_head)
    if str(sysid) != str(system_id):
        raise WalError(f"WAL segment {name} in the store belongs to server {sysid}, not {system_id} (replaced)",
                       "Nothing was restored; recover to a point before it, or put the right segment back")
    page_address = struct.unpack_from("<Q", data_head, 8)[0]
    if timeline != layout.segment_timeline(name) or page_address != layout.segment_start(name, seg_size):
        raise WalError(f"WAL segment {name} in the store holds another position's WAL "
                       f"({layout.format_lsn(page_address)} on timeline {timeline}: replaced)",
                       "Nothing was restored; recover to a point before it, or put the right segment back")


def fetch_segment(store: ObjectStore, system_id: str, name: str, dest: Path, plain_ok: bool = True) -> bool:
    """One WAL file from the store into `dest` (wal.fetch_wal: the store's sha256, each sealed
    chunk, zstd's, the digest recorded at push), and a segment's header against its name and
    server; False when the store has none."""
    found = fetch_wal(store, system_id, name, dest, plain_ok)
    if found and layout.SEGMENT.match(name):
        with open(dest, "rb") as segment:
            check_segment(segment.read(64), name, system_id)
    return bool(found)


def stored_segments(store: ObjectStore, system_id: str) -> list[str]:
    """Segment names (no history or partial files) in the store for this server, sorted."""
    names = (layout.wal_name_of_key(info.key) for info in store.list(layout.wal_prefix(system_id), with_metadata=False))
    return sorted(name for name in names if name and layout.SEGMENT.match(name))


class WalFeeder:
    """Answers restore.sh's requests in `feed` from the store (a thread of this process)."""

    def __init__(self, store: ObjectStore, system_id: str, feed: Path, owner: tuple[int, int] | None,
                 log: Callable[[str], None] | None = None, sealed_from: str | None = None):
        self.store, self.system_id, self.feed, self.owner = store, system_id, feed, owner
        self.sealed_from = sealed_from
        """A segment name: from it on (on every timeline) WAL must be sealed; None: plaintext is read too."""
        self.log = log or (lambda message: None)
        self.problem: WalError | None = None
        self.last_served: str | None = None
        self.requests = 0
        self.served_bytes = 0
        self._stored = stored_segments(store, system_id)
        self._ahead: set[str] = set()
        """Segments fetched ahead, visible in the folder, not yet taken by the script."""
        self._absent: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-feeder", daemon=True)
        (feed / "tmp").mkdir(exist_ok=True)

    @property
    def archive_end(self) -> str | None:
        """The newest segment in the store (when the recovery started)."""
        return self._stored[-1] if self._stored else None

    def start(self) -> "WalFeeder":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            wanted = sorted(p.name[: -len(".want")] for p in self.feed.glob("*.want"))
            for name in wanted:
                (self.feed / f"{name}.want").unlink(missing_ok=True)
                self.requests += 1
                self._answer(name)
            taken = sorted(name for name in self._ahead if not (self.feed / name).exists())
            if taken:  # the script took segments fetched ahead: fetch further ahead
                self._ahead.difference_update(taken)
                self.requests += len(taken)
                self.last_served = taken[-1]
                if self.problem is None:
                    self._prefetch(taken[-1])
            if not wanted and not taken:
                time.sleep(POLL_S)

    def _answer(self, name: str) -> None:
        if self.problem is not None:
            return self._none(name)
        if name in self._ahead and (self.feed / name).exists():
            return  # put there ahead after the script looked: it takes it on its next look
        self._ahead.discard(name)
        try:
            found = self._place(name)
            if not found and layout.SEGMENT.match(name):
                self._check_gap(name)
        except WalError as exc:  # the segment's own line, and what it means for this restore
            self.problem = WalError(exc.problem, "Nothing was restored; recover to a point before it "
                                                 "(--to-time, --to-lsn), or put a good copy of it back in the store")
            found = False
        except BackupKeyError as exc:  # its key record's backup key is not configured: said as the key says it
            hint = exc.hint or "Configure the backup key"
            self.problem = WalError(exc.problem, f"Nothing was restored; {hint[:1].lower()}{hint[1:]}")
            found = False
        except Exception as exc:  # a store outage: the recovery cannot go on, and says why
            self.problem = WalError(f"WAL file {name} could not be read from the store at {self.store.url}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                    "Nothing was restored; run the restore again when the store answers")
            found = False
        if not found:
            return self._none(name)
        self.last_served = name if layout.SEGMENT.match(name) else self.last_served
        os.replace(self.feed / "tmp" / name, self.feed / name)
        if layout.SEGMENT.match(name):
            self._prefetch(name)

    def _none(self, name: str) -> None:
        (self.feed / f"{name}.none").touch()
        self._chown(self.feed / f"{name}.none")

    def _place(self, name: str) -> bool:
        """Fetch `name` into feed/tmp (not yet visible to the script)."""
        if name in self._absent:
            return False
        dest = self.feed / "tmp" / name
        if not fetch_segment(self.store, self.system_id, name, dest, self._plain_ok(name)):
            self._absent.add(name)
            dest.unlink(missing_ok=True)
            return False
        self.served_bytes += dest.stat().st_size
        self._chown(dest)
        return True

    def _plain_ok(self, name: str) -> bool:
        """Plaintext WAL is read before `sealed_from`; history files always (an old timeline's
        may predate the key; a forged one can only lead to segments, which are checked)."""
        if self.sealed_from is None or layout.HISTORY.match(name):
            return True
        return name[8:24] < self.sealed_from[8:24]

    def _prefetch(self, name: str) -> None:
        """The next segments into the folder, while replay works on this one (to the archive's end)."""
        upcoming = name
        for _ in range(PREFETCH):
            upcoming = layout.next_segment(upcoming)
            if upcoming in self._ahead or (self.feed / upcoming).exists():
                continue
            if upcoming not in self._stored or self._stop.is_set():
                return
            try:
                if not self._place(upcoming):
                    return
            except Exception:  # damaged, locked, or the store failing: said when replay asks for it
                return
            os.replace(self.feed / "tmp" / upcoming, self.feed / upcoming)
            self._ahead.add(upcoming)

    def _check_gap(self, name: str) -> None:
        """A segment missing while later ones of its timeline are stored is a hole, not the end."""
        self._stored = stored_segments(self.store, self.system_id)
        later = [s for s in self._stored if s[:8] == name[:8] and s > name]
        if later:
            raise WalError(
                f"WAL segment {name} is missing from the store at {self.store.url}, and later ones are there "
                f"(from {later[0]}): recovery cannot get past {layout.format_lsn(layout.segment_start(name))}",
                "Nothing was restored; recover to a point before it, or take a new base backup after the gap "
                "(maestro backup run --kind base)",
            )

    def _chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner)

    def clear(self) -> None:
        shutil.rmtree(self.feed / "tmp", ignore_errors=True)
