"""Jobs: asset selections and op jobs launched by schedules, sensors and on-call."""

from maestro_pipelines.jobs.backups import backup_jobs
from maestro_pipelines.jobs.pitr import pitr_jobs
from maestro_pipelines.jobs.ml import rollback_deployment, train_and_deploy_job
from maestro_pipelines.jobs.restore import restore_jobs
from maestro_pipelines.jobs.upkeep import upkeep_jobs

all_jobs = [train_and_deploy_job, rollback_deployment, *backup_jobs, *pitr_jobs, *restore_jobs, *upkeep_jobs]
