"""`restore_backup` in its own process, for the test that kills a restore with SIGKILL.

    python -m tests.restore.child CONFIG.json

CONFIG names the store (tests.backup.conftest.store_spec), the destinations, the backup,
the target and the confirmation. The process prints each log line of the restore, flushed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    from maestro_pipelines.backup import DatabaseTarget, get_backup, restore_backup
    from maestro_pipelines.platform_db.urls import parse_postgres_url
    from maestro_pipelines.storage import open_store
    from maestro_pipelines.storage.local import LocalObjectStore
    from tests.stores.conftest import AWS, FAST_RETRY

    spec = config["store"]
    if spec["kind"] == "local":
        store = LocalObjectStore(Path(spec["root"]), retry=FAST_RETRY)
    else:
        store = open_store(spec["url"], endpoint_url=spec["endpoint"], retry=FAST_RETRY, **AWS)
    destinations = [DatabaseTarget(d["role"], parse_postgres_url(d["url"], "test"), d["source"])
                    for d in config["destinations"]]
    report = restore_backup(
        store, get_backup(store, config["backup_id"]), destinations, target=config["target"],
        confirm=config.get("confirm"), log=lambda line: print(line, flush=True),
    )
    print(json.dumps({"ok": report.ok}), flush=True)


if __name__ == "__main__":
    main()
