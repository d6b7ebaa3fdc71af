"""`S3ObjectStore.put_stream` in its own process, for the tests that kill an upload with
SIGKILL at each of its steps.

    S3_WRITER_PAUSE=<point> python -m tests.stores.s3_writer CONFIG.json

CONFIG names the moto endpoint, bucket, key, size and seed of the bytes, and a `marker`
file. At the pause point the process writes the marker (atomically) and blocks reading its
stdin, which the test never writes to, so the test kills it at a known point instead of
racing it with a timer:

- `mid-parts`: the second part of the multipart upload has been sent (the upload is open);
- `completed`: CompleteMultipartUpload returned (the object is under its key), the sidecar
  recording its sha256 is not written yet;
- `recorded`: the sidecar is written (put_stream is about to return).

Without S3_WRITER_PAUSE, or when the test closes stdin, the upload runs to its end and the
process prints the ObjectInfo's sha256 and size as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.backup.child import pause_here

PAUSE_VARIABLE = "S3_WRITER_PAUSE"
POINTS = ("mid-parts", "completed", "recorded")


def pause_after(cls, method: str, point: str, marker: Path, when=lambda *args: True) -> None:
    """Make `cls.method` pause (marker, then block on stdin) right after it returned."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if when(*args):
            pause_here(marker, {"point": point})
        return result

    setattr(cls, method, wrapped)


def main() -> None:
    from maestro_pipelines.storage import open_store
    from maestro_pipelines.storage.s3 import _S3Upload
    from tests.stores.conftest import AWS, FAST_RETRY
    from tests.stores.test_object_stores import blocks

    config = json.loads(Path(sys.argv[1]).read_text())
    marker = Path(config["marker"])
    point = os.environ.get(PAUSE_VARIABLE)
    if point == "mid-parts":
        pause_after(_S3Upload, "upload_part", point, marker, when=lambda index, *rest: index == 1)
    elif point == "completed":
        pause_after(_S3Upload, "complete", point, marker)
    elif point == "recorded":
        pause_after(_S3Upload, "record", point, marker)
    elif point:
        raise SystemExit(f"{PAUSE_VARIABLE}={point!r}: not one of {', '.join(POINTS)}")
    store = open_store(f"s3://{config['bucket']}/{config['prefix']}", endpoint_url=config["endpoint"],
                       retry=FAST_RETRY, **AWS)
    info = store.put_stream(config["key"], blocks(config["size"], seed=config["seed"]))
    print(json.dumps({"sha256": info.sha256, "size": info.size}))


if __name__ == "__main__":
    main()
