"""Two stages of a stream on two cores: `read_ahead(chunks, depth)` runs the producing side on
a thread of its own while the caller consumes. zstd, hashlib, sockets and file I/O release the
GIL on large buffers, so the two stages overlap instead of taking turns.

One piece of code for every place that needs it, lowest in the layers so all can import it:
the store's verified reader (the network read ahead of the hashing, `base.py`), a restore's
download (the store's read, its checks and decompression ahead of the dump file's writes,
`backup/restore/fetch.py`) and a base backup (pg_basebackup's pipe and compression ahead of
the store's writes, `backup/pitr/base.py`). Not used for a logical backup: there pg_dump, its
server backend and the checksum query already keep both cores busy (benchmarks/backup.py
measures each party's CPU seconds).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(chunks: Iterable[bytes], depth: int, name: str = "maestro-read-ahead",
               join_s: float = 5.0) -> Iterator[bytes]:
    """`chunks` produced on a thread of their own, up to `depth` ahead of the consumer. The
    producer's error is raised here, where its chunk would have been. When the consumer stops
    (the end, an error, or closing this generator) the producer stops at its next hand-over
    and is waited for up to `join_s`; a producer blocked in its source (a read that hangs) is
    not: close the source to end it. The thread starts with the first item asked for."""
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

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        producer.join(timeout=join_s)
