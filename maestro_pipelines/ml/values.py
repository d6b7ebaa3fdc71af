"""Asset values in the object store: where each one lives and how it is encoded.

A value is one object under `values/` of the store (MAESTRO_STORE_URL, the backups' store),
so a step on another machine or in a fresh pod reads what the step before it wrote. One
object per value: the store makes an object visible only once it is completely written with
its sha256, so a killed step leaves the previous value (or none), never a half-written one
that reads as good; a read verifies the sha256 before a byte is decoded.

Encodings, each self-describing (nothing is pickled):

- a pandas DataFrame: Parquet (pyarrow). A column of dicts with the same keys and scalar
  values (the demo's `features` JSON) is a Parquet struct; any other column of dicts or lists
  is stored as JSON text and parsed back.
- a `FeatureSet`: one Parquet table (train rows then test rows, with the label and the
  split as columns) whose footer holds the small JSON rest (tenant, feature names, classes,
  data hash).
- a record (a dataclass of JSON values, such as the trained model's MLflow URI) or plain
  JSON data: a JSON document. Non-finite floats (NaN) are stored as null.

A library: no Dagster. `maestro_pipelines.resources.values_io` is the Dagster IO manager over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

from maestro_pipelines.errors import MaestroError
from maestro_pipelines.storage import ChecksumMismatch, ObjectInfo, ObjectNotFound, ObjectStore

VALUES_PREFIX = "values"
"""Where values live in the store, beside `backups/`, `monthly/` and `mlflow-artifacts/`."""
UNPARTITIONED = "_unpartitioned"
"""The last key segment of an asset without partitions (a tenant name starts with a letter)."""
FOOTER_KEY = b"maestro.value"
SPILL_BYTES = 64 * 1024 * 1024
"""Values up to this size are encoded in memory; larger ones spill to a temporary file."""
_LABEL, _SPLIT = "__maestro_label", "__maestro_split"


@dataclass(frozen=True)
class ValueAddress:
    """One asset partition's value: its key in the store and how messages name it."""

    asset: str
    partition: str | None
    key: str

    @property
    def described(self) -> str:
        return f"{self.asset} for {self.partition}" if self.partition is not None else self.asset


def value_address(asset_path: list[str], partition: str | None = None) -> ValueAddress:
    """`values/<asset path>/<partition>` (`_unpartitioned` without one)."""
    last = _segment(partition) if partition is not None else UNPARTITIONED
    key = "/".join([VALUES_PREFIX, *(_segment(part) for part in asset_path), last])
    return ValueAddress("/".join(asset_path), partition, key)


def run_output_address(run_id: str, step_key: str, output_name: str) -> ValueAddress:
    """An op's output (no asset): kept under the run that made it."""
    key = "/".join([VALUES_PREFIX, "_runs", _segment(run_id), _segment(step_key), _segment(output_name)])
    return ValueAddress(f"{step_key}.{output_name}", None, key)


def _segment(text: str) -> str:
    quoted = quote(str(text), safe="-_=@+,")
    return quoted.replace(".", "%2E") if quoted.strip(".") == "" or quoted.startswith(".") else quoted


# ---- writing ---------------------------------------------------------------------------------


def write_value(store: ObjectStore, address: ValueAddress, value: Any) -> ObjectInfo:
    """Encode `value` and store it as one object (visible only once complete, sha256 recorded)."""
    with tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES) as spool:
        kind = _encode(value, spool, address)
        spool.seek(0)
        return store.put_stream(address.key, spool, metadata={"value_kind": kind})


def _encode(value: Any, out: BinaryIO, address: ValueAddress) -> str:
    import pandas as pd

    from maestro_pipelines.ml.features import FeatureSet

    if isinstance(value, pd.DataFrame):
        _write_parquet(*_frame_table(value, address), out)
        return "dataframe"
    if isinstance(value, FeatureSet):
        _write_parquet(*_feature_set_table(value, address), out)
        return "feature_set"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        document = {"record": type(value).__name__, "fields": dataclasses.asdict(value)}
        kind = "record"
    else:
        document, kind = {"json": value}, "json"
    try:
        out.write(json.dumps(_finite(document), allow_nan=False, sort_keys=True).encode())
    except (TypeError, ValueError) as exc:
        raise _unstorable(address, value, f"not JSON ({exc})") from None
    return kind


def _unstorable(address: ValueAddress, value: Any, why: str) -> MaestroError:
    return MaestroError(
        f"{address.described} returned a {type(value).__name__} that cannot be stored: {why}",
        "Return a pandas DataFrame, a FeatureSet, a dataclass of JSON values or JSON data, or return "
        "dg.MaterializeResult and keep the value where it lives (MLflow, the platform database)",
    )


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has no such numbers); everything else as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # a NumPy scalar
        return _finite(value.item())
    return value


def _frame_table(frame, address: ValueAddress):
    import pyarrow as pa

    json_columns = [str(name) for name in frame.columns if _needs_json(frame[name])]
    if json_columns:
        frame = frame.assign(**{name: frame[name].map(_json_or_none) for name in json_columns})
    try:
        table = pa.Table.from_pandas(frame)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise _unstorable(address, frame, f"not Parquet ({exc})") from None
    return table, {"kind": "dataframe", "json_columns": json_columns}


