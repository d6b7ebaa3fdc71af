"""`restore_backup` in its own process, for the test that kills a restore with SIGKILL.

    python -m tests.restore.child CONFIG.json

CONFIG names the store (tests.backup.conftest.store_spec), the destinations, the backup,
the target and the confirmation. The process prints each log line of the restore, flushed.

With `recover` = "finish" or "undo" it finishes or undoes a half-done live restore instead.
With `pause_at` = [n, "before"|"after"], the n-th write or delete of the swap journal
(`swaps/...`, counted from 0) stops the process before or after it happens: it prints
`PAUSED` and waits for ever, for the test to kill it there with SIGKILL. The store and the
servers stay real; only the moment of the kill is chosen.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path


def pause_at_journal_operation(store, index: int, when: str) -> None:
    """Make the store's `index`-th journal put or delete stop this process (see above)."""
    seen = [0]

    def hooked(original):
        def operation(key, *args, **kwargs):
            journal = key.startswith("swaps/")
            if journal and seen[0] == index and when == "before":
                stop(key)
            result = original(key, *args, **kwargs)
            if journal:
                seen[0] += 1
                if seen[0] - 1 == index and when == "after":
                    stop(key)
            return result
        return operation

    store.put_bytes = hooked(store.put_bytes)
    store.delete = hooked(store.delete)


def stop(key: str) -> None:
    print(f"PAUSED at {key}", flush=True)
    threading.Event().wait()


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    from maestro_pipelines.backup import DatabaseTarget, get_backup, restore_backup
    from maestro_pipelines.platform_db.urls import parse_postgres_url
    from tests.backup.child import open_spec_store

    store = open_spec_store(config["store"])
    if config.get("pause_at"):
        pause_at_journal_operation(store, *config["pause_at"])
    destinations = [DatabaseTarget(d["role"], parse_postgres_url(d["url"], "test"), d["source"])
                    for d in config["destinations"]]
    if config.get("recover"):  # `maestro restore finish|undo`'s library call, killable the same way
        from maestro_pipelines.backup.restore.recovery import finish_swap, undo_swap

        recover = finish_swap if config["recover"] == "finish" else undo_swap
        recover(store, destinations, config["confirm"], log=lambda line: print(line, flush=True))
        return
    report = restore_backup(
        store, get_backup(store, config["backup_id"]), destinations, target=config["target"],
        confirm=config.get("confirm"), log=lambda line: print(line, flush=True),
    )
    print(json.dumps({"ok": report.ok}), flush=True)


if __name__ == "__main__":
    main()
