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
    from tests.backup.child import open_spec_store

    store = open_spec_store(config["store"])
    destinations = [DatabaseTarget(d["role"], parse_postgres_url(d["url"], "test"), d["source"])
                    for d in config["destinations"]]
    report = restore_backup(
        store, get_backup(store, config["backup_id"]), destinations, target=config["target"],
        confirm=config.get("confirm"), log=lambda line: print(line, flush=True),
    )
    print(json.dumps({"ok": report.ok}), flush=True)


if __name__ == "__main__":
    main()
