"""A store backend from outside Maestro: one module and one entry-point line, nothing in Maestro
changed, and `maestro backup run` / `backup list` and ObjectStoreResource use it.

The plugin is installed as pip would install a package declaring, in its pyproject.toml,

    [project.entry-points."maestro_pipelines.storage.backends"]
    fakestore = "fake_store_backend:BACKEND"

that is, a module on the path and a dist-info folder whose entry_points.txt holds that line.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from maestro_pipelines.platform_db.migrate import upgrade

from .conftest import create_database, drop_database
from .test_cli import run_maestro

PLUGIN_MODULE = '''
"""fakestore://NAME: objects in the folder NAME under FAKE_STORE_ROOT (a local folder store
under another scheme, as a backend for some other service would be)."""
import re
from pathlib import Path

from maestro_pipelines.storage.backends import Backend, Container
from maestro_pipelines.storage.base import InvalidStoreURL
from maestro_pipelines.storage.local import LocalObjectStore


class FakeStore(LocalObjectStore):
    scheme = "fakestore"

    def __init__(self, name, source, *, root=None, retry=None):
        if not root:
            raise InvalidStoreURL(f"{source} (fakestore://{name}) needs FAKE_STORE_ROOT", "Set FAKE_STORE_ROOT")
        super().__init__(Path(root) / name, source, create=True, retry=retry)
        self.url = f"fakestore://{name}"


BACKEND = Backend(
    name="fakestore",
    schemes=("fakestore",),
    example="fakestore://name",
    open=lambda location, source, **options: FakeStore(location.bucket, source, **options),
    container=Container("folder", re.compile(r"^[a-z]{3,20}$"), "Folder names are 3-20 lowercase letters"),
    environment={"root": "FAKE_STORE_ROOT"},
)
'''
ENTRY_POINTS = '''
[maestro_pipelines.storage.backends]
fakestore = fake_store_backend:BACKEND
'''


def install_plugin(folder, module: str, source: str, entry_points: str):
    """What pip leaves for a package: the module on the path and a dist-info folder."""
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = folder / f"{module}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(entry_points)
    return folder


def on_pythonpath(folder) -> str:
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A folder on PYTHONPATH holding the plugin module and its dist-info (what pip installs)."""
    return install_plugin(tmp_path_factory.mktemp("plugin"), "fake_store_backend", PLUGIN_MODULE, ENTRY_POINTS)


@pytest.fixture
def platform_database(pg18):
    """A migrated platform database (one server: the store is what is under test here)."""
    name = create_database(pg18, "plugin")
    upgrade(pg18.location(name))
    yield pg18.libpq_url(name)
    drop_database(pg18, name)


