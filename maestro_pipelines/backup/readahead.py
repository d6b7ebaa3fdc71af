"""Two stages of a stream on two cores: `read_ahead(chunks, depth)` runs the producing side
(a restore's download: the store's read, its sha256 and seal checks, zstd decompression) on a
thread of its own while the caller consumes (writing the dump file). zstd, hashlib and file
I/O release the GIL on large buffers, so the two stages overlap instead of taking turns.

Not used for a backup: there pg_dump, its server backend and the checksum query already keep
both cores busy, and our one streaming thread is not the bottleneck (benchmarks/backup.py
measures each party's CPU seconds).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(chunks: Iterable[bytes], depth: int, name: str = "read-ahead") -> Iterator[bytes]:
    """`chunks` produced on a thread of their own, up to `depth` ahead of the consumer. The
    producer's error is raised here, where its chunk would have been. The thread is not
    joined when the consumer stops early: it stops at its next hand-over, or when its source
    ends (a backup kills pg_dump, which ends the thread's read)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not hand_over(chunk):
                    return
            hand_over(done)
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(_Failed(exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
