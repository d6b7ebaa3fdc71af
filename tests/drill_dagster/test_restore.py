"""restore_database and restore_cleanup_job launched in process as on-call would from the
launchpad: real backups of the embedded PostgreSQL in a local store (and moto S3), real
pg_restores."""

from __future__ import annotations

from maestro_pipelines.jobs.restore import drop_restore_leftovers, restore_from_backup
from maestro_pipelines.platform_db.connection import engine_for
from maestro_pipelines.platform_db.tenants import add_tenant

from .conftest import TENANTS


def step_failures(result) -> list[str]:
    """The one-line messages on-call reads (a Failure's description)."""
    return [
        e.event_specific_data.error.message.removeprefix("dagster._core.definitions.events.Failure: ").strip()
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]


def retried(result) -> bool:
    return any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def output_metadata(result, op: str) -> dict:
    (event,) = [e for e in result.events_for_node(op) if e.event_type_value == "STEP_OUTPUT"]
    return event.event_specific_data.metadata


def by_role(table) -> dict[str, dict]:
    return {row.data["role"]: row.data for row in table.records}


def test_a_scratch_restore_sits_next_to_the_live_databases_until_cleanup(drill_env):
    backup = drill_env.take_backup()
    platform = drill_env.databases.platform

    result = drill_env.run("restore_database")
    assert result.success, step_failures(result)
    metadata = output_metadata(result, "restore_from_backup")
    assert metadata["backup_id"].value == backup.backup_id and metadata["target"].value == "scratch"
    databases = by_role(metadata["databases"].value)
    assert set(databases) == {"platform", "mlflow"}
    restored = databases["platform"]["restored_as"]
    assert restored.startswith(f"{platform}_restore_") and databases["platform"]["kept_as"] == ""
    assert databases["platform"]["live"] == platform and databases["platform"]["rows"] >= len(TENANTS)
    assert databases["mlflow"]["restored_as"].startswith(f"{platform}_mlflow_restore_")
    # The data is there, the live database untouched.
    assert drill_env.tenants(restored) == sorted(TENANTS) == drill_env.tenants(platform)
    steps = [row.data["step"] for row in metadata["steps"].value.records]
    assert steps[:3] == ["check versions", "download and check", "pg_restore platform"] and "swap" not in steps
    assert all(row.data["seconds"] >= 0 for row in metadata["steps"].value.records)
    assert f"restored into `{restored}`" in metadata["where_now"].value
    assert metadata["missing_artifacts"].value == "none"
    assert "maestro restore cleanup" in metadata["next_step"].value
    logs = [e.user_message for e in drill_env.instance.all_logs(result.run_id) if e.user_message]
    assert any("maestro restore cleanup" in m for m in logs) and any(m.startswith("downloading backup") for m in logs)

    # Cleanup: a dry run drops nothing; by default the scratch restores go (as with the CLI).
    leftovers = drill_env.leftovers()
    assert restored in leftovers and len(leftovers) == 2
    dry = drill_env.run("restore_cleanup_job", {"dry_run": True})
    assert dry.success
    dry_metadata = output_metadata(dry, "drop_restore_leftovers")
    assert dry_metadata["dry_run"].value is True and dry_metadata["found"].value == 2 and dry_metadata["dropped"].value == 0
    assert {row.data["action"] for row in dry_metadata["leftovers"].value.records} == {"would drop"}
    assert drill_env.leftovers() == leftovers
    done = drill_env.run("restore_cleanup_job")
    assert done.success and output_metadata(done, "drop_restore_leftovers")["dropped"].value == 2
    assert drill_env.leftovers() == [] and platform in drill_env.database_names()


def test_a_live_restore_needs_the_confirmation_then_swaps_and_keeps_the_old_database(drill_env):
    platform = drill_env.databases.platform
    drill_env.take_backup()
    # A tenant added after the backup: what the live restore rolls back.
    with engine_for(drill_env.databases.server.admin_url.set(database=platform)).begin() as conn:
        add_tenant(conn, "hooli", "Hooli")

    refused = drill_env.run("restore_database", {"target": "live"})
    assert not refused.success and not retried(refused)
    (message,) = step_failures(refused)
    assert message.startswith(f"Restoring into the live databases ({platform}, {platform}_mlflow) replaces them. ")
    assert f"Confirm with --confirm {platform} (job: confirm: {platform})" in message
    wrong = drill_env.run("restore_database", {"target": "live", "confirm": "maestro"})
    assert not wrong.success
    assert f"the confirmation 'maestro' does not name {platform}. Confirm with" in step_failures(wrong)[0]
    assert drill_env.leftovers() == [], "a refused restore touches nothing"
    assert "hooli" in drill_env.tenants(platform)

    result = drill_env.run("restore_database", {"target": "live", "confirm": platform})
    assert result.success, step_failures(result)
    metadata = output_metadata(result, "restore_from_backup")
    databases = by_role(metadata["databases"].value)
    kept = databases["platform"]["kept_as"]
    assert databases["platform"]["restored_as"] == platform and kept.startswith(f"{platform}_pre_restore_")
    assert databases["mlflow"]["kept_as"].startswith(f"{platform}_mlflow_pre_restore_")
    assert f"swapped into place as `{platform}`; the old one is kept as `{kept}`" in metadata["where_now"].value
    assert "swap" in [row.data["step"] for row in metadata["steps"].value.records]
    assert drill_env.tenants(platform) == sorted(TENANTS), "the live database is the backup's now"
    assert "hooli" in drill_env.tenants(kept), "the old one is kept aside"

    # The old live databases are the only way back: the job's defaults (like the CLI's) keep
    # them; a wrong confirmation is refused; the platform database's name drops them.
    default = drill_env.run("restore_cleanup_job")
    assert default.success and output_metadata(default, "drop_restore_leftovers")["dropped"].value == 0
    actions = {row.data["database"]: row.data["action"]
               for row in output_metadata(default, "drop_restore_leftovers")["leftovers"].value.records}
    assert actions[kept] == f"kept: the way back from that restore; drop it with --confirm {platform}"
    assert kept in drill_env.database_names()
    wrong = drill_env.run("restore_cleanup_job", {"confirm": f"{platform}_mlflow"})
    assert not wrong.success and f"confirm: {platform}" in step_failures(wrong)[0]
    assert kept in drill_env.database_names()
    assert drill_env.run("restore_cleanup_job", {"confirm": platform}).success
    names = drill_env.database_names()
    assert kept not in names and platform in names and drill_env.leftovers() == []


