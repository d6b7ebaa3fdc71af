"""Real object-store servers on 127.0.0.1 for the store tests: nothing here is a mock.

Started once per session (per xdist worker), only when a test needs them:

- S3: moto's `ThreadedMotoServer` (S3 over real HTTP); a second moto server, in its own
  process with `INITIAL_NO_AUTH_ACTION_COUNT=0`, checks signatures for the wrong-credentials
  test.
- GCS: `gcp-storage-emulator` (in memory) in a subprocess.
- Azure Blob: Azurite (`azurite-blob`, installed by scripts/test under .cache/azurite);
  missing, its tests skip locally and fail under CI.

The parametrized fixture `store` gives each test a store over a fresh folder, bucket or
container (ids: local, s3, gcs, azure); `raw` is the same place seen through the raw
filesystem or SDK, to change things behind the store's back. `ChaosProxy` sits between a
store and a real server to break connections on purpose.
"""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from maestro_pipelines.storage import ObjectStore, RetryPolicy, open_store
from maestro_pipelines.storage.local import LocalObjectStore
from tests.services import CACHE, find_program, free_port, missing_service, server_process

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)
PREFIX = "maestro"
AWS = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STORES = ["local", "s3", "gcs", "azure"]
NETWORK_STORES = ["s3", "gcs", "azure"]


def azurite_connection_string(port: int, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )


def fresh_name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


# ---- servers ----------------------------------------------------------------------------------


# moto_endpoint (the plain S3 server) is in tests/conftest.py: the backup tests use it too.


@pytest.fixture(scope="session")
def moto_auth_endpoint(tmp_path_factory) -> Iterator[str]:
    """A moto server that checks every request's signature against its (empty) IAM."""
    port = free_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with server_process(args, port, tmp_path_factory.mktemp("moto-auth"), env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
            "--in-memory"]
    with server_process(args, port, tmp_path_factory.mktemp("gcs")):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def azurite_port(tmp_path_factory) -> Iterator[int]:
    program = find_program("azurite-blob", CACHE / "azurite" / "node_modules" / ".bin" / "azurite-blob")
    if program is None:
        missing_service("Azurite (Azure Blob emulator)", "scripts/test installs it: npm install --prefix .cache/azurite azurite@3.35.0")
    workdir = tmp_path_factory.mktemp("azurite")
    port = free_port()
    args = [program, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir / "data"),
            "--skipApiVersionCheck", "--disableTelemetry"]
    with server_process(args, port, workdir):
        yield port


# ---- one store per test, and the same place seen raw ------------------------------------------


class Case:
    """A store over a fresh place, plus raw access to that place behind the store's back."""

    name: str
    store: ObjectStore

    def via(self, port: int, retry: RetryPolicy) -> ObjectStore:
        """The same store reached through 127.0.0.1:port (a ChaosProxy)."""
        raise NotImplementedError

    def write_raw(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        """Write bytes under the key without the store (so no sha256 unless given)."""
        raise NotImplementedError

    def corrupt(self, key: str) -> None:
        """Change the stored bytes (same length), keeping the recorded sha256 and metadata."""
        raise NotImplementedError

    def raw_names(self) -> list[str]:
        """Everything in the place, the store's own temporary objects and pending uploads included."""
        raise NotImplementedError

    def missing(self) -> ObjectStore:
        """A store whose bucket, container or folder does not exist."""
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


def _flip(data: bytes) -> bytes:
    assert data, "cannot corrupt an empty object"
    return bytes([data[0] ^ 0xFF]) + data[1:]


class LocalCase(Case):
    name = "local"

    def __init__(self, root: Path):
        root.mkdir()
        self.root = root
        self.store = LocalObjectStore(root, retry=FAST_RETRY)

    def write_raw(self, key, data, metadata=None):
        path = self.root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def corrupt(self, key):
        # Bit rot: same file (inode), same size, one byte changed in place.
        with open(self.root.joinpath(*key.split("/")), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))

    def raw_names(self):
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def missing(self):
        return LocalObjectStore(self.root / "not-there", retry=FAST_RETRY)


