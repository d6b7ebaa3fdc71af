"""The object-store contract, run against all four stores on real servers.

Every test taking `store` runs four times (local, s3, gcs, azure); `network_store` runs on
the three network stores. What was not possible against an emulator:

- GCS credentials: the emulator accepts any request, so a wrong-credentials test exists only
  for S3 (a moto server that checks signatures) and Azure (Azurite checks the shared key).
- GCS paging: the emulator returns every object in one page whatever the page size, so the
  1,050-key listing crosses pages on S3 (1,000 per page) and Azure (1,000 per page) only.
- Azure staged blocks of an aborted upload cannot be listed as objects or deleted through
  the API; the test checks that nothing is visible (committed), which is what readers see.
- GCS: the emulator cannot cancel a resumable upload session (real GCS can); an aborted
  upload's session stays pending there until the server stops. Nothing becomes visible.
- Interrupted downloads: on Azure, azure-storage-blob re-fetches a cut chunk by itself (up
  to 3 times, whatever `retry_total`), so there the resume test exercises the SDK; on S3
  and GCS it exercises the store's own resume from the byte reached.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from maestro_pipelines.storage import (
    ChecksumMismatch,
    ChecksumMissing,
    InvalidKey,
    ObjectNotFound,
    RetryPolicy,
    StoreAccessDenied,
    StoreNotFound,
    StoreUnavailable,
    open_store,
)
from maestro_pipelines.storage.base import CHUNK_SIZE, MiB
from maestro_pipelines.storage.local import LocalObjectStore
from tests.services import free_port
from tests.stores.conftest import AWS, FAST_RETRY, GCSCase, S3Case, azurite_connection_string

UNICODE_KEY = "dir with space/ünïcødé ✓.bin"


def blocks(total: int, piece: int = MiB, seed: int = 7):
    """`total` pseudo-random bytes in `piece`-sized pieces, never all in memory."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield rng.randbytes(n)
        sent += n