def test_restore_points_by_time_and_input_on_call_gets_wrong(drill_env):
    first = drill_env.take_backup()
    second = drill_env.take_backup()
    assert second.snapshot_at > first.snapshot_at

    before = second.snapshot_at.isoformat()
    result = drill_env.run("restore_database", {"before": before, "databases": ["platform"]})
    assert result.success, step_failures(result)
    metadata = output_metadata(result, "restore_from_backup")
    assert metadata["backup_id"].value == first.backup_id
    assert set(by_role(metadata["databases"].value)) == {"platform"}

    cases = {
        "not a time": ({"before": "last tuesday"}, "before 'last tuesday' is not a time. Write it as ISO 8601"),
        "both": ({"backup": second.backup_id, "before": before}, "Both backup ("),
        "too early": ({"before": "2020-01-01T00:00:00Z"}, "There is no verified backup taken before 2020-01-01T00:00:00+00:00"),
        "unknown role": ({"databases": ["warehouse"]}, "No database is configured for the backup's 'warehouse' database"),
        "dagster live": (
            {"target": "live", "confirm": drill_env.databases.platform, "databases": ["dagster"]},
            "Dagster's own database cannot be restored live from a Dagster run",
        ),
    }
    for name, (config, expected) in cases.items():
        failed = drill_env.run("restore_database", config)
        assert not failed.success and not retried(failed), name
        (message,) = step_failures(failed)
        assert expected in message, (name, message)
    # Only the platform's scratch restore of the first case is left: the refused ones touched nothing.
    assert [name.rsplit("_restore_", 1)[0] for name in drill_env.leftovers()] == [drill_env.databases.platform]


def test_restore_ops_share_the_backup_pool_and_jobs_are_tagged_for_alerts():
    from maestro_pipelines.assets.backups import BACKUP_POOL
    from maestro_pipelines.definitions import defs
    from maestro_pipelines.sensors.backups import ALERTED_KINDS

    assert restore_from_backup.pool == BACKUP_POOL and drop_restore_leftovers.pool == BACKUP_POOL
    for job, kind in [("restore_database", "restore"), ("restore_cleanup_job", "restore"), ("dr_drill_job", "drill")]:
        tags = defs.resolve_job_def(job).tags
        assert tags["maestro/kind"] == kind and kind in ALERTED_KINDS
        assert int(tags["dagster/max_runtime"]) > 0


def test_the_restore_job_brings_back_dropped_databases_from_s3(drill_env, moto_endpoint):
    """The worst night, through the launchpad: the platform database and MLflow's registry
    are both dropped; restore_database (target live) brings both back from S3 (moto over
    HTTP), with every tenant and the model aliased `production`."""
    import boto3
    from mlflow.tracking import MlflowClient

    from maestro_pipelines.backup.restore import drop_database
    from maestro_pipelines.resources import ObjectStoreResource
    from tests.stores.conftest import AWS

    from .conftest import MODEL

    boto3.client("s3", endpoint_url=moto_endpoint, **AWS).create_bucket(Bucket="maestro-dr")
    drill_env.resources["store"] = ObjectStoreResource(url="s3://maestro-dr/backups", endpoint_url=moto_endpoint, **AWS)
    manifest = drill_env.take_backup()
    platform, server = drill_env.databases.platform, drill_env.databases.server
    for name in (platform, f"{platform}_mlflow"):
        drop_database(server.admin_url, name)
    assert platform not in drill_env.database_names()

    result = drill_env.run("restore_database", {"target": "live", "confirm": platform})

    assert result.success, step_failures(result)
    databases = by_role(output_metadata(result, "restore_from_backup")["databases"].value)
    assert {role: row["kept_as"] for role, row in databases.items()} == {"platform": "", "mlflow": ""}, "nothing to keep"
    assert {role: row["rows"] for role, row in databases.items()} == {
        d.role: d.rows for d in manifest.databases
    }
    assert drill_env.tenants(platform) == sorted(TENANTS)
    uri = server.admin_url.set(database=f"{platform}_mlflow").render_as_string(hide_password=False)
    assert str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(MODEL, "production").version) == "1"
    assert drill_env.leftovers() == []
