"""With a backup key, nothing of a table's content is readable in any of the four stores
(local folder, S3 on moto, GCS on its emulator, Azure Blob on Azurite): a distinctive marker
string in a table is found in no stored object, neither in its raw bytes nor, where an
object is a zstd stream, decompressed, after a backup, its verification and its monthly
archive. The same dump opened with the backup's key does hold the marker (what makes the
search able to fail). The archive verifies with the key like the original. Without a key, a
cloud store's backup carries the warning that it is not encrypted."""

from __future__ import annotations

import io

from sqlalchemy import text

from maestro_pipelines.backup import BackupOptions, DatabaseTarget, archive_month, create_backup, verify_backup
from maestro_pipelines.backup.catalog import get_backup
from maestro_pipelines.backup.sealing import open_object, unencrypted_warning
from maestro_pipelines.crypto import generate_key, keyring_from_values
from maestro_pipelines.platform_db.connection import engine_for

MARKER = b"okapi-vermilion-40417-marker"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MLFLOW = "mlflow-artifacts/"


def readable_forms(data: bytes) -> list[bytes]:
    """The bytes as stored, and decompressed if they are a zstd stream."""
    import zstandard

    forms = [data]
    if data.startswith(ZSTD_MAGIC):
        forms.append(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read())
    return forms


def test_no_stored_object_holds_a_tables_content(store, pg18_database):
    with engine_for(pg18_database.platform_url).connect() as conn:
        conn.execute(text("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
        conn.execute(text("INSERT INTO notes SELECT g, :m || g FROM generate_series(1, 200) g"),
                     {"m": MARKER.decode()})
        conn.commit()
    # MLflow's own objects are not the backup's (MLflow writes them): the list of them is.
    store.put_bytes(f"{MLFLOW}1/model.pkl", b"model bytes" * 100)
    target = [DatabaseTarget("platform", pg18_database.platform_url)]

    store.keyring = keyring_from_values(generate_key(), None, None, None)
    manifest = create_backup(store, target, BackupOptions())
    assert manifest.encrypted and unencrypted_warning(store) is None and manifest.notes == []
    assert verify_backup(store, manifest.backup_id).ok
    archived, copied = archive_month(store, manifest.started_at.strftime("%Y-%m"))
    assert copied and archived.verified and archived.encrypted
    assert verify_backup(store, manifest.backup_id, month=archived.month).ok

    written = [i.key for i in store.list("") if not i.key.startswith(MLFLOW)]
    assert any(k.endswith(".dump.zst") for k in written) and any(k.startswith("monthly/") for k in written)
    for key in written:
        for form in readable_forms(store.get_bytes(key, verify=False)):
            assert MARKER not in form, f"{key} holds the table's content in {store.url}"
            assert b"model.pkl" not in form, f"{key} names an artifact in {store.url}"
    entry = get_backup(store, manifest.backup_id)
    with open_object(store, manifest.databases[0].key, entry.data_key, "the dump") as plain:
        assert MARKER in readable_forms(plain.read())[-1], "the search would not have found the marker"

    store.keyring = None
    plain = create_backup(store, target, BackupOptions())
    warning = unencrypted_warning(store)
    assert (warning is None) == (store.scheme == "file")
    assert plain.notes == ([warning] if warning else [])