class S3Case(Case):
    name = "s3"

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.bucket = fresh_name()
        self.client = boto3.client("s3", endpoint_url=endpoint, **AWS)
        self.client.create_bucket(Bucket=self.bucket)
        self.store = self._open(endpoint, FAST_RETRY)

    def _open(self, endpoint: str, retry: RetryPolicy, bucket: str | None = None) -> ObjectStore:
        return open_store(f"s3://{bucket or self.bucket}/{PREFIX}", endpoint_url=endpoint, retry=retry, **AWS)

    def via(self, port, retry):
        return self._open(f"http://127.0.0.1:{port}", retry)

    def write_raw(self, key, data, metadata=None):
        self.client.put_object(Bucket=self.bucket, Key=f"{PREFIX}/{key}", Body=data, Metadata=metadata or {})

    def corrupt(self, key):
        import json

        from maestro_pipelines.storage.s3 import sidecar_name

        name = f"{PREFIX}/{key}"
        current = self.client.get_object(Bucket=self.bucket, Key=name)
        data = current["Body"].read()
        written = self.client.put_object(Bucket=self.bucket, Key=name, Body=_flip(data), Metadata=current["Metadata"])
        if "sha256_sidecar" in current["Metadata"]:
            # Bit rot keeps the ETag; a rewrite cannot, so the sidecar is moved to the new one.
            old = sidecar_name(name, current["ETag"])
            record = json.loads(self.client.get_object(Bucket=self.bucket, Key=old)["Body"].read())
            record["etag"] = written["ETag"].strip('"')
            self.client.put_object(Bucket=self.bucket, Key=sidecar_name(name, written["ETag"]),
                                   Body=json.dumps(record).encode())

    def raw_names(self):
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            names += [item["Key"] for item in page.get("Contents", [])]
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(names + [f"multipart-upload:{u['Key']}" for u in uploads])

    def missing(self):
        return self._open(self.endpoint, FAST_RETRY, bucket=fresh_name())

    def cleanup(self):
        for upload in self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
        self.client.delete_bucket(Bucket=self.bucket)


