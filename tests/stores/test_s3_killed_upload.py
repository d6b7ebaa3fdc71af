"""An S3 upload killed (SIGKILL) at each of its steps: mid-parts, after
CompleteMultipartUpload but before the sidecar that records its sha256, after the sidecar.

After each, the key is absent or present-and-verified, never present-and-unverifiable to
head/exists/list/open_read; an overwrite of a good object never shows a wrong sha256;
`discard_unfinished` removes what was left (and leaves it while it is newer than
`started_before`); a retry of the write succeeds. The upload runs in a child process
(s3_writer.py) that pauses at the step, where the test kills it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from maestro_pipelines.storage import ObjectNotFound
from maestro_pipelines.storage.base import CHUNK_SIZE
from tests.backup.conftest import REPO_ROOT, wait_until
from tests.backup.test_killed import kill
from tests.stores.conftest import PREFIX, S3Case
from tests.stores.s3_writer import PAUSE_VARIABLE
from tests.stores.test_object_stores import blocks, read_sha256, sha256_of

KEY = "backups/b1/platform.dump.zst"
SIZE = 2 * CHUNK_SIZE + 12345  # three parts
OLD_SIZE = CHUNK_SIZE + 777  # two parts: the overwritten object has a sidecar of its own


@pytest.fixture
def s3_case(moto_endpoint):
    made = S3Case(moto_endpoint)
    try:
        yield made
    finally:
        made.cleanup()


def start_writer(tmp_path: Path, case: S3Case, point: str | None) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "paused.json"
    config = tmp_path / "writer.json"
    config.write_text(json.dumps({"endpoint": case.endpoint, "bucket": case.bucket, "prefix": PREFIX, "key": KEY,
                                  "size": SIZE, "seed": 2, "marker": str(marker)}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), PAUSE_VARIABLE: point or ""}
    child = subprocess.Popen([sys.executable, "-m", "tests.stores.s3_writer", str(config)], cwd=REPO_ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    return child, marker


def assert_absent(store) -> None:
    assert not store.exists(KEY)
    with pytest.raises(ObjectNotFound, match=KEY):
        store.head(KEY)
    with pytest.raises(ObjectNotFound, match=KEY):
        store.open_read(KEY)
    with pytest.raises(ObjectNotFound, match=KEY):
        store.open_read(KEY, verify=False)
    assert KEY not in [i.key for i in store.list("backups/")]
    assert KEY not in [i.key for i in store.list("backups/", with_metadata=False)]
    assert KEY not in [i.key for i in store.list("backups/b")]  # a partial name: its sidecars are elsewhere


def assert_present(store, size: int, sha256: str) -> None:
    head = store.head(KEY)
    assert (head.size, head.sha256) == (size, sha256)
    assert read_sha256(store.open_read(KEY)) == (sha256, size)  # verified to the last byte
    assert [(i.key, i.sha256) for i in store.list("backups/")] == [(KEY, sha256)]
    assert [i.key for i in store.list("backups/", with_metadata=False)] == [KEY]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-key", "overwrite"])
@pytest.mark.parametrize("point", ["mid-parts", "completed", "recorded"])
def test_upload_killed_at_each_step(s3_case, tmp_path, point, overwrite):
    store = s3_case.store
    new_sha = sha256_of(blocks(SIZE, seed=2))
    old = store.put_stream(KEY, blocks(OLD_SIZE, seed=1)) if overwrite else None
    started = datetime.now(timezone.utc) - timedelta(minutes=1)

    child, marker = start_writer(tmp_path, s3_case, point)
    try:
        wait_until(f"the upload paused {point}", marker.exists, child, running="upload")
    finally:
        kill(child)

    raw_object = f"{PREFIX}/{KEY}"
    if point == "recorded":
        assert_present(store, SIZE, new_sha)
    elif point == "mid-parts":
        assert f"multipart-upload:{raw_object}" in s3_case.raw_names()
        if old is not None:
            assert_present(store, OLD_SIZE, old.sha256)  # the open upload changed nothing yet
        else:
            assert_absent(store)
    else:  # completed: the new bytes are under the key, their sha256 recorded nowhere
        assert raw_object in s3_case.raw_names()
        assert_absent(store)
        assert store.discard_unfinished("", started_before=started) == []  # newer than the cut-off: kept
        assert raw_object in s3_case.raw_names()

    discarded = store.discard_unfinished("backups/")
    expected_kind = {"mid-parts": "open multipart upload", "completed": "unfinished write"}.get(point)
    if expected_kind:
        assert any(expected_kind in line and raw_object in line for line in discarded), discarded
    names = s3_case.raw_names()
    if point == "recorded" or (point == "mid-parts" and old is not None):
        assert [n for n in names if ".maestro-" not in n] == [raw_object]
        assert len([n for n in names if ".maestro-sha256." in n]) == 1, names  # no stale sidecar kept
    else:
        assert names == [], names  # the unfinished object and the overwritten version's sidecar

    retried = store.put_stream(KEY, blocks(SIZE, seed=2))  # the write again, as a retried step does it
    assert (retried.sha256, retried.size) == (new_sha, SIZE)
    assert_present(store, SIZE, new_sha)
    assert len([n for n in s3_case.raw_names() if ".maestro-sha256." in n]) == 1


def test_unfinished_and_stale_sidecars_are_found_under_a_partial_prefix(s3_case):
    """A sidecar of a key right in the prefix's folder is not under a partial-name prefix
    (`backups/b` lists `backups/b...`): discard_unfinished still finds it."""
    store = s3_case.store
    store.put_stream(KEY, blocks(OLD_SIZE, seed=1))
    store.put_stream("backups/b1.other", blocks(OLD_SIZE, seed=3))
    sidecars = [n for n in s3_case.raw_names() if "backups/.maestro-sha256.b1.other." in n]
    assert len(sidecars) == 1
    s3_case.client.delete_object(Bucket=s3_case.bucket, Key=f"{PREFIX}/backups/b1.other")  # behind its back

    assert store.discard_unfinished("backups/b") == [f"sha256 record of a version no longer there {sidecars[0]}"]
    assert [n for n in s3_case.raw_names() if ".maestro-" not in n] == [f"{PREFIX}/{KEY}"]
    assert store.head(KEY).sha256 == sha256_of(blocks(OLD_SIZE, seed=1))


def test_someone_elses_multipart_object_is_listed_and_never_discarded(s3_case):
    """A multipart object written without Maestro (MLflow's boto3 upload) has no sidecar and
    no mark: it is listed (no sha256: not good to a verified read) and left alone."""
    from boto3.s3.transfer import TransferConfig

    data = b"".join(blocks(OLD_SIZE, seed=4))
    s3_case.client.upload_fileobj(io.BytesIO(data), s3_case.bucket, f"{PREFIX}/mlflow-artifacts/model.bin",
                                  Config=TransferConfig(multipart_threshold=CHUNK_SIZE, multipart_chunksize=CHUNK_SIZE))
    store = s3_case.store
    assert [i.key for i in store.list("mlflow-artifacts/", with_metadata=False)] == ["mlflow-artifacts/model.bin"]
    [info] = store.list("mlflow-artifacts/")
    assert (info.size, info.sha256) == (len(data), None)
    assert store.discard_unfinished("") == []
    assert store.get_bytes("mlflow-artifacts/model.bin", verify=False) == data