def sha256_of(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def read_sha256(reader, piece: int = 3 * MiB + 17) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with reader:
        while chunk := reader.read(piece):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


# ---- the contract, on all four stores ---------------------------------------------------------


def test_round_trip_keeps_bytes_sha256_and_metadata(store):
    data = b"model weights \x00\x01\x02" * 1000
    written = store.put_bytes("models/acme/v1.bin", data, {"tenant": "acme", "kind": "model"})

    head = store.head("models/acme/v1.bin")
    assert (head.key, head.size, head.sha256, head.metadata) == (
        "models/acme/v1.bin", len(data), hashlib.sha256(data).hexdigest(), {"tenant": "acme", "kind": "model"}
    )
    assert written.sha256 == head.sha256 and written.metadata == head.metadata
    assert head.last_modified is not None
    assert store.get_bytes("models/acme/v1.bin") == data
    with store.open_read("models/acme/v1.bin") as reader:  # a file-like that reads in pieces
        assert reader.read(5) + reader.read() == data


def test_50_mb_stream_from_a_generator_is_hashed_while_streaming(store, raw):
    size = 50 * 1000 * 1000  # several 8 MiB parts, the last one short
    info = store.put_stream("backups/big.dump", blocks(size, piece=MiB + 3))

    expected = sha256_of(blocks(size, piece=MiB + 3))
    assert (info.size, info.sha256) == (size, expected)
    assert store.head("backups/big.dump").sha256 == expected
    assert read_sha256(store.open_read("backups/big.dump")) == (expected, size)
    # Nothing temporary remains: the object, and on S3 the one sidecar recording its sha256.
    names = raw.raw_names()
    assert [n for n in names if ".maestro-" not in n] == [_raw_name(raw, "backups/big.dump")]
    sidecars = [n for n in names if "/.maestro-sha256." in n]
    assert len(sidecars) == (1 if raw.name == "s3" else 0), names
    assert not [n for n in names if ".maestro-tmp" in n]


def _raw_name(raw, key: str) -> str:
    return key if raw.name == "local" else f"maestro/{key}"


def test_a_reader_closed_early_stops_reading_ahead(store):
    """A big object is read ahead by a thread; closing the reader before the end stops it
    (nothing keeps downloading, no thread is left), and the object reads whole again after."""
    size = 6 * MiB  # above PREFETCH_MIN
    store.put_stream("ahead.bin", blocks(size))
    reader = store.open_read("ahead.bin")
    assert len(reader.read(MiB)) == MiB
    reader.close()
    assert not [t for t in threading.enumerate() if t.name == "maestro-read-ahead" and t.is_alive()]
    assert read_sha256(store.open_read("ahead.bin")) == (sha256_of(blocks(size)), size)


def test_a_file_object_streams_too(store, tmp_path):
    source = tmp_path / "source.bin"
    with source.open("wb") as f:
        for piece in blocks(CHUNK_SIZE + 5):
            f.write(piece)
    with source.open("rb") as f:
        info = store.put_stream("file.bin", f)
    assert info.sha256 == sha256_of(blocks(CHUNK_SIZE + 5))
    assert store.get_bytes("file.bin") == source.read_bytes()


def test_stream_ending_exactly_on_a_part_boundary(store):
    size = 2 * CHUNK_SIZE  # no short last part: the upload is finished by its commit
    info = store.put_stream("exact.bin", blocks(size))
    assert (info.size, info.sha256) == (size, sha256_of(blocks(size)))
    assert read_sha256(store.open_read("exact.bin")) == (info.sha256, size)


def test_empty_object(store):
    info = store.put_stream("empty", iter([]))
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert store.head("empty").size == 0
    assert store.get_bytes("empty") == b""


def test_keys_with_spaces_and_unicode(store):
    store.put_bytes(UNICODE_KEY, b"unicode", {"tenant": "globex"})
    assert store.get_bytes(UNICODE_KEY) == b"unicode"
    assert store.head(UNICODE_KEY).metadata == {"tenant": "globex"}
    assert [info.key for info in store.list("dir with space/")] == [UNICODE_KEY]


def test_list_by_prefix_is_sorted_and_complete(store):
    keys = ["a/2", "ab", "a-b", "b/1", "a/1", "a/sub/3"]
    for key in keys:
        store.put_bytes(key, key.encode())

    assert [i.key for i in store.list()] == sorted(keys)  # "a-b" < "a/1" < "ab"
    assert [i.key for i in store.list("a/")] == ["a/1", "a/2", "a/sub/3"]
    assert [i.key for i in store.list("a")] == ["a-b", "a/1", "a/2", "a/sub/3", "ab"]
    assert [i.key for i in store.list("nothing/")] == []
    listed = {i.key: i for i in store.list("a/")}
    assert listed["a/1"].sha256 == hashlib.sha256(b"a/1").hexdigest()
    assert listed["a/1"].size == 3


def test_list_returns_every_page(store):
    keys = [f"many/{i:05d}" for i in range(1050)]  # more than one page of 1,000
    shuffled = random.Random(1).sample(keys, len(keys))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put_bytes(key, key.encode()), shuffled))

    listed = list(store.list("many/"))
    assert [i.key for i in listed] == keys
    assert all(i.sha256 == hashlib.sha256(i.key.encode()).hexdigest() for i in listed)
    assert [i.key for i in store.list("many/", with_metadata=False)] == keys


def test_head_exists_and_idempotent_delete(store):
    store.put_bytes("reports/q1.csv", b"a,b\n1,2\n")
    assert store.exists("reports/q1.csv")

    store.delete("reports/q1.csv")
    assert not store.exists("reports/q1.csv")
    store.delete("reports/q1.csv")  # again: nothing to do, no error
    store.delete("never/written")
    with pytest.raises(ObjectNotFound, match="reports/q1.csv"):
        store.head("reports/q1.csv")
    assert list(store.list()) == []


