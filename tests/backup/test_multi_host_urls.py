"""A multi-host URL, as a Patroni cluster or a managed failover pair is often given
(`?host=a:5432&host=b:5433`): Maestro's own connections and pg_dump both try the hosts in
order and back up the one that answers. Here the first host is a loopback port nothing
listens on (a primary that is gone) and the second is Debian's PostgreSQL 15."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from maestro_pipelines.backup import DatabaseTarget, create_backup, verify_backup
from maestro_pipelines.backup.pgtools import libpq_environment
from maestro_pipelines.platform_db.connection import psycopg_connect
from tests.conftest import create_database, drop_database
from tests.services import free_port


def test_a_backup_through_a_multi_host_url_reaches_the_host_that_answers(pg15, local_case):
    name = create_database(pg15, "multihost")
    try:
        admin = pg15.admin_url
        gone = free_port()
        url = make_url(
            f"postgresql+psycopg://{admin.username}:{admin.password}@/{name}"
            f"?host=127.0.0.1:{gone}&host={admin.host}:{admin.port}"
        )
        env = libpq_environment(url)
        assert (env["PGHOST"], env["PGPORT"]) == (f"127.0.0.1,{admin.host}", f"{gone},{admin.port}")
        with psycopg_connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE answered (id int)")
            conn.execute("INSERT INTO answered VALUES (1), (2)")

        manifest = create_backup(local_case.store, [DatabaseTarget("platform", url, "MAESTRO_DATABASE_URL")])

        [dump] = manifest.databases
        assert {t.name: t.rows for t in dump.tables}["answered"] == 2
        assert verify_backup(local_case.store, manifest.backup_id).ok
    finally:
        drop_database(pg15, name)
