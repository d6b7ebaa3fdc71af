"""`create_backup` in its own process, for the tests that kill a backup with SIGKILL.

    python -m tests.backup.child CONFIG.json

CONFIG names the store, the databases and where to pause: at a pause point the process
writes CONFIG's `marker` file (atomically) and blocks reading its stdin, which the test never
writes to, so the test kills it at a known point instead of racing it with a timer:

- `mid-dump`: the first progress report of a dump (16 MiB into pg_dump's output);
- `dump-committed`: the last database's final progress report, which comes after its dump
  object is committed to the store and before the manifest is written;
- `upload-open`: the first progress report at which the S3 store has an open multipart
  upload (a dump object being uploaded in parts).

    python -m tests.backup.child --archive CONFIG.json

archives CONFIG's `month` instead, pausing (same marker) right after the first object is
copied into the archive's folder.

When the test closes stdin instead of killing the process, it goes on from the pause.
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


def pause_here(marker: Path, detail: dict) -> None:
    """Write the marker (atomically), then block until the test kills this process or
    closes its stdin."""
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps(detail))
    os.replace(temporary, marker)
    sys.stdin.read()


def upload_open(store) -> bool:
    client = getattr(store, "client", None)
    return client is not None and bool(client.list_multipart_uploads(Bucket=store.bucket).get("Uploads"))


def archive(config: dict) -> None:
    from maestro_pipelines.backup import archive_month

    store = open_spec_store(config["store"])
    copy = store.copy

    def copy_then_pause(source_key: str, dest_key: str):
        info = copy(source_key, dest_key)
        pause_here(Path(config["marker"]), {"copied": dest_key})
        return info

    store.copy = copy_then_pause
    entry, _copied = archive_month(store, config["month"])
    print(entry.root)


def main() -> None:
    if sys.argv[1] == "--archive":
        archive(json.loads(Path(sys.argv[2]).read_text()))
        return
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
        if ((pause == "mid-dump" and not final) or (pause == "dump-committed" and final and label.startswith(last_role))
                or (pause == "upload-open" and not final and upload_open(store))):
            pause_here(marker, {"label": label, "bytes": done})

    manifest = create_backup(store, targets, progress=progress)
    print(manifest.backup_id)


if __name__ == "__main__":
    main()
