"""Software-defined assets, one module per part of the graph.

`platform`: the platform database's schema. `ml`: the per-tenant ML graph, from training data
to batch predictions. `backups`: the nightly database backup and the monthly archive. `drills`: the weekly DR drill
with its RTO/RPO checks. `upkeep`: statistics views, prediction partitions, slow queries and
the platform summary.
"""

from maestro_pipelines.assets.backups import backup_assets
from maestro_pipelines.assets.checks import ml_duration_checks
from maestro_pipelines.assets.drills import drill_assets
from maestro_pipelines.assets.ml import ml_assets
from maestro_pipelines.assets.platform import platform_schema
from maestro_pipelines.assets.upkeep import upkeep_assets

all_assets = [platform_schema, *ml_assets, *ml_duration_checks, *backup_assets, *drill_assets, *upkeep_assets]

__all__ = ["all_assets"]
