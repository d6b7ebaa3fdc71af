"""Writing and reading a `training_data` value through the IO manager vs plain Parquet to the
same store.

    python -m benchmarks.io_values [--rows 1000000] [--rounds 2] [--no-s3] [--results PATH]

The frame has the shape `training_data` reads from the default source (`training_rows`):
id, tenant, entity_key, a `features` dict of 30 floats per row (the jsonb column), label, a
UTC `updated_at`. Per store (the local folder store, and S3 on a moto server in its own
process):

- ours: `StoredValuesIOManager.handle_output` then `load_input` (Dagster's output and input
  contexts of the partition `acme`), i.e. the column checks, Parquet via pyarrow with the
  footer, the spool, `put_stream`, the sha256 verified before decoding;
- baseline: `pyarrow.Table.from_pandas` + `pq.write_table` into memory, `put_bytes`, then
  `get_bytes` (verified too) and `pq.read_table(...).to_pandas()`.

Best of `--rounds` for each. Target: ours within 1.5x of the plain Parquet round trip.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_results_option, print_rows, r, row, write_results
from tests.services import free_port, wait_for_port

TARGET_RATIO = 1.5
AWS = {"region_name": "us-east-1", "aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
BUCKET = "maestro-bench"
TENANT = "acme"


def training_frame(rows: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(20261201)
    names = [f"feature_{i:02d}" for i in range(30)]
    values = rng.random((rows, len(names))).round(6)
    return pd.DataFrame({
        "id": np.arange(1, rows + 1, dtype="int64"),
        "tenant": TENANT,
        "entity_key": [f"{TENANT}-{i:07d}" for i in range(rows)],
        "features": [dict(zip(names, row)) for row in values.tolist()],
        "label": rng.integers(0, 2, rows).astype(str),
        "updated_at": pd.date_range("2026-11-01", periods=rows, freq="s", tz="UTC"),
    })


def through_io_manager(io_manager, frame) -> tuple[float, float]:
    import dagster as dg

    partitions = dg.StaticPartitionsDefinition([TENANT])
    started = time.perf_counter()
    io_manager.handle_output(dg.build_output_context(asset_key="training_data", partition_key=TENANT,
                                                     asset_partitions_def=partitions), frame)
    written = time.perf_counter()
    anything = dg.DagsterType(lambda _context, _value: True, name="Any")  # an input without a type
    back = io_manager.load_input(dg.build_input_context(asset_key="training_data", partition_key=TENANT,
                                                        asset_partitions_def=partitions, dagster_type=anything))
    assert len(back) == len(frame)
    return written - started, time.perf_counter() - written


def plain_parquet(store, frame) -> tuple[float, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame), buffer)
    store.put_bytes("bench/plain.parquet", buffer.getbuffer())
    written = time.perf_counter()
    back = pq.read_table(io.BytesIO(store.get_bytes("bench/plain.parquet"))).to_pandas()
    assert len(back) == len(frame)
    return written - started, time.perf_counter() - written


def measure(label: str, resource, frame, rounds: int) -> list[dict]:
    from maestro_pipelines.resources.values_io import StoredValuesIOManager

    io_manager = StoredValuesIOManager(store=resource)
    ours = [through_io_manager(io_manager, frame) for _ in range(rounds)]
    plain = [plain_parquet(resource.get_store(), frame) for _ in range(rounds)]
    rows = []
    for what, index in (("write", 0), ("read", 1)):
        mine, theirs = min(o[index] for o in ours), min(p[index] for p in plain)
        rows.append(row(f"{label}: {what} {len(frame):,} rows (s)", r(mine, 3), r(theirs, 3), r(mine / theirs), None, None))
    mine, theirs = min(sum(o) for o in ours), min(sum(p) for p in plain)
    ratio = mine / theirs
    rows.append(row(f"{label}: write + read (s)", r(mine, 3), r(theirs, 3), r(ratio), f"<= {TARGET_RATIO}x",
                    ratio <= TARGET_RATIO))
    return rows


def s3_rows(frame, rounds: int, workdir: Path) -> list[dict]:
    import boto3

    from maestro_pipelines.resources import ObjectStoreResource

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, server, None)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **AWS).create_bucket(Bucket=BUCKET)
        resource = ObjectStoreResource(url=f"s3://{BUCKET}/maestro", endpoint_url=endpoint, **AWS)
        return measure("S3 (moto)", resource, frame, rounds)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true", help="the local store only")
    add_results_option(parser, "io_values")
    args = parser.parse_args()

    from maestro_pipelines.resources import ObjectStoreResource

    frame = training_frame(args.rows)
    with tempfile.TemporaryDirectory(prefix="maestro-io-values-") as workdir:
        (Path(workdir) / "store").mkdir()
        local = ObjectStoreResource(url=(Path(workdir) / "store").as_uri())
        rows = measure("local store", local, frame, args.rounds)
        if not args.no_s3:
            rows += s3_rows(frame, args.rounds, Path(workdir))
    print_rows(rows)
    write_results(args.results, {"rows_in_frame": args.rows, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