def test_a_plugin_store_backend_through_the_cli_and_the_resource(plugin_path, platform_database, tmp_path, monkeypatch):
    root = tmp_path / "fake-root"
    env = {
        "MAESTRO_DATABASE_URL": platform_database,
        "MAESTRO_HOME": str(tmp_path / "home"),
        "MAESTRO_STORE_URL": "fakestore://backups",
        "FAKE_STORE_ROOT": str(root),
        "PYTHONPATH": on_pythonpath(plugin_path),
    }
    run = run_maestro("backup", "run", "--json", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["verified"] is True and "platform" in summary["databases"]
    backup_id = summary["id"]
    # The plugin's store holds it: its folder under FAKE_STORE_ROOT, not MAESTRO_HOME's store.
    assert (root / "backups" / "backups" / backup_id / "manifest.json").is_file()
    assert not (tmp_path / "home" / "store").exists()

    listed = run_maestro("backup", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "in fakestore://backups" in listed.stdout and backup_id in listed.stdout

    # The same store as a Dagster run gets it: the deployment's resource, from the same settings.
    from maestro_pipelines.backup import list_backups
    from maestro_pipelines.environment import resources_for_environment
    from maestro_pipelines.settings import Settings

    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.setenv("FAKE_STORE_ROOT", str(root))
    settings = Settings(home=tmp_path / "home", database_url=None, store_url="fakestore://backups")
    store = resources_for_environment(settings)["store"].get_store()
    assert store.url == "fakestore://backups"
    assert [entry.backup_id for entry in list_backups(store)] == [backup_id]


def test_a_plugin_url_is_checked_by_its_own_rules(plugin_path):
    """The plugin's scheme is listed among the supported ones, and its name rule is its own."""
    env = {"MAESTRO_STORE_URL": "fakestore://Not_Valid", "FAKE_STORE_ROOT": "/nonexistent",
           "PYTHONPATH": on_pythonpath(plugin_path)}
    bad = run_maestro("backup", "list", env=env)
    assert bad.returncode == 1
    assert "names the folder 'Not_Valid', which is not a valid folder name" in bad.stderr
    assert "Folder names are 3-20 lowercase letters" in bad.stderr
    unknown = run_maestro("backup", "list", env={**env, "MAESTRO_STORE_URL": "ftp://x/y"})
    assert "fakestore://" in unknown.stderr and "s3://" in unknown.stderr


@pytest.mark.parametrize(
    "source, says",
    [
        ("import no_such_sdk_module\nBACKEND = None\n",
         "The store backend 'broken' (broken_store_backend:BACKEND) cannot be loaded: ModuleNotFoundError"),
        ("from maestro_pipelines.storage.backends import Backend\n"
         "from maestro_pipelines.storage.s3 import BACKEND as S3\n"
         "BACKEND = Backend(name='other-s3', schemes=('s3',), example='s3://x', open=S3.open, container=S3.container)\n",
         "Two store backends claim the scheme 's3://': s3 and other-s3"),
    ],
    ids=["fails-to-import", "claims-s3"],
)
def test_a_bad_plugin_is_one_line_naming_it(tmp_path, source, says):
    folder = install_plugin(tmp_path / "plugin", "broken_store_backend", source,
                            "[maestro_pipelines.storage.backends]\nbroken = broken_store_backend:BACKEND\n")
    listed = run_maestro("backup", "list", env={"MAESTRO_HOME": str(tmp_path / "home"),
                                                "PYTHONPATH": on_pythonpath(folder)})
    assert listed.returncode == 1, listed.stderr
    assert listed.stderr.startswith(f"error: {says}") and listed.stderr.count("\n") == 1, listed.stderr


def test_a_plugin_store_without_an_mlflow_location_refuses_training_in_one_line(plugin_path, monkeypatch):
    """MLflow has no artifact repository for a scheme it does not know: a backend that declares
    no `artifact_uri` is refused where MLflow's artifact root is decided, in one line naming the
    store and what to do, instead of every training failing inside MLflow ("Could not find a
    registered artifact repository", retried as if transient: seen by a new user)."""
    from maestro_pipelines.errors import MaestroError
    from maestro_pipelines.resources.mlflow import artifact_root_for
    from maestro_pipelines.settings import Settings

    monkeypatch.syspath_prepend(str(plugin_path))
    settings = Settings(home=plugin_path / "home", database_url=None, store_url="fakestore://backups")
    with pytest.raises(MaestroError) as refused:
        artifact_root_for(settings)
    message = str(refused.value)
    assert "the fakestore store (MAESTRO_STORE_URL) has no MLflow artifact location" in message, message
    assert "artifact_uri" in message and "artifact_root" in message and "\n" not in message
    # The built-in backends keep theirs: the store's mlflow-artifacts folder.
    local = Settings(home=plugin_path / "home", database_url=None, store_url=None)
    assert artifact_root_for(local) == f"{(plugin_path / 'home' / 'store').resolve().as_uri()}/mlflow-artifacts"


def test_a_demo_on_a_store_mlflow_cannot_write_says_why_and_claims_no_gate(plugin_path, tmp_path):
    """`maestro demo` with such a store: the training fails at once (no retries of a
    configuration error), the summary names the store and what to do, and the tenant's row
    shows no gate result (a failed training was shown as "gates pass": the data checks')."""
    env = {"MAESTRO_HOME": str(tmp_path / "home"), "MAESTRO_STORE_URL": "fakestore://demo",
           "FAKE_STORE_ROOT": str(tmp_path / "root"), "PYTHONPATH": on_pythonpath(plugin_path)}
    result = run_maestro("demo", "--tenants", "acme", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "acme: run failed at trained_model: the fakestore store (MAESTRO_STORE_URL) has no MLflow artifact " \
           "location" in result.stdout, result.stdout
    assert "max_retries" not in result.stdout
    [row] = [line for line in result.stdout.splitlines() if line.startswith("│ acme")]
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[1] == "-" and cells[5] == "", cells  # no version deployed, no gate judged
    assert result.stderr.strip().splitlines()[-1].startswith("error: the demo did not finish for every tenant")
