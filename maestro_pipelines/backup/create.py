"""Taking a backup: pg_dump streamed through zstd into the object store, manifest last.

For each database, in one REPEATABLE READ transaction that stays open for the whole dump:

    pg_export_snapshot()  ->  pg_dump --snapshot=<it> -Fc -Z0  ->  zstd (threads)  ->  put_stream
                          ->  row counts and content checksums (same snapshot, another thread)

Nothing is written to local disk; the sha256 of every object is computed while it streams.
With a backup key configured, each stream is sealed after zstd (backup/sealing.py: AES-256-GCM
in 1 MiB chunks under the backup's own data key), and so is artifacts.json; the manifest
carries the data key's envelope and a MAC, and the sha256 the store records is of the sealed
bytes, so the store can be checked without the key.
The snapshots of all databases are taken one right after the other before any dump starts,
so the platform database and MLflow's registry describe the same moment. The manifest is
written last: a backup killed at any point has no manifest and so does not exist for
listing, retention or restore (retention later removes its leftover objects).

Why `-Fc -Z0` piped into Python's zstandard rather than pg_dump's own compression: the
embedded pg_dump has no zstd/lz4, its gzip is single-threaded and 10x slower than the dump
itself, and a directory dump (`-Fd -j N`) needs a full local copy. `benchmarks/backup.py`
measures the choice.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL

from maestro_pipelines.backup.activity import activity
from maestro_pipelines.backup.consistency import table_checks
from maestro_pipelines.backup.manifest import (
    ARTIFACTS_NAME,
    DUMP_SUFFIX,
    MANIFEST_NAME,
    ArtifactsRecord,
    BackupError,
    BackupManifest,
    DatabaseDump,
    backup_root,
    new_backup_id,
    record_json,
    utcnow,
)
from maestro_pipelines.backup.phases import Phase, PhaseProgress
from maestro_pipelines.backup.pgtools import (
    CHECKSUM_SESSION_OPTIONS,
    check_client,
    check_dumps_server,
    libpq_environment,
    program,
    program_version,
    psycopg_connect,
    ssl_only_hint,
    where,
)
from maestro_pipelines.backup.sealing import new_data_key, put_envelope, seal, sign, unencrypted_warning
from maestro_pipelines.backup.types import DatabaseTarget, MiB, Progress
from maestro_pipelines.crypto import DataKey
from maestro_pipelines.redaction import hide_secret
from maestro_pipelines.storage import ObjectStore

MIN_LEVEL = -7
"""zstd accepts much faster (negative) levels; for dumps even -1 and -3 grow the file by half
(see compression_level), so lower ones are refused as a typo rather than a choice."""
MAX_LEVEL = 22
MAX_THREADS = 64

@dataclass(frozen=True)
class BackupOptions:
    compression_level: int = 1
    """zstd level. `python -m benchmarks.backup --explore` on a 1 GB platform database, 2 cores:
    level 1 keeps pace with pg_dump (0.96x the `-Z0 > /dev/null` floor) at 0.84x the size of
    pg_dump's gzip-9; level 3 costs 1.36x the floor for a bigger file on this data, -1 and -3
    save nothing and grow the file by half."""
    compression_threads: int = 0
    """zstd worker threads; 0 compresses in the streaming thread (the GIL is released). On 2
    cores pg_dump and its server process already hold both, so worker threads only add
    switching: 1.15x the floor with 2 threads against 0.96x with none."""
    content_checksums: bool = True
    """Per-table content checksums inside the snapshot (one extra scan per table, run
    concurrently with the dump); off: row counts only."""
    artifact_prefix: str | None = "mlflow-artifacts/"
    """Store prefix whose objects (MLflow's model artifacts) are listed in the backup's
    artifact manifest; None: no artifact manifest."""
    read_size: int = MiB

    def __post_init__(self) -> None:
        # Checked here, before any database or store is touched: zstd's own error comes
        # from deep inside the first dump and names no option.
        level = self.compression_level
        if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
            raise BackupError(
                f"zstd compression level {level!r} is out of range",
                f"Use a whole number from {MIN_LEVEL} to {MAX_LEVEL} (1 is the measured default; higher is smaller and slower)",
            )
        threads = self.compression_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise BackupError(
                f"zstd compression threads {threads!r} is out of range",
                f"Use 0 (compress in the streaming thread, the default) to {MAX_THREADS}",
            )


class _Snapshot:
    """An open REPEATABLE READ transaction that exported its snapshot."""

    def __init__(self, target: DatabaseTarget):
        import psycopg

        self.target = target
        self.connection = psycopg_connect(target.url, options=CHECKSUM_SESSION_OPTIONS, source=target.source)
        try:
            self.connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.connection.read_only = True
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_export_snapshot(), "
                    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, "
                    "now(), current_setting('server_version'), current_setting('server_version_num')::int, "
                    "pg_database_size(current_database())"
                )
                (self.snapshot_id, self.wal_lsn, self.snapshot_at, self.server_version,
                 self.server_version_num, self.database_bytes) = cursor.fetchone()
        except Exception as exc:
            self.close()
            if isinstance(exc, psycopg.Error):
                from maestro_pipelines.platform_db.connection import translate_error

                raise translate_error(exc, target.url, target.source) from None
            raise

    @contextmanager
    def importer(self):
        """Another connection inside the same snapshot (SET TRANSACTION SNAPSHOT)."""
        import psycopg

        connection = psycopg_connect(self.target.url, options=CHECKSUM_SESSION_OPTIONS, source=self.target.source)
        try:
            connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            connection.read_only = True
            connection.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot_id}'")
            yield connection
        finally:
            try:
                connection.rollback()
            finally:
                connection.close()

    def close(self) -> None:
        try:
            self.connection.rollback()
            self.connection.close()
        except Exception:
            pass


class _CountingReader:
    """pg_dump's stdout, counting bytes and reporting progress about every 16 MiB."""

    def __init__(self, stream, label: str, expected: int | None, progress: Progress | None):
        self.stream = stream
        self.count = 0
        self.label = label
        self.expected = expected
        self.progress = progress
        self._reported = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        if self.progress is not None and self.count - self._reported >= 16 * MiB:
            self._reported = self.count
            self.progress(self.label, self.count, self.expected)
        return data


def _widen_pipe(stream) -> None:
    """A 1 MiB pipe instead of Linux's 64 KiB: pg_dump and the compressor wake each other
    16x less often (measured on 2 cores: part of what keeps the backup near the floor)."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), MiB)
    except (ImportError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: keep the default
        pass


def _stderr_tail(handle, url: URL, returncode: int) -> str:
    """What pg_dump said (its last lines), or how it ended when it said nothing (killed)."""
    handle.seek(0)
    text = hide_secret(handle.read().decode("utf-8", "replace").strip(), url.password)
    lines = [line for line in text.splitlines() if line.strip()]
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        # Killed from outside (an OOM kill, an operator's kill): nothing pg_dump printed says why.
        lines.append(f"pg_dump was killed by {name} (out of memory, or stopped by someone)")
    elif not lines:
        lines.append(f"pg_dump exited with code {returncode} without a message")
    return " / ".join(lines[-3:])


def _start_checks(snap: _Snapshot, options: BackupOptions) -> tuple[threading.Thread, dict[str, Any]]:
    """Row counts and checksums in the dump's snapshot, on a thread beside the dump: `tables`
    in the dict it returns, or `error`."""
    checks: dict[str, Any] = {}

    def run_checks() -> None:
        # On a second connection that imports the snapshot: an error here (a table this user
        # may not read) must not abort the exporting transaction under pg_dump's feet.
        try:
            with snap.importer() as connection:
                checks["tables"] = table_checks(connection, options.content_checksums)
        except BaseException as exc:  # reported after the dump, with the dump's own error first
            checks["error"] = exc

    checker = threading.Thread(target=run_checks, name=f"checks-{snap.target.role}", daemon=True)
    checker.start()
    return checker, checks


def _compressed_chunks(process: subprocess.Popen, stderr, reader: _CountingReader, target: DatabaseTarget,
                       options: BackupOptions):
    """pg_dump's output through zstd; pg_dump's exit checked after the last chunk, before
    put_stream commits: a failed dump never becomes an object."""
    import zstandard

    compressor = zstandard.ZstdCompressor(
        level=options.compression_level, threads=options.compression_threads, write_checksum=True
    )
    yield from compressor.read_to_iter(reader, read_size=options.read_size, write_size=options.read_size)
    returncode = process.wait()
    if returncode != 0:
        said = _stderr_tail(stderr, target.url, returncode)
        raise BackupError(
            f"pg_dump of {target.role} database '{target.database}' at {where(target.url)} failed: {said}",
            ssl_only_hint(process.args[0], said)
            or f"Fix what pg_dump says (permissions on {target.source}'s user, server reachable), then run the backup again",
        )
    if reader.count == 0:
        raise BackupError(f"pg_dump of '{target.database}' produced no output", "Run the backup again")


def _wait_for_checks(checker: threading.Thread, target: DatabaseTarget, phases: PhaseProgress | None) -> None:
    if phases is not None and checker.is_alive():  # the dump is done, its row counts not yet
        waited = time.monotonic()
        phases(Phase(f"checksums {target.role}"))
        checker.join()
        phases(Phase(f"checksums {target.role}", finished=True, seconds=time.monotonic() - waited,
                     detail="row counts and checksums in the dump's snapshot"))
    checker.join()


def _counted(chunks, counter: list[int]):
    """`chunks` as they are, their bytes added up in `counter[0]` (the zstd size before sealing)."""
    for chunk in chunks:
        counter[0] += len(chunk)
        yield chunk


def _dump(store: ObjectStore, key: str, snap: _Snapshot, options: BackupOptions, backup_id: str,
          pg_dump: str, progress: Progress | None, phases: PhaseProgress | None = None,
          data_key: DataKey | None = None) -> DatabaseDump:
    """pg_dump of one snapshot streamed compressed (and sealed, with a data key) into `key`,
    its tables checked beside it."""
    target = snap.target
    started = time.monotonic()
    command = [pg_dump, "--format=custom", "--compress=0", f"--snapshot={snap.snapshot_id}", "--no-password"]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, env=libpq_environment(target.url), bufsize=0
        )
        _widen_pipe(process.stdout)
        checker, checks = _start_checks(snap, options)
        reader = _CountingReader(process.stdout, f"{target.role} ({target.database})", snap.database_bytes, progress)
        compressed = [0]
        try:
            chunks = _counted(_compressed_chunks(process, stderr, reader, target, options), compressed)
            info = store.put_stream(key, seal(data_key, chunks), {"backup_id": backup_id, "role": target.role})
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
        _wait_for_checks(checker, target, phases)
    if "error" in checks:
        store.delete(key)
        error = checks["error"]
        raise BackupError(
            f"Counting rows of {target.role} database '{target.database}' inside the dump's snapshot failed: {error}",
            "Run the backup again; if it persists, run it with content checksums off",
        ) from error
    if progress is not None:
        progress(f"{target.role} ({target.database})", reader.count, reader.count)
    return DatabaseDump(
        role=target.role,
        database=target.database,
        where=where(target.url),
        key=key,
        server_version=str(snap.server_version),
        server_version_num=int(snap.server_version_num),
        snapshot_at=snap.snapshot_at,
        wal_lsn=snap.wal_lsn,
        dump_bytes=reader.count,
        compressed_bytes=info.size,
        sha256=info.sha256 or "",
        duration_s=round(time.monotonic() - started, 3),
        database_bytes=int(snap.database_bytes),
        tables=checks["tables"],
        zstd_bytes=compressed[0] if data_key is not None else None,
    )


def artifact_entries(store: ObjectStore, prefix: str, phases: PhaseProgress | None = None) -> list[dict[str, Any]]:
    """Key, size and sha256 of every object under `prefix`. MLflow writes artifacts itself,
    without the sha256 our store records, so those are hashed by reading them once (told to
    `phases` as the step `hash model artifacts`, in bytes: many models take a while)."""
    import hashlib

    from maestro_pipelines.formatting import human_bytes

    step, started = "hash model artifacts", time.monotonic()
    listed = list(store.list(prefix, with_metadata=True))
    unhashed = sum(info.size for info in listed if info.sha256 is None)
    tell = phases if phases is not None and unhashed else (lambda phase: None)
    tell(Phase(step, 0, unhashed, "bytes"))
    hashed = 0
    entries = []
    for info in listed:
        sha = info.sha256
        if sha is None:
            digest = hashlib.sha256()
            with store.open_read(info.key, verify=False) as reader:
                for block in iter(lambda: reader.read(MiB), b""):
                    digest.update(block)
            sha = digest.hexdigest()
            hashed += info.size
            tell(Phase(step, hashed, unhashed, "bytes", info.key.removeprefix(prefix)))
        entries.append({"key": info.key, "size": info.size, "sha256": sha})
    tell(Phase(step, finished=True, seconds=time.monotonic() - started,
               detail=f"{len(entries)} objects listed, {human_bytes(unhashed)} without a sha256 read and hashed"))
    return entries


def _artifact_manifest(store: ObjectStore, options: BackupOptions, root: str, backup_id: str,
                       phases: PhaseProgress | None, data_key: DataKey | None = None) -> ArtifactsRecord | None:
    """The backup's list of model artifacts (key, size, sha256), written beside its dumps
    (sealed with a data key: model names say which tenants there are)."""
    if not options.artifact_prefix:
        return None
    entries = artifact_entries(store, options.artifact_prefix, phases)
    body = json.dumps({"prefix": options.artifact_prefix, "objects": entries}, indent=1).encode()
    info = store.put_bytes(f"{root}/{ARTIFACTS_NAME}", b"".join(seal(data_key, [body])), {"backup_id": backup_id})
    return ArtifactsRecord(
        key=info.key, sha256=info.sha256 or "", size=info.size, prefix=options.artifact_prefix,
        count=len(entries), total_bytes=sum(e["size"] for e in entries),
    )


def _pg_dump_for(target: DatabaseTarget) -> str:
    """`target`'s pg_dump (MAESTRO_PG_BIN's, else the wheel's), refused before anything is
    opened when it cannot do the SSL the URL asks for."""
    pg_dump = program("pg_dump", target.client_programs)
    check_client(pg_dump, target.url, libpq_environment(target.url), target.source)
    return pg_dump


def _check_targets(targets: list[DatabaseTarget]) -> None:
    if not targets:
        raise BackupError("Nothing to back up: no database was given", "Check MAESTRO_DATABASE_URL")
    roles = [t.role for t in targets]
    if len(set(roles)) != len(roles):
        raise BackupError(f"Two databases have the same role in one backup: {roles}", "Give each a distinct role")


def manifest_json(manifest: BackupManifest, data_key: DataKey | None) -> bytes:
    """The manifest's stored bytes: with a data key, its envelope and then its MAC (signed
    last, over every other field); its digest either way. `manifest` gets both fields."""
    body = sign(put_envelope(manifest.to_dict(), data_key), data_key)
    manifest.encryption, manifest.mac = body.get("encryption"), body.get("mac")
    return record_json(body)


def create_backup(
    store: ObjectStore,
    targets: list[DatabaseTarget],
    options: BackupOptions | None = None,
    progress: Progress | None = None,
    notes: list[str] | None = None,
    phases: PhaseProgress | None = None,
) -> BackupManifest:
    """Back up `targets` into `store`; return the committed manifest. `progress` follows the
    bytes dumped; `phases` the hashing of model artifacts and a wait for a dump's checksums."""
    options = options or BackupOptions()
    _check_targets(targets)
    pg_dump_version = program_version("pg_dump", targets[0].client_programs)
    pg_dumps = {target.role: _pg_dump_for(target) for target in targets}
    started_at = utcnow()
    backup_id = new_backup_id(started_at)
    root = backup_root(backup_id)
    # Before anything is written: MAESTRO_BACKUP_ENCRYPTION=required without a key refuses
    # here, and an unreachable KMS fails the backup before minutes of dumping.
    data_key = new_data_key(store, f"backup {backup_id}")
    notes = list(notes or []) + [w for w in [unencrypted_warning(store)] if w]

    with activity(store, "backup", backup_id):
        snapshots: list[_Snapshot] = []
        try:
            for target in targets:
                snapshots.append(_Snapshot(target))
            for snap in snapshots:  # each server's version is known now; nothing is written yet
                check_dumps_server(pg_dumps[snap.target.role], str(snap.server_version), int(snap.server_version_num),
                                   snap.target.url, snap.target.source)
            artifacts = _artifact_manifest(store, options, root, backup_id, phases, data_key)
            dumps = []
            for snap in snapshots:
                key = f"{root}/{snap.target.role}{DUMP_SUFFIX}"
                dumps.append(_dump(store, key, snap, options, backup_id, pg_dumps[snap.target.role], progress, phases,
                                   data_key))
                snap.close()
            manifest = BackupManifest(
                backup_id=backup_id,
                started_at=started_at,
                finished_at=utcnow(),
                pg_dump_version=pg_dump_version,
                compression={"codec": "zstd", "level": options.compression_level, "threads": options.compression_threads},
                databases=dumps,
                artifacts=artifacts,
                notes=notes,
            )
            # The commit marker: from this write on, the backup exists.
            store.put_bytes(f"{root}/{MANIFEST_NAME}", manifest_json(manifest, data_key), {"backup_id": backup_id})
        except BaseException:
            # A failed backup removes what it wrote (a killed one leaves it to retention).
            remove_unfinished(store, root)
            raise
        finally:
            for snap in snapshots:
                snap.close()
    return manifest


def remove_unfinished(store: ObjectStore, root: str) -> None:
    """Best effort, for a backup or archive that failed under `root` (a folder no other
    process writes): the manifest first (a manifest write that failed may still have
    landed), then every object under the folder, then what unfinished uploads left (S3
    multipart uploads, temporary objects). What the store refuses now, retention sweeps."""
    for remove in (
        lambda: store.delete(f"{root}/{MANIFEST_NAME}"),
        lambda: [store.delete(info.key) for info in store.list(root + "/", with_metadata=False)],
        lambda: store.discard_unfinished(root + "/"),
    ):
        try:
            remove()
        except Exception:  # never hides the backup's own error
            pass
