"""Jobs of the physical tier: the nightly base backup and the weekly PITR drill (the assets of
`assets/pitr.py`), tagged like the other backup-family jobs so failures alert."""

import dagster as dg

from maestro_pipelines.assets.pitr import PITR_DRILL_KIND, base_backup, pitr_drill
from maestro_pipelines.dagster_support import run_tags

nightly_base_backup = dg.define_asset_job(
    "nightly_base_backup",
    selection=dg.AssetSelection.assets(base_backup),
    description="A base backup of each server whose WAL is archived: with the WAL archive, restores to any second since.",
    tags=run_tags("backup", 3 * 3600, database_lane=True),
)

pitr_drill_job = dg.define_asset_job(
    "pitr_drill_job",
    selection=dg.AssetSelection.assets(pitr_drill),
    description="The point-in-time recovery drill: marker, WAL archived, recovery to just after it, pg_amcheck, RTO/RPO.",
    tags=run_tags(PITR_DRILL_KIND, 2 * 3600, database_lane=True),  # it writes marker rows and starts a server
)

pitr_jobs = [nightly_base_backup, pitr_drill_job]
