"""Encrypted logical backups against someone who can write the store but holds no key.

One store (a local folder: every change behind the store's back is visible to the test), two
encrypted backups of a small database whose dump spans several 1 MiB sealed chunks (a table
of random bytes). Each tampering is applied to a pristine copy of the store and must be
caught by listing, by restore (before any database is created) and by verify: bits flipped
in the dump, in artifacts.json, in the manifest; a manifest edited with its digest
recomputed; sealed chunks removed, repeated, swapped; a manifest from the other backup (as
is, and with its id edited to fit); the other backup's dump put in, with this manifest's
sha256 and digest forged to match (the attack issue 17 reports passing before); a plaintext
dump in place of the sealed one; the envelope's wrapped key altered; a verified.json written
without the key.

Where a keyless check (size, the store's sha256, the manifest's digest) sees a change first,
the seal alone is also shown to refuse the object (read with the store's own checks off).
Also here: a plaintext backup from before the key still restores once a key is configured
(MAESTRO_BACKUP_ENCRYPTION=required refuses it); required without a key writes nothing; drill
records are sealed and read back only with the key.
"""

from __future__ import annotations

import json
import os

import pytest

from maestro_pipelines.backup import (
    DatabaseTarget,
    check_objects,
    create_backup,
    get_backup,
    list_backups,
    restore_backup,
    verify_backup,
)
from maestro_pipelines.backup.drill_history import DrillRecord, list_drills, record_drill
from maestro_pipelines.backup.manifest import ARTIFACTS_NAME, MANIFEST_NAME, VERIFIED_NAME, record_digest, utcnow
from maestro_pipelines.backup.restore.plan import resolve_restore_point
from maestro_pipelines.backup.sealing import open_object
from maestro_pipelines.crypto import BackupKeyMissing, SealBroken, generate_key, keyring_from_values
from maestro_pipelines.crypto.stream import CHUNK, HEADER, TAG
from maestro_pipelines.errors import MaestroError
from tests.backup.conftest import read_raw, replace_raw
from tests.test_cli import run_maestro

ROLE = "mlflow"
"""The role the test database is backed up as: not `platform`, whose restore runs Maestro's
migrations on a database that is not Maestro's."""
MARKER = "zebra-quartz-7731-marker"
NOISE_BYTES = 4 * CHUNK
"""Random bytes in a table: they do not compress, so the sealed dump has 5 chunks or more."""


def keyring(key: str | None = None, required: bool = False):
    return keyring_from_values(key or generate_key(), None, None, "required" if required else None)


@pytest.fixture
def source(pg18_databases):
    """A database with a marker row and a few MiB of random bytes; restores made of it dropped after."""
    dbs = pg18_databases
    name = dbs.create()
    dbs.execute(name, f"CREATE TABLE secrets (id int PRIMARY KEY, note text NOT NULL)",
                f"INSERT INTO secrets VALUES (1, '{MARKER}')", "CREATE TABLE noise (b bytea NOT NULL)")
    with dbs.connect(name) as conn:
        conn.execute("INSERT INTO noise VALUES (%s)", [os.urandom(NOISE_BYTES)])
    yield dbs, name
    with dbs.connect("postgres") as conn:
        made = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [f"{name}_"]).fetchall()
        for (database,) in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def server_databases(dbs, name: str) -> list[str]:
    with dbs.connect("postgres") as conn:
        return sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                                 [name]).fetchall())


def manifest_body(case, backup_id: str) -> dict:
    return json.loads(read_raw(case, f"backups/{backup_id}/{MANIFEST_NAME}"))


def put_forged_manifest(case, backup_id: str, body: dict) -> None:
    """What anyone who can write the store can do: any manifest, its digest right, written
    through the store so its recorded sha256 is right too."""
    body = {**body, "digest": record_digest(body)}
    case.store.put_bytes(f"backups/{backup_id}/{MANIFEST_NAME}", json.dumps(body, indent=2, sort_keys=True).encode())


def chunks_of(sealed: bytes) -> tuple[bytes, list[bytes]]:
    """A sealed object's header and its sealed chunks."""
    body = sealed[HEADER.size:]
    return sealed[:HEADER.size], [body[i:i + CHUNK + TAG] for i in range(0, len(body), CHUNK + TAG)]


