"""Software-defined assets, one module per part of the graph.

`platform`: the platform database's schema. The ML graph (training data to batch
predictions), backups, drills and upkeep assets land here as their issues are built.
"""

from maestro_pipelines.assets.platform import platform_schema

all_assets = [platform_schema]

__all__ = ["all_assets"]
