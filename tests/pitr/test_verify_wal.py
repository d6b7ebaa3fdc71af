"""`maestro backup verify --kind wal`: every archived segment read back as a recovery would
read it. A segment whose bytes rotted in the store, or that another segment's object replaced,
is named in one line (exit 1) before anyone needs it, and verify changes nothing in the store."""

from __future__ import annotations

import json

import pytest

from maestro_pipelines.backup.pitr import layout
from tests.pitr.conftest import archived_names, maestro, switch_wal, system_id, wait_for
from tests.test_cli import run_maestro

pytestmark = pytest.mark.xdist_group("pitr-verify-wal")  # its steps share one archiving server


def _stored_bytes(home, key: str) -> bytes:
    return (home / "store" / key).read_bytes()


def test_verify_wal_reads_every_segment_back_and_names_a_damaged_or_replaced_one(archiving_home):
    conninfo, store = archiving_home.socket_url, archiving_home.store
    sysid = system_id(conninfo)
    first, second = switch_wal(conninfo), None
    second = switch_wal(conninfo)
    wait_for(f"{first} and {second} in the store", lambda: {first, second} <= archived_names(store, sysid))

    (report,) = json.loads(maestro("backup", "verify", "--kind", "wal", "--json", env=archiving_home.env))
    assert report["ok"] is True and report["system_id"] == sysid and report["segments"] >= 2, report
    assert report["first"] <= first < second <= report["last"]

    # Bit rot in the middle of the stored object.
    key = layout.wal_key(sysid, first)
    path = archiving_home.home / "store" / key
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    done = run_maestro("backup", "verify", "--kind", "wal", env=archiving_home.env)
    failed = [line for line in done.stderr.splitlines() if "FAILED" in line]
    assert done.returncode == 1 and len(failed) == 1 and first in failed[0] and "damaged" in failed[0], done.stderr
    assert _stored_bytes(archiving_home.home, key) == bytes(damaged)  # verify replaced nothing

    # Another segment's object (its own sha256s intact) under the first one's name.
    store.delete(key)
    store.copy(layout.wal_key(sysid, second), key)
    done = run_maestro("backup", "verify", "--kind", "wal", "--json", env=archiving_home.env)
    (report,) = json.loads(done.stdout)
    assert done.returncode == 1 and report["ok"] is False and len(report["problems"]) == 1, report
    assert first in report["problems"][0] and "starts at WAL position" in report["problems"][0], report