class GCSCase(Case):
    name = "gcs"

    def __init__(self, endpoint: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.endpoint = endpoint
        self.client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        self.bucket = self.client.create_bucket(fresh_name())
        self.store = self._open(endpoint, FAST_RETRY)

    def _open(self, endpoint: str, retry: RetryPolicy, bucket: str | None = None) -> ObjectStore:
        return open_store(f"gs://{bucket or self.bucket.name}/{PREFIX}", endpoint_url=endpoint, retry=retry)

    def via(self, port, retry):
        return self._open(f"http://127.0.0.1:{port}", retry)

    def write_raw(self, key, data, metadata=None):
        blob = self.bucket.blob(f"{PREFIX}/{key}")
        blob.metadata = metadata or None
        blob.upload_from_string(data)

    def corrupt(self, key):
        blob = self.bucket.get_blob(f"{PREFIX}/{key}")
        data = blob.download_as_bytes()
        replacement = self.bucket.blob(blob.name)
        replacement.metadata = blob.metadata
        replacement.upload_from_string(_flip(data))

    def raw_names(self):
        return sorted(blob.name for blob in self.client.list_blobs(self.bucket))

    def missing(self):
        return self._open(self.endpoint, FAST_RETRY, bucket=fresh_name())

    def cleanup(self):
        # The emulator rewrites its whole index on every delete (1,000 deletes take half a
        # minute) and cannot cancel a resumable session (real GCS can), which keeps a bucket
        # from being deleted: free the big objects and leave the rest to the in-memory server.
        for blob in self.client.list_blobs(self.bucket):
            if (blob.size or 0) > 1024 * 1024:
                blob.delete()


class AzureCase(Case):
    name = "azure"

    def __init__(self, port: int):
        from azure.storage.blob import BlobServiceClient

        self.port = port
        self.service = BlobServiceClient.from_connection_string(azurite_connection_string(port))
        self.container = self.service.create_container(fresh_name())
        self.store = self._open(port, FAST_RETRY)

    def _open(self, port: int, retry: RetryPolicy, container: str | None = None, key: str = AZURITE_KEY) -> ObjectStore:
        return open_store(
            f"az://{container or self.container.container_name}/{PREFIX}",
            connection_string=azurite_connection_string(port, key),
            retry=retry,
        )

    def via(self, port, retry):
        return self._open(port, retry)

    def write_raw(self, key, data, metadata=None):
        self.container.upload_blob(f"{PREFIX}/{key}", data, overwrite=True, metadata=metadata or None)

    def corrupt(self, key):
        blob = self.container.get_blob_client(f"{PREFIX}/{key}")
        properties = blob.get_blob_properties()
        data = blob.download_blob().readall()
        blob.upload_blob(_flip(data), overwrite=True, metadata=properties.metadata)

    def raw_names(self):
        # Committed blobs: what a reader can see. Staged blocks of an aborted upload are not
        # visible and cannot be deleted through the API (see storage/azure.py).
        return sorted(blob.name for blob in self.container.list_blobs())

    def missing(self):
        return self._open(self.port, FAST_RETRY, container=fresh_name())

    def cleanup(self):
        self.container.delete_container()


def _make_case(kind: str, request, tmp_path: Path) -> Case:
    if kind == "local":
        return LocalCase(tmp_path / "store")
    if kind == "s3":
        return S3Case(request.getfixturevalue("moto_endpoint"))
    if kind == "gcs":
        return GCSCase(request.getfixturevalue("gcs_endpoint"))
    return AzureCase(request.getfixturevalue("azurite_port"))


CASE = pytest.StashKey[Case]()


def _fresh_store(request, tmp_path) -> Iterator[ObjectStore]:
    case = _make_case(request.param, request, tmp_path)
    request.node.stash[CASE] = case
    try:
        yield case.store
    finally:
        case.cleanup()


@pytest.fixture(params=STORES)
def store(request, tmp_path) -> Iterator[ObjectStore]:
    """Each of the four stores over a fresh folder, bucket or container."""
    yield from _fresh_store(request, tmp_path)


@pytest.fixture(params=NETWORK_STORES)
def network_store(request, tmp_path) -> Iterator[ObjectStore]:
    """The three network stores only (retries, proxies, credentials)."""
    yield from _fresh_store(request, tmp_path)


@pytest.fixture
def raw(request) -> Case:
    """The place behind the test's `store` or `network_store`, seen through the raw SDK."""
    request.getfixturevalue("network_store" if "network_store" in request.fixturenames else "store")
    return request.node.stash[CASE]


# ---- breaking connections on purpose ----------------------------------------------------------


class ChaosProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server that breaks connections on demand:

    - `drop_next(n)`: the next n connections are closed before anything is forwarded;
    - `cut_after(nbytes)`: once nbytes of responses (all connections together) have been
      forwarded, the connection carrying that byte is cut there, once.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self.cuts = 0
        self._to_drop = 0
        self._cut_at: int | None = None
        self._forwarded = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._to_drop = n

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._cut_at, self._forwarded = nbytes, 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                drop = self._to_drop > 0
                if drop:
                    self._to_drop -= 1
                    self.dropped += 1
            if drop:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, response: bool) -> None:
        try:
            while True:
                data = source.recv(256 * 1024)
                if not data:
                    break
                if response:
                    with self._lock:
                        keep = None
                        if self._cut_at is not None and self._forwarded + len(data) >= self._cut_at:
                            keep = self._cut_at - self._forwarded
                            self._cut_at = None
                            self.cuts += 1
                        self._forwarded += len(data)
                    if keep is not None:
                        dest.sendall(data[:keep])
                        break
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, dest):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


def target_port(raw: Case) -> int:
    if isinstance(raw, AzureCase):
        return raw.port
    return int(raw.endpoint.rsplit(":", 1)[1])


@pytest.fixture
def chaos(raw) -> Iterator[ChaosProxy]:
    proxy = ChaosProxy(target_port(raw))
    try:
        yield proxy
    finally:
        proxy.close()
