"""The physical tier with a backup key: base backups (a full one and an incremental on it, each
under its own data key) and the WAL archived sealed, from an embedded PostgreSQL 18 of the
test's own. Nothing of the marker row is readable in the store; a recovery with the key gives
it back; without the key it is one line; each object damaged or swapped is detected by verify
and never used by a recovery.

One module-scoped history (a server, two base backups, the WAL: about 10 s) serves every test;
each test that damages an object puts it back (`damaged`) before the next one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import zstandard

from maestro_pipelines.backup.pitr import layout
from maestro_pipelines.backup.pitr.base import list_base_backups, take_base_backup, verify_base_backup
from maestro_pipelines.backup.pitr.recover import TIME, RecoveryTarget, recovered_server
from maestro_pipelines.backup.pitr.wal import WalConflict, fetch_wal, push_wal
from maestro_pipelines.backup.pitr.window import recovery_window, verify_wal
from maestro_pipelines.crypto import generate_key, keyring_from_values
from maestro_pipelines.errors import MaestroError
from maestro_pipelines.platform_db.connection import psycopg_connect
from maestro_pipelines.storage import open_store
from tests.pitr.recovery_fixtures import ArchivingServer
from tests.test_cli import run_maestro

DATABASE = "sealed_app"


def keyed_store(path: Path, key: str | None):
    store = open_store(path.as_uri(), create=True)
    store.keyring = keyring_from_values(key, None, None, None) if key else None
    return store


@pytest.fixture(scope="module")
def sealed():
    root = Path(tempfile.mkdtemp(prefix="maestro-sealed-pitr-"))
    root.chmod(0o755)
    key, marker = generate_key(), f"maestro-sealed-marker-{secrets.token_hex(8)}"
    store = keyed_store(root / "store", key)
    server = ArchivingServer(root / "server", store)
    try:
        server.execute("postgres", f"CREATE DATABASE {DATABASE}")
        server.execute(DATABASE, "CREATE TABLE markers (id serial PRIMARY KEY, label text NOT NULL)")
        server.archive_now()  # sealed WAL in the store before the base backups: they say so (wal_sealed)
        full = take_base_backup(store, server.target(DATABASE), kind="full")
        assert verify_base_backup(store, full.base_id).ok  # an incremental builds on a verified one
        [(before,)] = server.execute("postgres", "SELECT clock_timestamp()")  # only the full one before it
        server.marker(DATABASE, marker)
        incremental = take_base_backup(store, server.target(DATABASE), kind="incremental")
        [(between,)] = server.execute("postgres", "SELECT clock_timestamp()")
        server.marker(DATABASE, "after")
        server.archive_now()
        server.archive_now()  # a later segment: a damaged one before it is no end of the archive
        yield {"root": root, "key": key, "marker": marker, "store": store, "server": server, "full": full,
               "incremental": incremental, "between": between, "before": before}
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def object_path(sealed, key: str) -> Path:
    return Path(sealed["root"], "store", *key.split("/"))


@contextmanager
def damaged(path: Path, change):
    """`change(bytes) -> bytes` written in place (bit rot: the store's records as they were),
    the original bytes and modification time put back afterwards."""
    original, stat = path.read_bytes(), path.stat()
    with open(path, "r+b") as stored:
        stored.write(change(original))
        stored.truncate()
    try:
        yield
    finally:
        with open(path, "r+b") as stored:
            stored.write(original)
            stored.truncate()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@contextmanager
def rewritten(store, key: str, change):
    """`change(bytes) -> bytes` written through the store (its sha256 recorded anew, as anyone
    who can write the bucket can do), the original put back afterwards."""
    original, metadata = store.get_bytes(key), store.head(key).metadata
    store.put_bytes(key, change(original), metadata)
    try:
        yield
    finally:
        store.put_bytes(key, original, metadata)


def flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def recover_labels(sealed, point: str = "between") -> list[str]:
    target = RecoveryTarget(TIME, time=sealed[point])
    with recovered_server(sealed["store"], sealed["server"].system_id, target, sealed["root"]) as server:
        with psycopg_connect(server.url(DATABASE), source="the recovered server") as conn:
            labels = [row[0] for row in conn.execute("SELECT label FROM markers ORDER BY id").fetchall()]
        assert server.base.base_id == sealed["incremental"].base_id
    assert not list(sealed["root"].glob("maestro-recover-*"))
    return labels


def start_wal(sealed) -> str:
    return layout.wal_key(sealed["server"].system_id, sealed["incremental"].start_wal)


def test_no_byte_of_the_marker_in_the_store_and_the_key_gives_it_back(sealed):
    marker = sealed["marker"].encode()
    objects = [p for p in (sealed["root"] / "store" / "pitr").rglob("*") if p.is_file()]
    names = {p.name for p in objects}
    assert {layout.BASE_TAR, layout.PG_MANIFEST, layout.BASE_RECORD} <= names and any(n.endswith(".zst") for n in names)
    for path in objects:
        data = path.read_bytes()
        assert marker not in data, path
        try:
            plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError:
            continue  # sealed: no zstd frame to open
        assert marker not in plain, path
    records = [json.loads(object_path(sealed, e.root + "/" + layout.BASE_RECORD).read_bytes())
               for e in list_base_backups(sealed["store"])]
    assert all(r["encryption"]["key_id"] and r["mac"] for r in records)
    assert records[0]["encryption"]["key_id"] != records[1]["encryption"]["key_id"]  # a data key each
    assert recover_labels(sealed) == [sealed["marker"]]  # the chain combined, each with its key; not "after"


def test_without_the_key_one_line_and_nothing_touched(sealed):
    server = sealed["server"]
    socket = server.url.query["host"]
    env = {"MAESTRO_DATABASE_URL": f"postgresql://postgres@/{DATABASE}?host={socket}",
           "MAESTRO_STORE_URL": (sealed["root"] / "store").as_uri(), "MAESTRO_HOME": str(sealed["root"] / "home"),
           "TMPDIR": str(sealed["root"])}
    pitr = sealed["root"] / "store" / "pitr"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in pitr.rglob("*") if p.is_file())
    done = run_maestro("restore", "--databases", "platform", "--to-time", sealed["between"].isoformat(), env=env)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no backup key is configured" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert sealed["key"] not in done.stderr + done.stdout
    wrong = run_maestro("restore", "--databases", "platform", "--to-time", sealed["between"].isoformat(),
                        env={**env, "MAESTRO_BACKUP_KEY": generate_key()})  # a key of another store
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 1 and len(lines) == 1 and "not with the configured" in lines[0], wrong.stderr
    assert not list(sealed["root"].glob("maestro-recover-*"))
    assert sorted((str(p), p.stat().st_mtime_ns) for p in pitr.rglob("*") if p.is_file()) == before
    assert [r[0] for r in server.execute("postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'sealed_app_%'")] == []
    # The window needs no key: names and sizes.
    window = recovery_window(keyed_store(sealed["root"] / "store", None), server.system_id)
    assert window.usable == [sealed["full"].base_id, sealed["incremental"].base_id] and window.segments >= 3


def test_verify_without_the_key_checks_what_the_store_recorded(sealed):
    store = keyed_store(sealed["root"] / "store", None)
    base = verify_base_backup(store, sealed["incremental"].base_id)
    assert base.ok and "no backup key is configured" in base.storage_only and base.bytes_read > 0, base
    wal = verify_wal(store, sealed["server"].system_id)
    assert wal.ok and wal.storage_segments == wal.segments >= 3 and "no backup key is configured" in wal.storage_only, wal
    with damaged(object_path(sealed, start_wal(sealed)), flip):  # bit rot is seen without the key too
        wal = verify_wal(store, sealed["server"].system_id)
    assert len(wal.problems) == 1 and sealed["incremental"].start_wal in wal.problems[0], wal.problems


@pytest.mark.parametrize("name", [layout.BASE_TAR, layout.PG_MANIFEST])
def test_a_flipped_bit_in_a_base_object_fails_verify_and_no_recovery_uses_it(sealed, name):
    full = sealed["full"]
    key = f"{layout.base_root(full.system_id, full.base_id)}/{name}"
    with damaged(object_path(sealed, key), flip):
        with pytest.raises(MaestroError) as refused:  # to a point only the full one is before
            recover_labels(sealed, "before")
        assert full.base_id in refused.value.problem and key in refused.value.problem
        assert not list(sealed["root"].glob("maestro-recover-*"))
        report = verify_base_backup(sealed["store"], full.base_id)
        assert not report.ok and key in report.problems[0] and "damaged" in report.problems[0], report.problems
        assert full.base_id not in recovery_window(sealed["store"], full.system_id).usable  # BAD until verified again
    assert verify_base_backup(sealed["store"], full.base_id).ok  # put back: sound again


def test_a_forged_base_record_is_not_usable(sealed):
    full = sealed["full"]
    key = f"{layout.base_root(full.system_id, full.base_id)}/{layout.BASE_RECORD}"

    def forge(data: bytes) -> bytes:  # a consistent digest, as anyone who can write the bucket can make
        body = json.loads(data)
        body.pop("digest")
        body["stop_lsn"] = layout.format_lsn(layout.parse_lsn(body["stop_lsn"]) + 8)
        body["digest"] = layout.record_digest(body)
        return json.dumps(body, indent=2, sort_keys=True).encode()

    with rewritten(sealed["store"], key, forge):
        report = verify_base_backup(sealed["store"], full.base_id)
        assert not report.ok and "does not match its signature" in report.problems[0], report.problems
        [entry] = [e for e in list_base_backups(sealed["store"]) if e.base_id == full.base_id]
        assert entry.record is None and "signature" in entry.problem and len(entry.problem.splitlines()) == 1
        with pytest.raises(MaestroError) as refused:
            recover_labels(sealed)
        assert full.base_id in refused.value.problem
        # Without the key the digest is all there is: listed, not checkable.
        unkeyed = [e for e in list_base_backups(keyed_store(sealed["root"] / "store", None)) if e.base_id == full.base_id]
        assert unkeyed[0].record is not None and unkeyed[0].unchecked


@pytest.mark.parametrize("how", ["rotted", "rewritten", "swapped"])
def test_a_damaged_or_swapped_wal_segment_fails_verify_fetch_and_recovery(sealed, how, tmp_path):
    """A bit flipped in place (the store's sha256 catches it), one flipped and the object written
    through the store (its sha256 recorded anew: the sealed chunk's authentication catches it),
    and another sealed segment with its own metadata under the name (the HMAC over the name)."""
    store, system_id = sealed["store"], sealed["server"].system_id
    key = start_wal(sealed)
    name = sealed["incremental"].start_wal
    if how == "rotted":
        context = damaged(object_path(sealed, key), flip)
    elif how == "rewritten":
        context = rewritten(store, key, flip)
    else:
        context = swapped(store, key, layout.wal_key(system_id, layout.next_segment(name)))
    with context:
        report = verify_wal(store, system_id)
        assert len(report.problems) == 1 and name in report.problems[0], report.problems
        with pytest.raises(MaestroError) as fetched:
            fetch_wal(store, system_id, name, tmp_path / name)
        assert not (tmp_path / name).exists() and name in fetched.value.problem
        feeder_refuses(sealed, name, tmp_path / "feed")
        if how == "rewritten":  # as restore_command runs it: one line, exit 1
            done = run_maestro("wal", "fetch", "--system-id", system_id, name, str(tmp_path / name),
                               env={"MAESTRO_STORE_URL": (sealed["root"] / "store").as_uri(),
                                    "MAESTRO_BACKUP_KEY": sealed["key"], "MAESTRO_HOME": str(tmp_path / "home")})
            assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "tampered" in done.stderr and "Traceback" not in done.stderr and not (tmp_path / name).exists()
    assert verify_wal(store, system_id).ok


def feeder_refuses(sealed, name: str, feed: Path) -> None:
    """What a recovery's restore_command gets when it asks for `name` (restore.sh's protocol:
    `<name>.want`, answered by the segment or `<name>.none`): none, and the feeder's problem,
    which abandons the recovery ("Nothing was restored"), names the segment."""
    from maestro_pipelines.backup.pitr.feeder import WalFeeder

    feed.mkdir()
    feeder = WalFeeder(sealed["store"], sealed["server"].system_id, feed, None,
                       sealed_from=sealed["incremental"].start_wal).start()
    try:
        (feed / f"{name}.want").touch()
        deadline = time.monotonic() + 60
        while not (feed / f"{name}.none").exists() and not (feed / name).exists():
            assert time.monotonic() < deadline, "the feeder did not answer"
            time.sleep(0.02)
    finally:
        feeder.stop()
    assert not (feed / name).exists() and (feed / f"{name}.none").exists()
    assert name in feeder.problem.problem and "Nothing was restored" in feeder.problem.hint


@contextmanager
def swapped(store, key: str, other: str):
    """Another sealed segment (its own sha256 and metadata, under the same data key) under `key`."""
    aside = key + ".aside"
    store.copy(key, aside)
    store.copy(other, key)
    try:
        yield
    finally:
        store.copy(aside, key)
        store.delete(aside)


def test_wal_push_with_a_key_is_idempotent_and_refuses_other_bytes(tmp_path):
    from tests.pitr.conftest import SYNTHETIC_SYSTEM_ID, synthetic_segment

    key = generate_key()
    store = keyed_store(tmp_path / "store", key)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = synthetic_segment(tmp_path / "a", size=1 << 20)
    other = synthetic_segment(tmp_path / "b", size=1 << 20)  # the same name, other bytes
    assert push_wal(store, first) == "archived"
    assert push_wal(store, first) == "already archived"
    with pytest.raises(WalConflict):
        push_wal(store, other)
    system_id = str(SYNTHETIC_SYSTEM_ID)
    assert fetch_wal(store, system_id, first.name, tmp_path / "back") and (tmp_path / "back").read_bytes() == first.read_bytes()
    # No sha256 of the WAL's plaintext anywhere in the store (names, metadata, records).
    import hashlib

    shown = []
    for info in store.list("pitr/"):
        shown += [info.key, json.dumps(info.metadata), store.get_bytes(info.key)[:4096].decode("latin-1")]
    for plain in (first, other):
        assert hashlib.sha256(plain.read_bytes()).hexdigest()[:12] not in "".join(shown)
    [conflict] = [info.key for info in store.list(f"pitr/{system_id}/{layout.CONFLICTS_FOLDER}/")]
    assert "mac" in json.loads(store.get_bytes(conflict))
    # Another day's key record (and a new process: nothing cached): a push seals with a new
    # one of today's; the segment of that other day is still compared and read with its own.
    [record] = [info.key for info in store.list(f"pitr/{system_id}/{layout.KEYS_FOLDER}/")]
    store.copy(record, record.replace(record.rsplit("/", 1)[1][:8], "20200101"))
    store.delete(record)
    store = keyed_store(tmp_path / "store", key)
    later = synthetic_segment(tmp_path / "a", name="000000010000000000000002", size=1 << 20)
    assert push_wal(store, later) == "archived" and push_wal(store, first) == "already archived"
    assert len(list(store.list(f"pitr/{system_id}/{layout.KEYS_FOLDER}/"))) == 2
    assert fetch_wal(store, system_id, later.name, tmp_path / "later")
    # Without the key: one line naming the key it needs, nothing written.
    with pytest.raises(MaestroError) as missing:
        fetch_wal(keyed_store(tmp_path / "store", None), system_id, first.name, tmp_path / "nothing")
    assert "no backup key is configured" in missing.value.problem and not (tmp_path / "nothing").exists()


# ---- retention keeps the key records that kept WAL needs --------------------------------------

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)


def test_retention_never_deletes_a_key_record_kept_wal_names():
    import random

    from maestro_pipelines.backup.pitr.walkeys import KeyRecordName
    from maestro_pipelines.backup.retention import RetentionPolicy, plan_base_retention
    from tests.pitr.test_pitr_retention import SYSTEM_ID, _history

    rng = random.Random(17)
    for _ in range(200):
        days = rng.randint(1, 30)
        entries, wal = _history(rng, days, rng.randint(1, 6))
        records, wal_keys = [], {}
        for day in range(days + 1):  # a key record a day (sometimes two), each naming that day's WAL
            stamp = f"{NOW - timedelta(days=days - day):%Y%m%d}"
            ids = [secrets.token_hex(16) for _ in range(rng.choice([1, 1, 2]))]
            records += [KeyRecordName(f"keys/{stamp}-{i}.json", stamp, i) for i in ids]
            for name in wal[day * 4:day * 4 + 4]:
                wal_keys[name] = rng.choice(ids + [None])  # None: a plaintext segment of before the key
        records.append(KeyRecordName(f"keys/{NOW:%Y%m%d}-{'0' * 32}.json", f"{NOW:%Y%m%d}", "0" * 32))  # no WAL yet
        policy = RetentionPolicy(base_kept=rng.randint(1, 5), base_max_age=None)
        plan = plan_base_retention(SYSTEM_ID, entries, wal, policy, NOW, records, wal_keys)
        staying = {wal_keys[n] for n in wal_keys if n not in set(plan.delete_wal)}
        deleted = set(plan.delete_keys)
        assert not {r.key_id for r in records if r.key in deleted} & staying
        assert f"keys/{NOW:%Y%m%d}-{'0' * 32}.json" not in deleted  # young: its WAL may be on the way
        assert deleted | {key for key, _ in plan.keep_keys} == {r.key for r in records}
        if plan.delete_wal and any(wal_keys[n] for n in plan.delete_wal):
            unknown = plan_base_retention(SYSTEM_ID, entries, wal, policy, NOW, records,
                                          {**wal_keys, wal[-1]: "?"})
            assert unknown.delete_keys == []  # a kept WAL file whose key is not known: nothing goes


def test_apply_retention_deletes_old_wal_and_only_the_key_records_no_kept_wal_names(tmp_path):
    from maestro_pipelines.backup.pitr.walkeys import key_records, push_key
    from maestro_pipelines.backup.retention import RetentionPolicy, apply_base_retention
    from tests.pitr.base_helpers import SYSTEM_ID, fake_record, put_fake_base, segments

    store = keyed_store(tmp_path / "store", generate_key())
    old_key, mid_key = (push_key(store, SYSTEM_ID, NOW - timedelta(days=d)) for d in (20, 10))
    names = segments(1, 12)
    for n, name in enumerate(names):  # 1-4 under the old key, 5-8 under the middle one, 9-12 plaintext
        data_key = old_key if n < 4 else mid_key if n < 8 else None
        meta = {layout.WAL_SHA256_KEY: "0" * 64, **({layout.WAL_KEY_ID_KEY: data_key.key_id} if data_key else {})}
        store.put_bytes(layout.wal_key(SYSTEM_ID, name), b"sealed " + name.encode(), meta)
    for start, days_ago in ((names[2], 9), (names[6], 5)):  # the kept one starts at segment 7
        base_id = f"{NOW - timedelta(days=days_ago):%Y%m%dT%H%M%SZ}-{days_ago:06x}"
        put_fake_base(store, fake_record(base_id, start, start, NOW - timedelta(days=days_ago)))
    [plan] = apply_base_retention(store, RetentionPolicy(base_kept=1, base_max_age=None), NOW, [])
    assert plan.delete_wal == names[:6]
    assert [r.key_id for r in key_records(store, SYSTEM_ID)] == [mid_key.key_id]  # segments 7 and 8 need it



@contextmanager
def replaced_by_plaintext(sealed, name: str, tmp_path: Path):
    """The segment's own WAL as `wal push` without a key stores it (plain zstd, plain sha256):
    what anyone who can write the bucket can put there, with no key at all."""
    store, system_id = sealed["store"], sealed["server"].system_id
    key = layout.wal_key(system_id, name)
    assert fetch_wal(store, system_id, name, tmp_path / name)
    store.copy(key, key + ".aside")
    store.delete(key)
    push_wal(keyed_store(sealed["root"] / "store", None), tmp_path / name, system_id)
    try:
        yield
    finally:
        store.copy(key + ".aside", key)
        store.delete(key + ".aside")


def test_plaintext_put_in_place_of_sealed_wal_or_after_a_sealed_base_is_not_used(sealed, tmp_path):
    from tests.pitr.base_helpers import fake_record, put_fake_base

    store, system_id, name = sealed["store"], sealed["server"].system_id, sealed["incremental"].start_wal
    assert sealed["full"].wal_sealed and sealed["incremental"].wal_sealed
    with replaced_by_plaintext(sealed, name, tmp_path):
        report = verify_wal(store, system_id)
        assert len(report.problems) == 1 and name in report.problems[0] and "not encrypted" in report.problems[0]
        feeder_refuses(sealed, name, tmp_path / "feed")
    # A plaintext base backup newer than the encrypted ones: listed, never recovered from.
    when = datetime.now(timezone.utc)
    forged = put_fake_base(store, fake_record(f"{when:%Y%m%dT%H%M%SZ}-ffffff", name, name, when, system_id=system_id))
    try:
        [entry] = [e for e in list_base_backups(store) if e.base_id == forged.base_id]
        assert entry.record is not None and "not encrypted" in entry.bad and not entry.verified
        assert forged.base_id not in recovery_window(store, system_id).usable
    finally:
        from maestro_pipelines.backup.pitr.base import remove_base_folder

        remove_base_folder(store, layout.base_root(system_id, forged.base_id))


def test_the_monthly_archive_copies_the_key_records_of_its_wal(sealed):
    from maestro_pipelines.backup.archive import archive_base_backups
    from maestro_pipelines.backup.pitr.walkeys import key_records, wal_data_key

    store, system_id, full = sealed["store"], sealed["server"].system_id, sealed["full"]
    month = f"{datetime.now(timezone.utc):%Y-%m}"
    [(_sid, base_id, copied)] = archive_base_backups(store, month)
    assert base_id == full.base_id and copied  # the newest verified one
    archived = {r.key_id for r in key_records(store, system_id, month)}
    sealed_with = {info.metadata[layout.WAL_KEY_ID_KEY] for info in store.list(layout.wal_prefix(system_id, month))}
    assert sealed_with and sealed_with <= archived
    for key_id in sealed_with:  # opened from the archive's own copy
        assert wal_data_key(store, system_id, key_id, month).key_id == key_id
    assert [e.base_id for e in list_base_backups(store, month=month) if e.data_key is not None] == [full.base_id]


def test_records_rewrapped_by_a_rekey_stay_valid_under_the_new_key_alone(tmp_path):
    """`maestro backup rekey` (rewrap, recompute the digest, one put) keeps base.json's MAC, its
    verification record and the WAL key records good under the new key alone."""
    from maestro_pipelines.backup.pitr import base
    from maestro_pipelines.backup.rekey import rekey_store
    from tests.pitr.base_helpers import SYSTEM_ID, fake_record, put_fake_base, segments
    from tests.pitr.conftest import synthetic_segment

    old, new = generate_key(), generate_key()
    store = keyed_store(tmp_path / "store", old)
    push_wal(store, synthetic_segment(tmp_path, size=1 << 20))
    record = put_fake_base(store, fake_record("20261130T010000Z-aaaaaa", segments(1, 1)[0], segments(1, 1)[0], NOW),
                           verified=False)
    root = layout.base_root(SYSTEM_ID, record.base_id)
    data_key = store.keyring.new_data_key()
    store.put_bytes(f"{root}/{layout.BASE_RECORD}", base._sealed_record(store, record, data_key))
    [entry] = list_base_backups(store)
    base._record_verification(store, entry, base.BaseVerifyReport(record.base_id, SYSTEM_ID, True), data_key)
    store.keyring = keyring_from_values(new, old, None, None)
    report = rekey_store(store)
    assert len(report.rewrapped) == 2 and not report.problems, report  # base.json and the WAL key record
    after = keyed_store(tmp_path / "store", new)
    [entry] = list_base_backups(after)
    assert entry.problem is None and entry.data_key is not None and entry.verified
    assert fetch_wal(after, SYSTEM_ID, segments(1, 1)[0], tmp_path / "back")


def test_after_the_key_is_lost_the_next_base_backup_starts_a_new_chain_under_the_new_key(sealed):
    """The lost-key runbook's first step, `maestro backup run` under a new key, must not try to
    build an incremental on a base backup nobody can open any more: a recovery through that
    chain would need the lost key. The new one is full, and says why."""
    folder = sealed["root"] / "lost-key-store"
    server = sealed["server"]
    lost = keyed_store(folder, generate_key())
    first = take_base_backup(lost, server.target(DATABASE), kind="full")
    assert verify_base_backup(lost, first.base_id).ok  # verified while its key was at hand
    assert verify_base_backup(keyed_store(folder, None), first.base_id).storage_only  # then the key is gone
    said = []
    second = take_base_backup(keyed_store(folder, generate_key()), server.target(DATABASE), kind="auto", log=said.append)
    assert second.kind == "full" and second.parent is None
    assert any(f"full: the newest base backup {first.base_id} is encrypted with a key not configured here" in line
               for line in said), said