def _needs_json(column) -> bool:
    """A column of dicts or lists that a Parquet struct would not give back as it is."""
    if column.dtype != object:
        return False
    values = column.dropna()
    if not len(values) or not isinstance(values.iloc[0], (dict, list, tuple)):
        return False
    first = values.iloc[0]
    if not isinstance(first, dict) or not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        return True  # lists come back as arrays, missing keys as None
    return not _scalar_struct(values)


def _scalar_struct(values) -> bool:
    import pyarrow as pa

    try:
        inferred = pa.array(values.iloc[:1000].tolist()).type
    except (pa.ArrowException, TypeError, ValueError):
        return False
    scalar = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string, pa.types.is_boolean, pa.types.is_null)
    return pa.types.is_struct(inferred) and all(any(test(f.type) for test in scalar) for f in inferred)


def _json_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return json.dumps(_finite(value), allow_nan=False)


def _feature_set_table(features, address: ValueAddress):
    import pandas as pd
    import pyarrow as pa

    clash = {_LABEL, _SPLIT} & set(map(str, features.feature_names))
    if clash:
        raise _unstorable(address, features, f"a feature is named {', '.join(sorted(clash))}, a name Maestro reserves")
    frame = pd.concat([
        features.X_train.assign(**{_LABEL: features.y_train.to_numpy(), _SPLIT: "train"}),
        features.X_test.assign(**{_LABEL: features.y_test.to_numpy(), _SPLIT: "test"}),
    ], ignore_index=True)
    rest = {
        "kind": "feature_set", "tenant": features.tenant, "feature_names": list(features.feature_names),
        "classes": _finite(list(features.classes)), "data_hash": features.data_hash,
        "label_name": features.y_train.name,
    }
    return pa.Table.from_pandas(frame, preserve_index=False), rest


def _write_parquet(table, footer: dict, out: BinaryIO) -> None:
    import pyarrow.parquet as pq

    metadata = {**(table.schema.metadata or {}), FOOTER_KEY: json.dumps(footer).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), out)


# ---- reading ---------------------------------------------------------------------------------


def read_value(store: ObjectStore, address: ValueAddress, record_type: type | None = None) -> Any:
    """The stored value, verified before it is decoded. A record comes back as `record_type`
    (a dataclass) when given, else as a dict of its fields."""
    data = _fetch(store, address)
    if data[:4] == b"PAR1":
        import pyarrow as pa

        return _decode_parquet(pa.BufferReader(data))  # no copy: a value's Parquet is smaller than its frame
    return _decode_json(json.loads(data), address, record_type)


def _fetch(store: ObjectStore, address: ValueAddress) -> bytes:
    """The object's bytes, read to the end: the last byte checks the sha256 the write recorded."""
    try:
        return store.get_bytes(address.key)
    except ObjectNotFound:
        raise MaestroError(
            f"no stored value of {address.described} in the store at {store.url} ({address.key})",
            f"Materialize {address.described} first: its value is written there when it is materialized",
        ) from None
    except ChecksumMismatch as exc:
        raise MaestroError(
            f"the stored value of {address.described} in the store at {store.url} is corrupt "
            f"({exc.problem.rsplit(': ', 1)[-1]})",
            f"Materialize {address.described} again to write it anew",
        ) from None


def _decode_parquet(source):
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    footer = json.loads((table.schema.metadata or {}).get(FOOTER_KEY, b"{}"))
    if footer.get("kind") == "feature_set":
        return _feature_set(table.to_pandas(), footer)
    frame = table.to_pandas()
    for name in footer.get("json_columns", []):
        frame[name] = frame[name].map(lambda text: json.loads(text) if text is not None else None)
    return frame


def _feature_set(frame, footer: dict):
    from maestro_pipelines.ml.features import FeatureSet

    names = footer["feature_names"]
    train, test = frame[frame[_SPLIT] == "train"], frame[frame[_SPLIT] == "test"]

    def labels(part):
        return part[_LABEL].rename(footer.get("label_name")).reset_index(drop=True)

    return FeatureSet(
        tenant=footer["tenant"], feature_names=names,
        X_train=train[names].reset_index(drop=True), y_train=labels(train),
        X_test=test[names].reset_index(drop=True), y_test=labels(test),
        classes=footer["classes"], data_hash=footer["data_hash"],
    )


def _decode_json(document: dict, address: ValueAddress, record_type: type | None) -> Any:
    if "json" in document:
        return document["json"]
    fields = document["fields"]
    if record_type is None or not dataclasses.is_dataclass(record_type):
        return fields
    if document["record"] != record_type.__name__:
        raise MaestroError(
            f"the stored value of {address.described} is a {document['record']}, not the {record_type.__name__} "
            "its consumer reads",
            f"Materialize {address.described} again with this code",
        )
    known = {f.name for f in dataclasses.fields(record_type)}
    return record_type(**{name: value for name, value in fields.items() if name in known})