def test_server_side_copy_keeps_sha256_and_metadata(store):
    data = os.urandom(2 * MiB)
    source = store.put_bytes("runs/7/model.pkl", data, {"run_id": "7"})

    copied = store.copy("runs/7/model.pkl", "registry/acme/model.pkl")

    assert (copied.key, copied.size, copied.sha256, copied.metadata) == (
        "registry/acme/model.pkl", len(data), source.sha256, {"run_id": "7"}
    )
    assert store.get_bytes("registry/acme/model.pkl") == data  # verified read
    assert store.get_bytes("runs/7/model.pkl") == data
    with pytest.raises(ObjectNotFound, match="runs/8/model.pkl"):
        store.copy("runs/8/model.pkl", "elsewhere")


def test_corrupted_bytes_are_detected_on_read(store, raw):
    data = os.urandom(CHUNK_SIZE + 1000)
    store.put_bytes("dumps/db.dump", data, {"tenant": "acme"})
    recorded = store.head("dumps/db.dump").sha256

    raw.corrupt("dumps/db.dump")  # behind the store's back; recorded sha256 kept

    assert store.head("dumps/db.dump").sha256 == recorded
    with pytest.raises(ChecksumMismatch, match="dumps/db.dump"):
        store.get_bytes("dumps/db.dump")
    with pytest.raises(ChecksumMismatch):
        read_sha256(store.open_read("dumps/db.dump"))
    unverified = store.get_bytes("dumps/db.dump", verify=False)
    assert len(unverified) == len(data) and unverified != data


def test_object_without_recorded_sha256_is_refused(store, raw):
    raw.write_raw("foreign/file.bin", b"written by someone else")

    info = store.head("foreign/file.bin")
    assert info.sha256 is None and info.size == len(b"written by someone else")
    with pytest.raises(ChecksumMissing, match="no recorded sha256"):
        store.open_read("foreign/file.bin")
    assert store.get_bytes("foreign/file.bin", verify=False) == b"written by someone else"


def test_object_with_a_bogus_sha256_is_a_mismatch(store, raw):
    raw.write_raw("forged.bin", b"payload", {"sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("forged.bin")


@pytest.mark.parametrize("fail_after", [3 * MiB, 20 * MiB], ids=["small", "multipart"])
def test_failed_source_stream_leaves_nothing_behind(store, raw, fail_after):
    store.put_bytes("exports/data.parquet", b"version 1")
    before = raw.raw_names()

    def broken():
        yield from blocks(fail_after)
        raise RuntimeError("source database went away")

    with pytest.raises(RuntimeError, match="source database went away"):
        store.put_stream("exports/data.parquet", broken())
    with pytest.raises(RuntimeError, match="source database went away"):
        store.put_stream("exports/new.parquet", broken())

    assert store.get_bytes("exports/data.parquet") == b"version 1"  # old object still good
    assert not store.exists("exports/new.parquet")
    assert [i.key for i in store.list()] == ["exports/data.parquet"]
    assert raw.raw_names() == before  # no temporary object, no pending multipart upload


def test_reading_a_missing_key(store):
    with pytest.raises(ObjectNotFound, match="nope/missing.bin"):
        store.open_read("nope/missing.bin")
    with pytest.raises(ObjectNotFound, match="nope/missing.bin"):
        store.get_bytes("nope/missing.bin", verify=False)


def test_invalid_keys_are_refused_before_any_request(store):
    for key in ["../x", "/etc/passwd", "a//b", "", "a/./b", ".maestro-tmp/x"]:
        with pytest.raises(InvalidKey, match="MAESTRO_STORE_URL"):
            store.put_bytes(key, b"x")
    with pytest.raises(InvalidKey):
        store.put_bytes("ok", b"x", {"Bad-Name": "v"})
    assert list(store.list()) == []


def test_missing_bucket_container_or_folder(store, raw):
    missing = raw.missing()
    for operation in (
        lambda: missing.head("k"),
        lambda: missing.put_bytes("k", b"data"),
        lambda: missing.get_bytes("k"),
        lambda: list(missing.list()),
        lambda: missing.delete("k"),
    ):
        with pytest.raises(StoreNotFound, match="MAESTRO_STORE_URL") as caught:
            operation()
        assert "\n" not in str(caught.value)


# ---- network stores: retries, resumed reads, credentials, environment ------------------------


def test_transient_connection_failures_are_retried(network_store, raw, chaos):
    chaos.drop_next(2)
    store = raw.via(chaos.port, RetryPolicy(attempts=3, backoff_s=0.01))
    store.put_bytes("retried.bin", b"made it")
    assert chaos.dropped == 2
    assert store.get_bytes("retried.bin") == b"made it"


def test_bounded_retries_end_in_store_unavailable(network_store, raw, chaos):
    chaos.drop_next(1000)
    store = raw.via(chaos.port, RetryPolicy(attempts=4, backoff_s=0.01))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="after 4 attempt") as caught:
        store.head("anything")
    assert chaos.dropped == 4  # exactly the attempts allowed: no hidden SDK retries
    assert time.monotonic() - started < 10
    assert "MAESTRO_STORE_URL" in str(caught.value)


def test_interrupted_download_resumes_where_it_stopped(network_store, raw, chaos):
    size = 20 * MiB
    network_store.put_stream("big.bin", blocks(size))
    chaos.cut_after(12 * MiB)  # mid-object: the first response that gets that far is cut
    store = raw.via(chaos.port, RetryPolicy(attempts=3, backoff_s=0.01))

    assert read_sha256(store.open_read("big.bin")) == (sha256_of(blocks(size)), size)
    assert chaos.cuts == 1


def test_unreachable_endpoint_fails_quickly(network_store, raw):
    port = free_port()  # nothing listens there
    store = raw.via(port, RetryPolicy(attempts=2, backoff_s=0.01))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="MAESTRO_STORE_URL"):
        store.put_bytes("k", b"x")
    assert time.monotonic() - started < 10


