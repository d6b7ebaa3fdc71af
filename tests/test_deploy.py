"""The deployment files: deploy/dagster.yaml and deploy/helm/values.yaml say the same thing,
both pass Dagster's own instance-config validation, and the limits they set name tags our
jobs really carry.

What is not tested here: the Helm chart's rendering and its values schema. The chart cannot
be fetched on these machines (no network but package registries), so the instance config the
chart would render from our values is rebuilt below from the chart's documented mapping and
validated by Dagster instead; `helm lint` belongs in the deploying pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config

DEPLOY = Path(__file__).parent.parent / "deploy"


@pytest.fixture(scope="module")
def instance_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "dagster.yaml").read_text())


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def rendered_by_chart(values: dict) -> dict:
    """The instance config the chart's configmap template renders from `values` (storage from
    `postgresql`, run coordinator and monitoring from `dagsterDaemon`, `retention`, then
    `additionalInstanceConfig` as is; the chart renders only some run_monitoring keys)."""
    pg = values["postgresql"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    retention = values["retention"]
    return {
        "storage": {"postgres": {"postgres_db": {
            "hostname": pg["postgresqlHost"], "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"}, "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"], "params": pg.get("postgresqlParams", {}),
            "scheme": pg["postgresqlScheme"],
        }}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]},
        **({"run_monitoring": {
            "enabled": True, "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        }} if monitoring["enabled"] else {}),
        "retention": {
            "schedule": {"purge_after_days": retention["schedule"]["purgeAfterDays"]},
            "sensor": {"purge_after_days": retention["sensor"]["purgeAfterDays"]},
            "auto_materialize": {"purge_after_days": retention["autoMaterialize"]["purgeAfterDays"]},
        },
        "telemetry": values["telemetry"],
        **values["additionalInstanceConfig"],
    }


def validated(config: dict, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dagster_instance_config(str(folder))[0]


def test_both_files_pass_dagsters_instance_validation(instance_yaml, helm_values, tmp_path, monkeypatch):
    monkeypatch.setenv("MAESTRO_DAGSTER_DATABASE_URL", "postgresql://dagster@db/dagster")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    assert validated(instance_yaml, tmp_path / "file")["storage"]["postgres"]["postgres_url"] == {
        "env": "MAESTRO_DAGSTER_DATABASE_URL"
    }
    validated(rendered_by_chart(helm_values), tmp_path / "helm")

    # The check that caught the first version of these files: run limits on the coordinator
    # and `concurrency` together are refused by Dagster.
    broken = {**instance_yaml, "run_coordinator": {**instance_yaml["run_coordinator"], "config": {"max_concurrent_runs": 3}}}
    with pytest.raises(DagsterInvalidConfigError, match="incompatible"):
        validated(broken, tmp_path / "broken")


def test_the_helm_values_say_what_dagster_yaml_says(instance_yaml, helm_values):
    assert helm_values["additionalInstanceConfig"]["concurrency"] == instance_yaml["concurrency"]
    # Verbatim, and the chart's own rendering off: it would drop keys (free_slots_after_run_end_seconds).
    assert helm_values["additionalInstanceConfig"]["run_monitoring"] == instance_yaml["run_monitoring"]
    assert helm_values["dagsterDaemon"]["runMonitoring"]["enabled"] is False
    assert instance_yaml["run_monitoring"]["free_slots_after_run_end_seconds"] > 0  # pools are used
    for kind, settings in instance_yaml["retention"].items():
        days = helm_values["retention"][camel(kind)]["purgeAfterDays"]
        expected = settings["purge_after_days"]
        assert days == expected or {k: v for k, v in days.items() if k in expected} == expected, kind
    assert helm_values["telemetry"] == instance_yaml["telemetry"]
    # SQLAlchemy maps a bare postgresql:// to psycopg 3, which dagster-postgres cannot use.
    assert helm_values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"


def test_every_run_limit_names_a_tag_our_jobs_carry(instance_yaml):
    """A renamed tag would silently lift a limit: each limited tag is on at least one job, and
    every job that dumps, restores or alters databases is in the database lane."""
    from maestro_pipelines.definitions import defs

    jobs = {job.name: job.tags for job in defs.get_repository_def().get_all_jobs() if not job.name.startswith("__")}
    for limit in instance_yaml["concurrency"]["runs"]["tag_concurrency_limits"]:
        assert any(tags.get(limit["key"]) == limit["value"] for tags in jobs.values()), limit
    lane = {name for name, tags in jobs.items() if tags.get("maestro/lane") == "database"}
    assert lane == {"nightly_backup", "monthly_archive_job", "restore_database", "restore_cleanup_job",
                    "dr_drill_job", "platform_upkeep", "nightly_base_backup", "pitr_drill_job"}
