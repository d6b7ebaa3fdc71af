"""`create_backup` in its own process, for the tests that kill a backup with SIGKILL.

    python -m tests.backup.child CONFIG.json

CONFIG names the store, the databases and where to pause: at a pause point the process
writes CONFIG's `marker` file (atomically) and blocks reading its stdin, which the test never
writes to, so the test kills it at a known point instead of racing it with a timer:

- `mid-dump`: the first progress report of a dump (16 MiB into pg_dump's output);
- `dump-committed`: the last database's final progress report, which comes after its dump
  object is committed to the store and before the manifest is written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def open_spec_store(spec: dict):
    """The store `tests.backup.conftest.store_spec` describes, opened in a child process."""
    from maestro_pipelines.storage import open_store
    from maestro_pipelines.storage.local import LocalObjectStore
    from tests.stores.conftest import AWS, FAST_RETRY

    if spec["kind"] == "local":
        return LocalObjectStore(Path(spec["root"]), retry=FAST_RETRY)
    return open_store(spec["url"], endpoint_url=spec["endpoint"], retry=FAST_RETRY, **AWS)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    from maestro_pipelines.backup import DatabaseTarget, create_backup
    from maestro_pipelines.platform_db.urls import parse_postgres_url

    store = open_spec_store(config["store"])
    targets = [DatabaseTarget(t["role"], parse_postgres_url(t["url"], "test"), "MAESTRO_DATABASE_URL")
               for t in config["targets"]]
    pause = config.get("pause")
    last_role = targets[-1].role
    marker = Path(config["marker"])

    def progress(label: str, done: int, expected: int | None) -> None:
        final = done == expected
        if (pause == "mid-dump" and not final) or (pause == "dump-committed" and final and label.startswith(last_role)):
            temporary = marker.with_suffix(".tmp")
            temporary.write_text(json.dumps({"label": label, "bytes": done}))
            os.replace(temporary, marker)
            sys.stdin.read()  # blocks until the test kills this process

    manifest = create_backup(store, targets, progress=progress)
    print(manifest.backup_id)


if __name__ == "__main__":
    main()
