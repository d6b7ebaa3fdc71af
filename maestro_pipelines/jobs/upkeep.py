"""The daily platform upkeep: every asset of the `upkeep` group in one run (statistics views,
prediction partitions, slow queries, the summary). Tagged `maestro/kind: upkeep`, so a failed
run alerts like a failed backup (an archive that keeps failing lets old partitions pile up)."""

import dagster as dg

from maestro_pipelines.assets.upkeep import UPKEEP_GROUP
from maestro_pipelines.dagster_support import run_tags

UPKEEP_KIND = "upkeep"
UPKEEP_MAX_RUNTIME_S = 2 * 3600

platform_upkeep = dg.define_asset_job(
    "platform_upkeep",
    selection=dg.AssetSelection.groups(UPKEEP_GROUP),
    description="Refresh the statistics views, keep the prediction partitions, list slow queries, summarize the platform.",
    tags=run_tags(UPKEEP_KIND, UPKEEP_MAX_RUNTIME_S, database_lane=True),
)

upkeep_jobs = [platform_upkeep]