def test_s3_wrong_credentials(moto_auth_endpoint):
    store = open_store(
        "s3://some-bucket/maestro", endpoint_url=moto_auth_endpoint, region_name="us-east-1",
        aws_access_key_id="AKIAEXAMPLEWRONG0000", aws_secret_access_key="not-the-secret-value", retry=FAST_RETRY,
    )
    for operation in (lambda: store.put_bytes("k", b"x"), lambda: store.head("k"), lambda: list(store.list())):
        with pytest.raises(StoreAccessDenied, match="MAESTRO_STORE_URL") as caught:
            operation()
        assert "not-the-secret-value" not in str(caught.value)


def test_azure_wrong_key(azurite_port):
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite_connection_string(azurite_port)).create_container("wrong-key")
    wrong = "A" * 86 + "=="
    store = open_store(
        "az://wrong-key/maestro", connection_string=azurite_connection_string(azurite_port, wrong), retry=FAST_RETRY
    )
    with pytest.raises(StoreAccessDenied, match="AZURE_STORAGE_CONNECTION_STRING") as caught:
        store.put_bytes("k", b"x")
    assert wrong not in str(caught.value) and "MAESTRO_STORE_URL" in str(caught.value)


def test_stores_honour_their_environment_variables(request, monkeypatch):
    """AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST and AZURE_STORAGE_CONNECTION_STRING: a bare URL works
    (MAESTRO_STORE_URL's store, opened as the CLI and the resource open it)."""
    from maestro_pipelines.settings import load_settings
    from maestro_pipelines.storage import open_configured_store

    s3 = S3Case(request.getfixturevalue("moto_endpoint"))
    gcs = GCSCase(request.getfixturevalue("gcs_endpoint"))
    port = request.getfixturevalue("azurite_port")
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite_connection_string(port)).create_container("from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", AWS["region_name"])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string(port))
    try:
        for url in (f"s3://{s3.bucket}/env", f"gs://{gcs.bucket.name}/env", "az://from-env/env"):
            monkeypatch.setenv("MAESTRO_STORE_URL", url)
            settings = load_settings()
            store = open_configured_store(settings.store_url, settings.home, settings.store_environment)
            store.put_bytes("hello.txt", b"from the environment")
            assert store.get_bytes("hello.txt") == b"from the environment"
    finally:
        s3.cleanup()
        gcs.cleanup()


# ---- the local folder store -------------------------------------------------------------------


