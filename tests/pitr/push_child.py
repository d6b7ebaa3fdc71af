"""`push_wal` in its own process, paused mid-upload, for the test that kills it with SIGKILL.

    python -m tests.pitr.push_child CONFIG.json

CONFIG names the store (tests.backup.conftest.store_spec), the WAL file (or `home`: then the
pusher's pass over that MAESTRO_HOME's spool runs instead), the marker file and
`pause_after` (bytes of compressed output handed to the store before the pause). At the pause
the process writes the marker and blocks on stdin, so the test kills it at a known point
(the store then holds part of the upload) instead of racing it with a timer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(config_path: str) -> None:
    from maestro_pipelines.backup.pitr import wal
    from tests.backup.child import open_spec_store, pause_here

    config = json.loads(Path(config_path).read_text())
    compressed = wal._compressed

    def pausing(path):
        handed = 0
        for chunk in compressed(path):
            if handed >= config["pause_after"]:
                pause_here(Path(config["marker"]), {"handed": handed})
            handed += len(chunk)
            yield chunk

    wal._compressed = pausing
    if "home" in config:  # the pusher's pass over the spool of MAESTRO_HOME `home`
        from maestro_pipelines.backup.pitr.spool import Pusher

        print(Pusher(Path(config["home"]), open_spec_store(config["store"])).push_spooled(), flush=True)
        return
    print(wal.push_wal(open_spec_store(config["store"]), config["path"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