def flip_bit(data: bytes, at: int | None = None) -> bytes:
    changed = bytearray(data)
    changed[len(data) // 2 if at is None else at] ^= 0x04
    return bytes(changed)


# ---- the tamperings: each takes (case, backup under attack, the other backup) ---------------------


def dump_key(backup_id: str) -> str:
    return f"backups/{backup_id}/{ROLE}.dump.zst"


def dump_bit_flipped(case, a, b):
    # In chunk 1 of 4 or more: the reader authenticates it before the store's reader reaches
    # the last byte and its sha256, so the seal is what refuses it.
    replace_raw(case, dump_key(a), flip_bit(read_raw(case, dump_key(a)), HEADER.size + CHUNK + TAG + 1000))


def artifacts_bit_flipped(case, a, b):
    key = f"backups/{a}/{ARTIFACTS_NAME}"
    replace_raw(case, key, flip_bit(read_raw(case, key)))


def manifest_bit_flipped(case, a, b):
    key = f"backups/{a}/{MANIFEST_NAME}"
    data = read_raw(case, key)
    replace_raw(case, key, flip_bit(data, data.index(b'"rows": ') + 8))


def manifest_edited_digest_recomputed(case, a, b):
    body = manifest_body(case, a)
    body["databases"][0]["tables"][0]["rows"] += 1
    put_forged_manifest(case, a, body)


def envelope_altered(case, a, b):
    """The wrapped data key changed (the MAC leaves wrapping out, for rekey): it no longer opens."""
    import base64

    body = manifest_body(case, a)
    wrapped = base64.b64decode(body["encryption"]["wrapped_key"])
    body["encryption"]["wrapped_key"] = base64.b64encode(flip_bit(wrapped)).decode()
    put_forged_manifest(case, a, body)


def _rechunked(case, a, change):
    header, chunks = chunks_of(read_raw(case, dump_key(a)))
    assert len(chunks) >= 4, "the dump should span several sealed chunks"
    replace_raw(case, dump_key(a), header + b"".join(change(chunks)))


def chunk_removed(case, a, b):
    _rechunked(case, a, lambda c: c[:1] + c[2:])


def chunk_duplicated(case, a, b):
    _rechunked(case, a, lambda c: c[:2] + c[1:])


def chunks_moved(case, a, b):
    _rechunked(case, a, lambda c: [c[0], c[2], c[1], *c[3:]])


def manifest_of_another_backup(case, a, b):
    case.store.copy(f"backups/{b}/{MANIFEST_NAME}", f"backups/{a}/{MANIFEST_NAME}")


def manifest_of_another_backup_id_edited(case, a, b):
    put_forged_manifest(case, a, {**manifest_body(case, b), "backup_id": a})


def dump_of_another_backup_sha_forged(case, a, b):
    """Issue 17's attack: B's dump in A's place, A's manifest made to describe it (sha256,
    sizes, row counts), its digest recomputed: consistent for every keyless check."""
    case.store.copy(dump_key(b), dump_key(a))
    body, other = manifest_body(case, a), manifest_body(case, b)
    body["databases"] = [{**other["databases"][0], "key": dump_key(a)}]
    put_forged_manifest(case, a, body)


def dump_of_another_backup_in_place(case, a, b):
    replace_raw(case, dump_key(a), read_raw(case, dump_key(b)))


def plaintext_dump_in_place(case, a, b):
    entry = get_backup(case.store, a)
    with open_object(case.store, dump_key(a), entry.data_key, "the dump") as plain:
        replace_raw(case, dump_key(a), plain.read())


TAMPERINGS = [
    dump_bit_flipped, artifacts_bit_flipped, manifest_bit_flipped, manifest_edited_digest_recomputed, envelope_altered,
    chunk_removed, chunk_duplicated, chunks_moved, manifest_of_another_backup, manifest_of_another_backup_id_edited,
    dump_of_another_backup_sha_forged, dump_of_another_backup_in_place, plaintext_dump_in_place,
]
SEAL_ALONE = {chunk_removed, chunk_duplicated, dump_of_another_backup_in_place, plaintext_dump_in_place}
"""Tamperings a keyless check sees first (the size): the seal is shown to refuse them too."""


def restore_refusal(store, dbs, name: str, backup_id: str) -> str:
    """The one line restoring `backup_id` into scratch databases fails with; nothing may be created."""
    before = server_databases(dbs, name)
    with pytest.raises(MaestroError) as refused:
        entry = resolve_restore_point(store, backup_id)
        restore_backup(store, entry, [DatabaseTarget(ROLE, dbs.url(name))])
    assert server_databases(dbs, name) == before, "a refused restore created a database"
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_every_tampering_is_caught_by_list_restore_and_verify(source, local_case):
    dbs, name = source
    store = local_case.store
    store.keyring = keyring()
    store.put_bytes("mlflow-artifacts/1/model.pkl", b"model bytes" * 100)
    target = [DatabaseTarget(ROLE, dbs.url(name))]
    a = create_backup(store, target)
    dbs.execute(name, "INSERT INTO secrets VALUES (2, 'later')")
    b = create_backup(store, target)
    assert a.encrypted and a.databases[0].zstd_bytes > 3 * CHUNK
    assert verify_backup(store, a.backup_id).ok and verify_backup(store, b.backup_id).ok
    assert [e.verified and e.encrypted for e in list_backups(store)] == [True, True]
    # Backup A as written, put back through the store before each tampering (the local
    # store's records follow the file, so a copied folder would not do).
    pristine = {i.key: store.get_bytes(i.key) for i in store.list(f"backups/{a.backup_id}/", with_metadata=False)}
    a_key = get_backup(store, a.backup_id).data_key

    caught = {}
    for tamper in TAMPERINGS:
        for key, data in pristine.items():
            store.put_bytes(key, data)
        assert get_backup(store, a.backup_id).verified
        tamper(local_case, a.backup_id, b.backup_id)

        [listed] = [e for e in list_backups(store) if e.backup_id == a.backup_id]
        assert listed.bad or check_objects(store, listed), f"{tamper.__name__}: listed as good"
        refused = restore_refusal(store, dbs, name, a.backup_id)
        report = verify_backup(store, a.backup_id)
        assert not report.ok and report.storage_only is None, f"{tamper.__name__}: verified"
        assert not get_backup(store, a.backup_id).verified
        if tamper in SEAL_ALONE:
            with pytest.raises(SealBroken):
                with open_object(store, dump_key(a.backup_id), a_key, "dump", verify=False, sealed_only=True) as r:
                    r.read()
        caught[tamper.__name__] = refused
    # What stopped the restores that only the key could stop: the seal and the MAC.
    assert "fails authentication" in caught["dump_bit_flipped"]
    assert "fails authentication" in caught["chunks_moved"]
    assert "is backup " in caught["manifest_of_another_backup"]
    assert "the envelope was altered" in caught["envelope_altered"]
    for forged in ("manifest_edited_digest_recomputed", "manifest_of_another_backup_id_edited",
                   "dump_of_another_backup_sha_forged"):
        assert "does not match its signature" in caught[forged], forged


def test_verified_json_written_without_the_key_does_not_count(source, local_case):
    dbs, name = source
    store = local_case.store
    store.keyring = keyring()
    manifest = create_backup(store, [DatabaseTarget(ROLE, dbs.url(name))])
    assert verify_backup(store, manifest.backup_id).ok and get_backup(store, manifest.backup_id).verified
    key = f"backups/{manifest.backup_id}/{VERIFIED_NAME}"
    body = json.loads(read_raw(local_case, key))
    body["mac"] = "0" * 64  # or none at all: an edited record cannot be signed without the key
    store.put_bytes(key, json.dumps(body).encode())
    assert not get_backup(store, manifest.backup_id).verified
    del body["mac"]
    store.put_bytes(key, json.dumps(body).encode())
    entry = get_backup(store, manifest.backup_id)
    assert not entry.verified and not entry.bad


def test_a_plaintext_backup_restores_once_a_key_is_configured(source, local_case):
    """Backups from before the key stay restore points; the new ones are encrypted. Under
    MAESTRO_BACKUP_ENCRYPTION=required the plaintext one is refused (one line, nothing made)."""
    dbs, name = source
    store = local_case.store
    target = [DatabaseTarget(ROLE, dbs.url(name))]
    old = create_backup(store, target)
    assert verify_backup(store, old.backup_id).ok
    key = generate_key()
    store.keyring = keyring(key)
    new = create_backup(store, target)
    assert verify_backup(store, new.backup_id).ok
    assert [(e.backup_id, e.encrypted, e.verified) for e in list_backups(store)] == [
        (old.backup_id, False, True), (new.backup_id, True, True)]

    report = restore_backup(store, get_backup(store, old.backup_id), target)
    [restored] = report.databases
    assert not restored.problems and restored.rows == old.databases[0].rows
    assert dbs.scalar(restored.restored_as, "SELECT note FROM secrets") == MARKER

    store.keyring = keyring(key, required=True)
    refused = restore_refusal(store, dbs, name, old.backup_id)
    assert "not encrypted and MAESTRO_BACKUP_ENCRYPTION=required" in refused


def test_required_without_a_key_writes_nothing(source, local_case):
    dbs, name = source
    store = local_case.store
    store.keyring = keyring_from_values(None, None, None, "required")
    with pytest.raises(BackupKeyMissing) as refused:
        create_backup(store, [DatabaseTarget(ROLE, dbs.url(name))])
    assert "MAESTRO_BACKUP_ENCRYPTION=required and no backup key is configured" in str(refused.value)
    assert list(store.list("")) == [], "a refused backup wrote to the store"


def _drill(ok: bool = True) -> DrillRecord:
    return DrillRecord(drill_id=f"{utcnow():%Y%m%dT%H%M%S%fZ}-{os.urandom(3).hex()}", source="library",
                       started_at=utcnow(), ok=ok, rto_target_s=3600, rpo_target_s=86400, host="db-7.internal",
                       problems=[] if ok else ["the restored platform database does not match"])


def test_drill_records_are_sealed_and_read_only_with_the_key(local_case):
    store = local_case.store
    key = generate_key()
    store.keyring = keyring(key)
    first, second = _drill(), _drill(ok=False)
    keys = [record_drill(store, first), record_drill(store, second)]
    for stored in keys:
        raw = read_raw(local_case, stored)
        assert b"db-7.internal" not in raw and b"encryption" in raw and b"mac" in raw
    history = list_drills(store)
    assert [(r.drill_id, r.ok, r.host) for r in history.records] == [
        (first.drill_id, True, "db-7.internal"), (second.drill_id, False, "db-7.internal")]

    store.keyring = None  # no key here: counted, said to be encrypted, not shown as damaged
    history = list_drills(store)
    assert (history.records, history.skipped, history.locked) == ([], [], 2)
    assert "no backup key is configured" in history.locked_by

    # The sealed body of one record moved into the other: caught with the key.
    store.keyring = keyring(key)
    body = json.loads(read_raw(local_case, keys[0]))
    store.put_bytes(keys[1], json.dumps({**body, "drill_id": second.drill_id}).encode())
    history = list_drills(store)
    assert [r.drill_id for r in history.records] == [first.drill_id]
    assert len(history.skipped) == 1 and "is damaged" in history.skipped[0]


def test_without_the_key_an_encrypted_backup_is_listed_and_storage_checked(source, local_case):
    dbs, name = source
    store = local_case.store
    store.keyring = keyring()
    manifest = create_backup(store, [DatabaseTarget(ROLE, dbs.url(name))])
    assert verify_backup(store, manifest.backup_id).ok
    verified_key = f"backups/{manifest.backup_id}/{VERIFIED_NAME}"
    recorded = read_raw(local_case, verified_key)

    store.keyring = None
    [entry] = list_backups(store)
    assert entry.encrypted and entry.unchecked and not entry.bad
    assert "no backup key is configured" in str(entry.key_error)
    report = verify_backup(store, manifest.backup_id)
    assert report.ok and report.storage_only and report.objects == 2
    assert read_raw(local_case, verified_key) == recorded, "a keyless check wrote verified.json"

    replace_raw(local_case, dump_key(manifest.backup_id), flip_bit(read_raw(local_case, dump_key(manifest.backup_id))))
    report = verify_backup(store, manifest.backup_id)
    assert report.storage_only and not report.ok and "sha256" in report.problems[0]


def test_restore_without_the_right_key_says_which_key_in_one_line(source, local_case, tmp_path):
    """`maestro restore` as a user runs it: no key, another store's key, a key cut short in a
    copy and paste. One line each, naming the key the backup needs, never a key; nothing
    restored. Then `backup list` and `backup verify` without the key."""
    dbs, name = source
    store = local_case.store
    key = generate_key()
    store.keyring = keyring(key)
    manifest = create_backup(store, [DatabaseTarget("platform", dbs.url(name))])
    assert verify_backup(store, manifest.backup_id).ok
    needed = store.keyring.current.id
    env = {"MAESTRO_STORE_URL": local_case.root.as_uri(), "MAESTRO_DATABASE_URL": dbs.server.libpq_url(name),
           "MAESTRO_HOME": str(tmp_path / "home")}
    other = keyring()
    cases = [
        ({}, f"encrypted with backup key {needed} and no backup key is configured"),
        ({"MAESTRO_BACKUP_KEY": generate_key()}, f"encrypted with backup key {needed}, not with the configured"),
        ({"MAESTRO_BACKUP_KEY": key[:-4]}, "MAESTRO_BACKUP_KEY is not a backup key"),
    ]
    assert other.current.id != needed
    for extra, says in cases:
        result = run_maestro("restore", "--backup", manifest.backup_id, env={**env, **extra})
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert says in lines[0]
        assert key not in result.stdout + result.stderr and key[:-4] not in result.stdout + result.stderr
        assert server_databases(dbs, name) == [name], "a refused restore created a database"

    listed = run_maestro("backup", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "sealed" in listed.stdout and "no key" in listed.stdout
    assert "1 backup is encrypted with a key not configured here" in listed.stderr
    checked = run_maestro("backup", "verify", manifest.backup_id, env=env)
    assert checked.returncode == 0, checked.stderr
    assert "storage checks only: full verification needs the key" in checked.stdout