def test_local_write_in_progress_is_invisible(tmp_path):
    store = LocalObjectStore(tmp_path / "store", create=True)
    store.put_bytes("other.bin", b"already there")
    paused, resume = threading.Event(), threading.Event()
    outcome: dict = {}

    def slow_source():
        yield b"x" * (CHUNK_SIZE + MiB)  # the first 8 MiB part reaches the disk
        paused.set()
        if not resume.wait(timeout=60):
            raise TimeoutError("the test never resumed the write")
        yield b"y" * MiB

    def write():
        try:
            outcome["info"] = store.put_stream("fresh.bin", slow_source())
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert paused.wait(timeout=60)
        temp_files = [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".maestro-tmp-")]
        assert len(temp_files) == 1 and temp_files[0].stat().st_size >= CHUNK_SIZE  # bytes are on disk...
        assert not store.exists("fresh.bin")  # ...but not under the key
        assert [i.key for i in store.list()] == ["other.bin"]
    finally:
        resume.set()
        writer.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert store.get_bytes("fresh.bin") == b"x" * (CHUNK_SIZE + MiB) + b"y" * MiB
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".maestro-tmp-")]


def test_local_overwrite_keeps_one_sidecar_that_matches_the_bytes(tmp_path):
    root = tmp_path / "store"
    store = LocalObjectStore(root, create=True)
    for version in (b"one", b"two", b"three"):
        store.put_bytes("model.bin", version)
        assert store.head("model.bin").sha256 == hashlib.sha256(version).hexdigest()
    assert store.get_bytes("model.bin") == b"three"
    assert len(list((root / ".maestro-meta" / "model.bin").iterdir())) == 1

    store.delete("model.bin")
    assert not (root / ".maestro-meta").exists() and list(root.iterdir()) == []


def test_local_default_store_is_created_on_first_write_but_a_configured_one_is_not(tmp_path):
    embedded = LocalObjectStore(tmp_path / "home" / "store", create=True)
    assert list(embedded.list()) == [] and not embedded.exists("x")
    embedded.put_bytes("x", b"1")
    assert (tmp_path / "home" / "store" / "x").read_bytes() == b"1"

    configured = open_store((tmp_path / "unmounted" / "store").as_uri())
    with pytest.raises(StoreNotFound, match="mkdir -p"):
        configured.put_bytes("x", b"1")
    assert not (tmp_path / "unmounted").exists()


def test_local_key_that_is_also_a_folder(tmp_path):
    store = LocalObjectStore(tmp_path, create=True)
    store.put_bytes("a/b", b"1")
    with pytest.raises(InvalidKey, match="conflicts"):
        store.put_bytes("a", b"2")
    with pytest.raises(ObjectNotFound):
        store.head("a")


# ---- the Dagster resource ---------------------------------------------------------------------


def test_resource_gives_the_embedded_store_by_default(tmp_path):
    from maestro_pipelines.resources.object_store import ObjectStoreResource

    store = ObjectStoreResource(home=str(tmp_path)).get_store()
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "store"
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_resource_builds_s3_through_dagster_aws(moto_endpoint):
    import boto3

    from maestro_pipelines.resources.object_store import ObjectStoreResource
    from maestro_pipelines.storage.s3 import S3ObjectStore

    boto3.client("s3", endpoint_url=moto_endpoint, **AWS).create_bucket(Bucket="resource-bucket")
    resource = ObjectStoreResource(url="s3://resource-bucket/maestro", endpoint_url=moto_endpoint, **AWS)
    store = resource.get_store()
    assert isinstance(store, S3ObjectStore) and store.url == "s3://resource-bucket/maestro"
    store.put_stream("via-resource.bin", blocks(CHUNK_SIZE + 1))
    assert store.head("via-resource.bin").sha256 == sha256_of(blocks(CHUNK_SIZE + 1))


def test_resource_fields_are_described_and_secrets_masked():
    from maestro_pipelines.resources.object_store import ObjectStoreResource

    fields = ObjectStoreResource.model_fields
    assert all(field.description for field in fields.values())
    from maestro_pipelines.resources.secret_fields import secret_field_names

    assert secret_field_names(ObjectStoreResource) == {"aws_secret_access_key", "aws_session_token", "azure_connection_string"}
