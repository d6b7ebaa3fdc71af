"""The recovery window and WAL gaps on synthetic histories in a real local store, as
`maestro backup info` (a separate process) shows them to a user: the window per server, a
gap after the newest verified base backup as an error (no recovery past it), one before it
as a warning; `backup retention` then expires the WAL no kept base backup needs."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from maestro_pipelines.backup.manifest import utcnow
from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.window import recovery_window
from maestro_pipelines.storage import open_store
from tests.pitr.base_helpers import SYSTEM_ID, fake_record, put_fake_base, put_fake_wal, segments
from tests.test_cli import run_maestro


@pytest.fixture
def store(tmp_path):
    (tmp_path / "store").mkdir()
    return open_store((tmp_path / "store").as_uri())


def _env(store, tmp_path) -> dict[str, str]:
    return {"MAESTRO_STORE_URL": store.url, "MAESTRO_HOME": str(tmp_path / "home")}


def _history(store, missing: list[int]):
    """Base backups A (WAL 2) and B (WAL 6), segments 1 to 12 archived but `missing`."""
    now = utcnow()
    a = put_fake_base(store, fake_record(f"{now - timedelta(days=2):%Y%m%dT%H%M%SZ}-aaaaaa", segments(2, 2)[0],
                                         segments(2, 2)[0], now - timedelta(days=2)))
    b = put_fake_base(store, fake_record(f"{now - timedelta(days=1):%Y%m%dT%H%M%SZ}-bbbbbb", segments(6, 6)[0],
                                         segments(6, 6)[0], now - timedelta(days=1), "incremental", a.base_id))
    put_fake_wal(store, [n for n in segments(1, 12) if layout.segment_number(n) not in missing])
    return a, b


def test_info_shows_the_window_and_a_gap_after_the_newest_verified_base_backup_as_an_error(store, tmp_path):
    a, b = _history(store, missing=[9, 10])
    window = recovery_window(store, SYSTEM_ID)
    assert window.usable == [a.base_id, b.base_id]
    assert window.earliest_lsn == a.stop_lsn and window.latest_wal == segments(8, 8)[0]
    assert [(g.first, g.last, g.after_newest_verified) for g in window.gaps] == \
        [(segments(9, 9)[0], segments(10, 10)[0], True)]

    shown = run_maestro("backup", "info", "--json", env=_env(store, tmp_path))
    report = json.loads(shown.stdout)
    assert shown.returncode == 2 and report["status"] == "error"
    gap = next(r for r in report["reasons"] if r["message"].startswith("WAL gap"))
    assert gap["level"] == "error" and "no point-in-time recovery past the gap" in gap["message"]
    server = report["pitr"][0]
    assert server["system_id"] == SYSTEM_ID and server["latest"]["wal"] == segments(8, 8)[0]
    assert server["gaps"] == [{"first": segments(9, 9)[0], "last": segments(10, 10)[0], "segments": 2,
                               "after_newest_verified": True}]
    text = run_maestro("backup", "info", env=_env(store, tmp_path)).stdout
    assert f"server {SYSTEM_ID}: {a.finished_at:%Y-%m-%d %H:%M:%S} to" in text
    assert f"gap: {segments(9, 9)[0]} to {segments(10, 10)[0]} (2 segments)" in text


def test_a_gap_before_the_newest_base_backup_narrows_the_window_then_retention_expires_it(store, tmp_path):
    a, b = _history(store, missing=[4])
    window = recovery_window(store, SYSTEM_ID)
    # A can recover only to before the gap: the window starts at B, and runs to segment 12.
    assert window.earliest_lsn == b.stop_lsn and window.latest_wal == segments(12, 12)[0]
    assert [g.after_newest_verified for g in window.gaps] == [False]
    report = json.loads(run_maestro("backup", "info", "--json", env=_env(store, tmp_path)).stdout)
    assert [r["level"] for r in report["reasons"] if r["message"].startswith("WAL gap")] == ["warning"]

    # B is incremental on A: both are kept, and the WAL from A's start on.
    done = run_maestro("backup", "retention", env=_env(store, tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"server {SYSTEM_ID}: kept 2 base backups, deleted 0; deleted 1 WAL files" in done.stdout
    left = [layout.wal_name_of_key(i.key) for i in store.list(layout.wal_prefix(SYSTEM_ID), with_metadata=False)]
    assert left == [n for n in segments(2, 12) if layout.segment_number(n) != 4]


def test_monthly_archive_keeps_a_base_backup_chain_and_the_wal_that_makes_it_consistent(store, tmp_path):
    from maestro_pipelines.backup.archive import archive_base_backups
    from maestro_pipelines.backup.retention import RetentionPolicy, apply_retention

    a, b = _history(store, missing=[])
    month = f"{utcnow():%Y-%m}"
    assert archive_base_backups(store, month) == [(SYSTEM_ID, b.base_id, True)]
    archived = recovery_window(store, SYSTEM_ID, month)
    # A is there as B's parent (pg_combinebackup needs it), its own WAL is not: B is the restore point.
    assert archived.usable == [b.base_id] and a.base_id in archived.unusable
    assert archived.earliest_lsn == b.stop_lsn and archived.latest_wal == b.stop_wal
    wal = [layout.wal_name_of_key(i.key) for i in store.list(layout.wal_prefix(SYSTEM_ID, month), with_metadata=False)]
    assert wal == segments(6, 6)  # B's start to stop: what makes the combined chain consistent
    assert archive_base_backups(store, month) == [(SYSTEM_ID, b.base_id, False)]
    plan = apply_retention(store, RetentionPolicy(monthly=0))
    assert plan.delete_pitr_months == [month]
    assert not list(store.list(f"monthly/{month}/", with_metadata=False))
