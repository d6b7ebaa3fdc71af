"""Software-defined assets, one module per part of the graph.

`platform`: the platform database's schema. `ml`: the per-tenant ML graph, from training data
to batch predictions. `backups`: the nightly database backup and the monthly archive. `drills`: the weekly DR drill
with its RTO/RPO checks. `pitr`: base backups, the WAL archive and the weekly PITR drill. `upkeep`: statistics views, prediction partitions, slow queries and
the platform summary.

Adding an asset: write it in the module of its part of the graph (or a new module here) as a
thin wrapper over a library function (the one the CLI calls, imported inside the body so
loading the definitions stays cheap); take its pool, retry policy, tags, progress log and
metadata tables from `maestro_pipelines.dagster_support`, its policies from `objectives.py`
or the library; decorate the body with `fail_fast_on_user_errors` (`backup_step` for the
backup store); add it to the module's list (`ml_assets`, `backup_assets`, ...) or, for a new
module, to `all_assets` below, which `definitions.py` registers. Then regenerate
tests/snapshots/definitions.json (MAESTRO_UPDATE_SNAPSHOTS=1, tests/test_definitions.py).
"""

from maestro_pipelines.assets.backups import backup_assets
from maestro_pipelines.assets.checks import ml_duration_checks
from maestro_pipelines.assets.drills import drill_assets
from maestro_pipelines.assets.ml import ml_assets
from maestro_pipelines.assets.pitr import pitr_assets
from maestro_pipelines.assets.platform import platform_schema
from maestro_pipelines.assets.upkeep import upkeep_assets

all_assets = [platform_schema, *ml_assets, *ml_duration_checks, *backup_assets, *drill_assets, *pitr_assets, *upkeep_assets]

__all__ = ["all_assets"]
