"""MACs of JSON records (manifests, base backup records, verification records, WAL key records).

The MAC is HMAC-SHA256 keyed from the record's data key, over the canonical JSON of the record
without its `mac` and `digest` and without the envelope's wrapping (`kek_id`, `wrapped_key`):
a rotation rewraps the data key without invalidating the MAC, while anyone without the key
cannot make a record that passes, nor move one record's envelope into another (the MAC then
fails under the other data key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from maestro_pipelines.crypto.keys import DataKey

UNSIGNED = ("mac", "digest")
WRAPPING = ("kek_id", "wrapped_key")


def signed_part(body: dict[str, Any]) -> bytes:
    """The canonical bytes the MAC covers."""
    part = {name: value for name, value in body.items() if name not in UNSIGNED}
    if isinstance(part.get("encryption"), dict):
        part["encryption"] = {k: v for k, v in part["encryption"].items() if k not in WRAPPING}
    return json.dumps(part, sort_keys=True, separators=(",", ":")).encode()


def record_mac(body: dict[str, Any], data_key: DataKey) -> str:
    return hmac.new(data_key.subkey(b"record mac v1"), signed_part(body), hashlib.sha256).hexdigest()


def record_mac_valid(body: dict[str, Any], data_key: DataKey) -> bool:
    mac = body.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, record_mac(body, data_key))
