"""What `maestro backup list` calls good must still be good, and `latest` never picks a
backup whose objects changed after it was verified: the installed `maestro` in subprocesses,
on a local folder store and on S3 (moto over real HTTP).

Five verified backups; then the four newest are damaged behind Maestro's back, one way each:
a byte flipped, the dump truncated, the dump deleted, the dump swapped for an older backup's.
`restore --backup latest`, `restore --before NOW` and `drill` each take the oldest, the only
intact one, and say which they skipped and why. A head per object (size, recorded sha256; on
the local store also the file's mtime) sees the last three everywhere, and the flip on the
local store (written in place: the mtime moved). On S3 a flip re-uploaded with the old metadata keeps size and recorded sha256: no head can
see it, so there `maestro backup verify` finds it and records the failure; from then on it
is listed as BAD and skipped like the others."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from maestro_pipelines.backup import list_backups
from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.migrate import upgrade
from tests.backup.conftest import read_raw
from tests.stores.conftest import AWS, PREFIX, LocalCase, S3Case

from .conftest import create_database, drop_database
from .test_cli import run_maestro


@pytest.fixture
def platform(pg18):
    """A migrated platform database on the embedded PostgreSQL 18; dropped afterwards with the
    scratch databases restores and drills made next to it."""
    name = create_database(pg18, "dmg")
    upgrade(pg18.location(name))
    yield name
    with engine_for(pg18.admin_url).connect() as conn:
        leftovers = conn.execute(text("SELECT datname FROM pg_database WHERE starts_with(datname, :p)"),
                                 {"p": f"{name}_"}).scalars().all()
    for database in leftovers:
        drop_database(pg18, database)
    drop_database(pg18, name)


@pytest.fixture(params=["local", "s3"])
def store_case(request, tmp_path):
    """A store and the environment that points `maestro` at it."""
    if request.param == "local":
        case = LocalCase(tmp_path / "store")
        env = {"MAESTRO_STORE_URL": case.root.as_uri()}
    else:
        case = S3Case(request.getfixturevalue("moto_endpoint"))
        env = {"MAESTRO_STORE_URL": f"s3://{case.bucket}/{PREFIX}", "AWS_ENDPOINT_URL": case.endpoint,
               "AWS_DEFAULT_REGION": AWS["region_name"], "AWS_ACCESS_KEY_ID": AWS["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": AWS["aws_secret_access_key"]}
    try:
        yield case, env
    finally:
        case.cleanup()


def flip(case, key: str) -> None:
    """One byte changed. Local: in place (same file; the store's record stays). S3: the
    object re-uploaded with its old metadata (size and recorded sha256 unchanged)."""
    data = bytearray(read_raw(case, key))
    data[len(data) // 2] ^= 0x01
    if isinstance(case, LocalCase):
        with open(case.root.joinpath(*key.split("/")), "r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes([data[len(data) // 2]]))
        return
    name = f"{PREFIX}/{key}"
    metadata = case.client.head_object(Bucket=case.bucket, Key=name)["Metadata"]
    case.client.put_object(Bucket=case.bucket, Key=name, Body=bytes(data), Metadata=metadata)


def truncate(case, key: str) -> None:
    """The last 64 bytes gone (local: in place; S3: re-uploaded with the old metadata)."""
    data = read_raw(case, key)[:-64]
    if isinstance(case, LocalCase):
        os.truncate(case.root.joinpath(*key.split("/")), len(data))
        return
    name = f"{PREFIX}/{key}"
    metadata = case.client.head_object(Bucket=case.bucket, Key=name)["Metadata"]
    case.client.put_object(Bucket=case.bucket, Key=name, Body=data, Metadata=metadata)


def run_ok(*args: str, env: dict[str, str]):
    result = run_maestro(*args, env=env)
    assert result.returncode == 0, f"maestro {' '.join(args)} failed:\n{result.stderr}"
    return result


def test_latest_and_the_drill_skip_backups_damaged_after_verification(pg18, platform, store_case, tmp_path):
    case, store_env = store_case
    env = {"MAESTRO_DATABASE_URL": pg18.libpq_url(platform), "MAESTRO_HOME": str(tmp_path / "home"), **store_env}
    ids = []
    for n in range(5):
        with engine_for(pg18.location(platform).platform_url).connect() as conn:
            conn.execute(text("INSERT INTO tenants (name, display_name) VALUES (:n, :n)"), {"n": f"tenant{n}"})
            conn.commit()
        taken = run_ok("backup", "run", "--json", env=env)
        ids.append(json.loads(taken.stdout)["id"])
        # No backup key: on S3 every run says its backups are readable by whoever reads the bucket.
        assert ("warning: backups in s3://" in taken.stderr) == isinstance(case, S3Case), taken.stderr
    good, swapped, deleted, truncated, flipped = ids

    def dump(backup_id: str) -> str:
        return f"backups/{backup_id}/platform.dump.zst"

    flip(case, dump(flipped))
    truncate(case, dump(truncated))
    case.store.delete(dump(deleted))
    case.store.copy(dump(good), dump(swapped))  # another backup's dump, with its own record

    listed = {e["id"]: e for e in json.loads(run_ok("backup", "list", "--json", env=env).stdout)}
    assert [listed[i]["bad"] for i in (swapped, deleted, truncated)] == [True, True, True]
    assert listed[good]["verified"] and not listed[good]["bad"]
    if isinstance(case, S3Case):
        # Same size, same recorded sha256: a head cannot see it; a full verification does.
        assert listed[flipped]["verified"] and not listed[flipped]["bad"]
        failed = run_maestro("backup", "verify", flipped, env=env)
        assert failed.returncode == 1 and dump(flipped) in failed.stderr
    table = run_ok("backup", "list", env=env).stdout
    rows = {i: next(line for line in table.splitlines() if i in line) for i in ids}
    assert [("BAD" in rows[i]) for i in ids] == [False, True, True, True, True], table
    assert "yes" in rows[good]
    # `backup info` puts it in one line: the latest backup is BAD, the restore falls back to `good`.
    info = run_maestro("backup", "info", "--json", env=env)
    assert info.returncode == 2, info.stderr
    report = json.loads(info.stdout)
    assert report["status"] == "error" and report["latest"]["id"] == good and report["restorable"] == 1
    assert [r["message"].split(":")[0] for r in report["reasons"]] == ["latest backup BAD", "BAD backups"]
    assert f"`maestro restore` takes {good}" in report["reasons"][0]["hint"]
    assert report["reasons"][1]["message"].startswith("BAD backups: 3 older backups cannot be restored")

    restored = run_ok("restore", "--backup", "latest", "--json", env=env)
    assert json.loads(restored.stdout)["backup_id"] == good
    before_now = run_ok("restore", "--before", datetime.now(timezone.utc).isoformat(), "--json", env=env)
    assert json.loads(before_now.stdout)["backup_id"] == good
    drilled = run_ok("drill", "--json", env=env)
    assert json.loads(drilled.stdout)["backup_id"] == good
    flipped_why = "verification failed" if isinstance(case, S3Case) else "written to in place"
    for output in (restored.stderr, before_now.stderr, drilled.stderr):
        skipped = [line for line in output.splitlines() if "skipping backup" in line]
        assert len(skipped) == 4, output
        for backup_id, why in ((flipped, flipped_why), (truncated, "bytes, the manifest says"),
                               (deleted, "is missing"), (swapped, "replaced")):
            [line] = [s for s in skipped if backup_id in s]
            assert dump(backup_id) in line and why in line, line
    assert len(list_backups(case.store)) == 5  # nothing was deleted: only skipped
