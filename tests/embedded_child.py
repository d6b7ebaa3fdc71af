"""A Maestro process attached to the embedded server of MAESTRO_HOME, holding one connection
open, for the tests of the server shared between processes (tests/test_embedded_server.py).

    python -m tests.embedded_child

It attaches the way every Maestro command does (locate_platform_database), connects to the
`postgres` database and prints `attached <backend pid>`. Then each line on stdin is a query
run on that same connection; it prints `ok <first column>` or `error <message>`. At the end
of stdin it exits normally, detaching from the server (the last process stops it).
"""

from __future__ import annotations

import sys


def main() -> None:
    import psycopg

    from maestro_pipelines.platform_db import locate_platform_database
    from maestro_pipelines.settings import load_settings

    location = locate_platform_database(load_settings())
    url = location.admin_url
    with psycopg.connect(host=url.query["host"], user=url.username, dbname=url.database, autocommit=True) as conn:
        print(f"attached {conn.info.backend_pid}", flush=True)
        for query in sys.stdin:
            try:
                value = conn.execute(query).fetchone()[0]
            except psycopg.Error as exc:
                print(f"error {str(exc).strip().splitlines()[0]}", flush=True)
            else:
                print(f"ok {value}", flush=True)


if __name__ == "__main__":
    main()
