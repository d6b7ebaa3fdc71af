"""`maestro backup keygen`, `maestro backup rekey` and `backup info`'s key lines as an operator
runs them: the installed entry point in a subprocess, a local folder store holding encrypted
backups written the way the backup library writes them (tests/backup/sealed_records.py).

The crash test kills `maestro backup rekey` with SIGKILL at 11 points of one rotation from K1
to K2: each run is told (MAESTRO_TEST_REKEY_PAUSE) to stop at one checkpoint of the Nth record
it rewrites (rewrapped in memory, inside the store's write, or written) and say so on stderr,
and is killed as soon as it has said it. After every kill, every backup still opens with K1
or K2, and exactly the records written so far are under K2. Then a rekey run to the end
leaves every backup under K2, readable with K2 alone."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess

import pytest

from maestro_pipelines.backup.rekey import key_census
from maestro_pipelines.crypto import generate_key
from tests.backup.sealed_records import DRILL_FIELDS, check_backup, keyring, write_backup
from tests.stores.conftest import LocalCase

from .test_cli import MAESTRO, run_maestro

K1, K2 = generate_key(), generate_key()
SYSTEM = "7312345678901234567"
RECORDS = sorted(
    [f"backups/2026120{n}T020000Z-00000{n}/{name}" for n in range(1, 4) for name in ("manifest.json", "verified.json")]
    + [f"monthly/2026-11/20261130T020000Z-00000{n}/manifest.json" for n in range(1, 3)]
    + [f"pitr/{SYSTEM}/base/20261201T021000Z-00000{n}/base.json" for n in range(1, 3)]
    + [f"pitr/{SYSTEM}/keys/20261201T021500Z-000001.json", "drills/20261201T030000000000Z-000001.json"]
)
"""Twelve records under K1 where records live (dump, archive, base backup, WAL key, drill)."""
KILLS = [("prepared", 1), ("written", 1), ("writing", 1), ("written", 2), ("prepared", 1), ("written", 1),
         ("writing", 2), ("written", 1), ("prepared", 3), ("writing", 1), ("written", 1)]
"""Where each run is killed: at the Nth record it rewrites, rewrapped but not put (`prepared`),
inside the put (`writing`: the store's temporary file started), or put (`written`)."""


def kek_id(key: str) -> str:
    return keyring(key).current.id


def written_by(stage: str, n: int) -> int:
    """Records a run killed at (stage, n) has rewritten."""
    return n if stage == "written" else n - 1


@pytest.fixture
def rotated(tmp_path):
    """The store (records under K1, one under K2 already, a plaintext backup) and the
    environment of the rotation: K2 new, K1 old."""
    case = LocalCase(tmp_path / "store")
    store = case.store
    store.keyring = keyring(K1)
    for key in RECORDS:
        write_backup(store, key, DRILL_FIELDS if key.startswith("drills/") else None, digest="verified" not in key)
    store.keyring = keyring(K2)
    write_backup(store, "backups/20261204T020000Z-000004/manifest.json")
    store.keyring = None
    write_backup(store, "backups/20261130T020000Z-000000/manifest.json")
    env = {"MAESTRO_STORE_URL": case.root.as_uri(), "MAESTRO_HOME": str(tmp_path / "home"),
           "MAESTRO_BACKUP_KEY": K2, "MAESTRO_BACKUP_OLD_KEYS": K1}
    return store, env


def record_keys(store) -> list[str]:
    return sorted(i.key for i in store.list("") if i.key.endswith(".json"))


def keks(store) -> dict[str, str | None]:
    """KEK id of every backup, each opened (record, MAC, every chunk of its object) with K1 or K2."""
    return {key: check_backup(store, key, keyring(K2, K1)) for key in record_keys(store)}


def killed_at(env: dict[str, str], stage: str, n: int) -> str:
    """Run `maestro backup rekey` until it reaches (stage, n), SIGKILL it there: the record it was on."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAESTRO_", "MLFLOW_"))}
    child = subprocess.Popen([MAESTRO, "backup", "rekey"], env={**clean, **env, "MAESTRO_TEST_REKEY_PAUSE": f"{stage}:{n}"},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in child.stderr:  # the pause line, or the end of stderr when the run ended first
            said.append(line)
            match = re.fullmatch(rf"rekey paused {stage} {n}: (\S+)\n", line)
            if match:
                os.kill(child.pid, signal.SIGKILL)
                assert child.wait(timeout=60) == -signal.SIGKILL
                return match.group(1)
        raise AssertionError(f"rekey never reached {stage} {n}: exit {child.wait(timeout=60)}, {''.join(said)}")
    finally:
        child.kill()
        for stream in (child.stdin, child.stdout, child.stderr):
            stream.close()


def test_rekey_killed_at_eleven_points_leaves_every_backup_readable_by_the_old_or_the_new_key(rotated):
    store, env = rotated
    listed = record_keys(store)
    assert key_census(store).by_kek == {kek_id(K1): len(RECORDS), kek_id(K2): 1}
    under_k2 = 1
    for stage, n in KILLS:
        paused_on = killed_at(env, stage, n)
        under_k2 += written_by(stage, n)
        state = keks(store)                                  # raises if any backup opens with neither
        assert set(state.values()) == {kek_id(K1), kek_id(K2), None}
        assert list(state.values()).count(kek_id(K2)) == under_k2, (stage, n, state)
        assert state[paused_on] == kek_id(K2 if stage == "written" else K1), (stage, n, paused_on)
        assert record_keys(store) == listed                  # a killed write leaves nothing visible
    assert under_k2 < len(RECORDS) + 1                       # the killed runs did not finish it

    done = run_maestro("backup", "rekey", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"under backup key {kek_id(K2)}: {len(RECORDS) + 1 - under_k2} records rewrapped, {under_k2} already under it, " \
           "1 not encrypted (skipped)" in done.stdout
    again = run_maestro("backup", "rekey", env=env)
    assert f": 0 records rewrapped, {len(RECORDS) + 1} already under it" in again.stdout, again.stdout
    final = {key: check_backup(store, key, keyring(K2)) for key in record_keys(store)}   # K2 alone
    assert list(final.values()).count(kek_id(K2)) == len(RECORDS) + 1
    info = run_maestro("backup", "info", env=env).stdout
    assert f"old key {kek_id(K1)} can be retired: no record needs it" in " ".join(info.split()), info


def test_info_lines_and_a_rekey_that_needs_a_key_not_configured(tmp_path):
    """Drill records (the only records `backup info` takes as they are): K1 old and needed,
    K2 current, K3 never configured (lost), K4 old and needed by nothing."""
    k3, k4 = generate_key(), generate_key()
    case = LocalCase(tmp_path / "store")
    store = case.store
    for n, key in enumerate([K1, K1, K1, K2, K2, k3]):
        store.keyring = keyring(key)
        write_backup(store, f"drills/20261201T03000{n}000000Z-00000{n}.json", DRILL_FIELDS)
    env = {"MAESTRO_STORE_URL": case.root.as_uri(), "MAESTRO_HOME": str(tmp_path / "home"),
           "MAESTRO_BACKUP_KEY": K2, "MAESTRO_BACKUP_OLD_KEYS": f"{K1},{k4}"}
    shown = run_maestro("backup", "info", env=env)
    text = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert f"encryption new backups are encrypted under backup key {kek_id(K2)} (MAESTRO_BACKUP_KEY)" in text
    assert f"{kek_id(K2)}: 2 records" in text
    assert f"old key {kek_id(K1)} is still needed by 3 records: run `maestro backup rekey`" in text
    assert f"old key {kek_id(k4)} can be retired: no record needs it" in text
    assert f"{kek_id(k3)}: 1 record, NOT CONFIGURED: those backups cannot be read" in text
    assert any(f"warning: backups under a key not configured: 1 record is encrypted with backup key {kek_id(k3)}" in line
               for line in text), text
    for key in (K1, K2, k3, k4):
        assert key not in shown.stdout + shown.stderr

    rekey = run_maestro("backup", "rekey", env=env)
    assert rekey.returncode == 1, rekey.stdout + rekey.stderr
    said = " ".join(rekey.stdout.split())
    assert "3 records rewrapped, 2 already under it" in said
    assert (f"still need backup key {kek_id(k3)}, which is not configured: 1 record "
            f"(drills/20261201T030005000000Z-000005.json). Add backup key {kek_id(k3)} to MAESTRO_BACKUP_OLD_KEYS") in said
    assert "docs/runbooks/lost-or-leaked-backup-key.md" in said


def test_keygen_prints_only_a_new_key_on_stdout():
    first, second = run_maestro("backup", "keygen"), run_maestro("backup", "keygen")
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    key = first.stdout.removesuffix("\n")
    assert "\n" not in key and len(base64.b64decode(key, validate=True)) == 32 and second.stdout != first.stdout
    assert f"id {kek_id(key)}" in first.stderr and "never in the backup store" in first.stderr
    assert key not in first.stderr
