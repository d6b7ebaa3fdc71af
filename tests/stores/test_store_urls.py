"""Store URLs and keys: every mistake is one clear line naming the setting; no server needed."""

from __future__ import annotations

import sys

import pytest

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage import InvalidKey, InvalidStoreURL, open_store, parse_store_url
from maestro_pipelines.storage.local import LocalObjectStore


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and isinstance(error, MaestroError)
    return text


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("s3://", "names no bucket"),
        ("s3:/bucket/prefix", "is not a URL"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("az://a/x", "not a valid container name"),
        ("gs://bucket/a/../b", "'..'"),
        ("s3://bucket/x?versionId=3", "query"),
        ("file://relative/path", "three slashes"),
        ("://nothing", "no valid scheme"),
    ],
)
def test_malformed_urls(url, says):
    with pytest.raises(InvalidStoreURL) as caught:
        open_store(url)
    text = one_line(caught.value)
    assert "MAESTRO_STORE_URL" in text and says in text


def test_unknown_scheme_lists_the_supported_ones():
    with pytest.raises(InvalidStoreURL) as caught:
        open_store("ftp://files.example.com/backups")
    text = one_line(caught.value)
    assert "'ftp://'" in text and "MAESTRO_STORE_URL" in text
    for scheme in ("file://", "s3://", "gs://", "az://"):
        assert scheme in text


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(InvalidStoreURL, match="credentials") as caught:
        open_store("s3://AKIAEXAMPLE:topsecretvalue@bucket/prefix")
    assert "topsecretvalue" not in one_line(caught.value)


def test_the_setting_named_is_the_one_given():
    with pytest.raises(InvalidStoreURL, match="BACKUP_STORE_URL"):
        open_store("ftp://x/y", source="BACKUP_STORE_URL")


def test_parsed_forms(tmp_path):
    assert parse_store_url("s3://bucket/a/b/") == parse_store_url("s3://bucket//a/b")
    location = parse_store_url("az://container/deep/prefix")
    assert (location.scheme, location.bucket, location.prefix, location.url) == (
        "az", "container", "deep/prefix", "az://container/deep/prefix"
    )
    # A plain path and a file URL name the same folder store.
    assert parse_store_url(str(tmp_path)) == parse_store_url(tmp_path.as_uri())
    assert isinstance(open_store(str(tmp_path)), LocalObjectStore)
    assert open_store(tmp_path.as_uri()).url == tmp_path.as_uri()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs/key", "", "a//b", "./a", "a/", "a\nb"])
def test_keys_that_escape_or_are_malformed(tmp_path, key):
    store = open_store(tmp_path.as_uri())
    with pytest.raises(InvalidKey) as caught:
        store.put_bytes(key, b"x")
    assert "MAESTRO_STORE_URL" in one_line(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing was written anywhere


def test_keys_are_checked_on_every_operation_and_every_scheme(tmp_path):
    # Opening an S3 store makes no request, so this needs no server.
    s3 = open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                    aws_access_key_id="x", aws_secret_access_key="y")
    local = open_store(tmp_path.as_uri())
    for store in (s3, local):
        for operation in (
            lambda: store.head("../x"),
            lambda: store.get_bytes("../x"),
            lambda: store.delete("../x"),
            lambda: store.copy("ok", "../x"),
            lambda: list(store.list("../")),
        ):
            with pytest.raises(InvalidKey, match="MAESTRO_STORE_URL"):
                operation()


@pytest.mark.parametrize(
    "url, module, extra",
    [
        ("s3://bucket/x", "boto3", "[s3]"),
        ("gs://bucket/x", "google.cloud.storage", "[gcs]"),
        ("az://container/x", "azure.storage.blob", "[azure]"),
    ],
)
def test_a_missing_sdk_names_the_pip_extra(monkeypatch, url, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(InvalidStoreURL) as caught:
        open_store(url, **({"connection_string": "unused"} if url.startswith("az") else {}))
    text = one_line(caught.value)
    assert f"pip install 'maestro-pipelines{extra}'" in text and "MAESTRO_STORE_URL" in text


def test_azure_without_a_connection_string(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    with pytest.raises(InvalidStoreURL, match="AZURE_STORAGE_CONNECTION_STRING") as caught:
        open_store("az://container/x")
    assert "MAESTRO_STORE_URL" in one_line(caught.value)


def test_a_bad_azure_connection_string_is_not_echoed():
    secret = "AccountName=x;AccountKey=c2VjcmV0LWtleS12YWx1ZQ==;Garbage"
    with pytest.raises(InvalidStoreURL) as caught:
        open_store("az://container/x", connection_string=secret)
    assert "c2VjcmV0" not in one_line(caught.value)


def test_metadata_rules(tmp_path):
    store = open_store(tmp_path.as_uri())
    for metadata in ({"Tenant": "x"}, {"sha256": "x"}, {"size": "1"}, {"ok": "ünï"}, {"ok": 3}):
        with pytest.raises(InvalidKey):
            store.put_bytes("k", b"x", metadata)
    assert store.put_bytes("k", b"x", {"tenant_name": "acme corp"}).metadata == {"tenant_name": "acme corp"}


def test_importing_the_library_imports_no_sdk_and_no_dagster():
    import subprocess

    code = (
        "import sys, maestro_pipelines.storage, maestro_pipelines.storage.urls; "
        "bad = [m for m in ('boto3', 'google.cloud', 'azure', 'dagster') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
