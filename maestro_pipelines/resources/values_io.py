"""`StoredValuesIOManager`: asset values in the object store (the `io_manager` of every asset).

Thin: where a value lives and how it is encoded is `maestro_pipelines.ml.values`; the store is
the `ObjectStoreResource` the backups use (MAESTRO_STORE_URL, any backend). A missing or
corrupt value fails the step at once with one line (retrying cannot bring it back); a store
that stopped answering is transient and retried under the step's RetryPolicy.
"""

from typing import Any

import dagster as dg

from maestro_pipelines.failures import fail_fast_on_user_errors
from maestro_pipelines.resources.object_store import ObjectStoreResource


class StoredValuesIOManager(dg.ConfigurableIOManager):
    """Stores each asset partition's value under `values/<asset>/<partition>` of the object
    store: DataFrames as Parquet, feature sets as Parquet with a JSON footer, records as JSON.
    Nothing is pickled; models are referenced by their MLflow URI."""

    store: dg.ResourceDependency[ObjectStoreResource]

    @fail_fast_on_user_errors
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        from maestro_pipelines.ml.values import write_value

        if obj is None and not context.has_asset_key:  # an op's "done": no value to pass on
            return
        address = _output_address(context)
        info = write_value(self.store.get_store(), address, obj)
        context.add_output_metadata({
            "stored_at": dg.MetadataValue.text(f"{self.store.get_store().url}/{address.key}"),
            "stored_bytes": info.size,
            "stored_sha256": dg.MetadataValue.text(info.sha256 or ""),
        })

    @fail_fast_on_user_errors
    def load_input(self, context: dg.InputContext) -> Any:
        from maestro_pipelines.ml.values import read_value

        store = self.store.get_store()
        record_type = context.dagster_type.typing_type if context.dagster_type else None
        record_type = record_type if isinstance(record_type, type) else None
        if context.has_asset_key and context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            path = list(context.asset_key.path)
            return {partition: read_value(store, _address(path, partition), record_type)
                    for partition in context.asset_partition_keys}
        return read_value(store, _input_address(context), record_type)


def _address(path: list[str], partition: str | None):
    from maestro_pipelines.ml.values import value_address

    return value_address(path, partition)


def _output_address(context: dg.OutputContext):
    from maestro_pipelines.ml.values import run_output_address

    if context.has_asset_key:
        return _address(list(context.asset_key.path), context.asset_partition_key if context.has_asset_partitions else None)
    return run_output_address(context.run_id, context.step_key, context.name)


def _input_address(context: dg.InputContext):
    if context.has_asset_key:
        return _address(list(context.asset_key.path), context.asset_partition_key if context.has_asset_partitions else None)
    return _output_address(context.upstream_output)
