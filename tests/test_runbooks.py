"""The runbooks in docs/runbooks, run as on-call runs them, the way pgBackRest builds its user
guide: by executing it.

Each test starts from a small production-like Maestro deployment (MAESTRO_DATABASE_URL on a
real PostgreSQL, two tenants with models, experiments, versions, deployments and predictions,
MLflow's database with a registered model and its `production` alias, Dagster's own storage
database with a run, a verified backup in the store: built once and copied for each test,
its store's objects copied into the test's store, even an S3 bucket; built in the test where
it needs a server of its own),
breaks it the way the runbook's title says, then runs the runbook's runnable blocks in order with bash: the "Before you start"
blocks of docs/runbooks/README.md first, then the runbook's. Each block must exit 0 (`set
-euo pipefail`); exported variables carry from one block to the next, as in one shell. Then
the end state is checked against what the runbook promises.

Runnable blocks are fenced ```bash runbook (every scenario of that runbook) or ```bash
runbook:NAME (only scenario NAME); plain ```bash blocks are examples the test does itself in
its setup hooks (stopping services, choosing a time), but every `maestro` command in them is
still checked against the CLI's --help.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from maestro_pipelines.platform_db.embedded import EmbeddedPostgres, bin_dir

from .services import free_port, server_process

REPO = Path(__file__).parent.parent
RUNBOOKS = REPO / "docs" / "runbooks"
INDEX = RUNBOOKS / "README.md"
VENV_BIN = Path(sys.executable).parent
MAESTRO = str(VENV_BIN / "maestro")
PSQL = str(bin_dir() / "psql")
# Every runbook in docs/runbooks that has a test below.
TESTED = {
    "total-database-loss.md", "bad-tenant-data.md", "point-in-time-restore.md",
    "lost-dagster-instance.md", "lost-store-credentials.md", "lost-or-leaked-backup-key.md",
}
RUN_BEFORE = "0f1e2d3c-0000-4000-8000-00000000b4f0"   # a Dagster run in the backup
RUN_AFTER = "0f1e2d3c-0000-4000-8000-0000000a4732"    # one after it (lost when Dagster's database is restored)
BLOCK_TIMEOUT_S = 600


# ---- the runbooks' blocks ------------------------------------------------------------------

FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?:[ \t]+(?P<tag>\S+))?[ \t]*$")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    tag: str | None
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def runs_in(self, scenario: str | None) -> bool:
        return self.tag == "runbook" or (scenario is not None and self.tag == f"runbook:{scenario}")


def blocks(path: Path) -> list[Block]:
    found, current, lines = [], None, path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if current is None:
            match = FENCE.match(line)
            if match:
                current = Block(path, number, match.group("lang"), match.group("tag"), "")
        elif line.strip() == "```":
            found.append(current)
            current = None
        else:
            current.code += line + "\n"
    assert current is None, f"{path}: unclosed code fence opened at line {current.line}"
    return found


def runnable(path: Path, scenario: str | None) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "bash" and b.runs_in(scenario)]


# ---- the deployment under test -------------------------------------------------------------


def clean_environment() -> dict[str, str]:
    """The test process's environment less anything a production shell would not have."""
    drop = ("MAESTRO_", "MLFLOW_", "PG", "AWS_", "DAGSTER_", "GOOGLE_", "AZURE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("WORK", "TENANT", "BEFORE", "PY", "SCRATCH_DB", "BACKUP_ID"):
        env.pop(name, None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    return env


@dataclass
class Server:
    """A PostgreSQL server as on-call sees it: a socket folder, the postgres superuser."""

    socket: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@/{database}?host={self.socket}"

    def psql(self, database: str, sql: str) -> str:
        done = subprocess.run([PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql],
                              capture_output=True, text=True, timeout=120, env=clean_environment())
        assert done.returncode == 0, f"psql on {database} failed: {done.stderr}"
        return done.stdout.strip()

    def databases(self, prefix: str) -> list[str]:
        out = self.psql("postgres", f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%' ORDER BY 1")
        return out.splitlines() if out else []

    def drop(self, *names: str) -> None:
        for name in names:
            self.psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


TENANT_DATA = """
INSERT INTO models (tenant_id, name, description, registry_name)
SELECT t.id, format('churn-%s', m), format('Predicts churn for %s, variant %s', t.display_name, m), 'maestro-' || t.name
FROM tenants t, generate_series(1, 2) m WHERE t.name = ANY(string_to_array(:'tenants', ','));

INSERT INTO experiments (tenant_id, model_id, name, status, params, metrics, started_at, finished_at)
SELECT m.tenant_id, m.id, format('%s-run-%s', m.name, e), 'succeeded',
       jsonb_build_object('n_estimators', 100 * e, 'max_depth', 3 + e),
       jsonb_build_object('accuracy', 0.8 + e / 100.0, 'f1', 0.75 + e / 100.0),
       now() - interval '3 days' + e * interval '1 hour', now() - interval '3 days' + e * interval '1 hour' + interval '5 minutes'
FROM models m JOIN tenants t ON t.id = m.tenant_id, generate_series(1, 2) e
WHERE t.name = ANY(string_to_array(:'tenants', ','));

INSERT INTO model_versions (model_id, tenant_id, experiment_id, version, registry_version, status, metrics, gate_results)
SELECT x.model_id, x.tenant_id, x.id, row_number() OVER (PARTITION BY x.model_id ORDER BY x.id),
       (row_number() OVER (PARTITION BY x.model_id ORDER BY x.id))::text, 'registered', x.metrics,
       '{"accuracy": {"passed": true}}'
FROM experiments x JOIN tenants t ON t.id = x.tenant_id WHERE t.name = ANY(string_to_array(:'tenants', ','));

INSERT INTO deployments (tenant_id, model_id, model_version_id, status)
SELECT v.tenant_id, v.model_id, max(v.id), 'active'
FROM model_versions v JOIN tenants t ON t.id = v.tenant_id
WHERE t.name = ANY(string_to_array(:'tenants', ',')) GROUP BY v.tenant_id, v.model_id;

INSERT INTO predictions (tenant_id, model_version_id, deployment_id, entity_key, features_hash, label, score, created_at)
SELECT d.tenant_id, d.model_version_id, d.id, format('cust-%s', i), md5(i::text), (i % 2)::text, (i % 97) / 97.0,
       now() - i * interval '1 hour'
FROM deployments d JOIN tenants t ON t.id = d.tenant_id, generate_series(1, 30) i
WHERE t.name = ANY(string_to_array(:'tenants', ','));
"""

# MLflow's registry (its own schema, made by MLflow) and Dagster's storage (made by Dagster),
# in a child process: both libraries keep global state.
SIDE_DATABASES = r"""
import json, sys
spec = json.loads(sys.argv[1])
if spec.get("mlflow"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=spec["mlflow"])
    for tenant in spec["tenants"]:
        name = f"maestro-{tenant}"
        client.create_registered_model(name)
        version = client.create_model_version(name, source=f"mlflow-artifacts:/models/{tenant}/1")
        client.set_registered_model_alias(name, "production", version.version)
if spec.get("dagster_runs") is not None:
    from dagster import DagsterInstance, DagsterRun
    instance = DagsterInstance.get()
    for run_id in spec["dagster_runs"]:
        instance.add_run(DagsterRun(job_name="train_and_deploy", run_id=run_id))
    if spec.get("concurrency"):
        instance.event_log_storage.set_concurrency_slots("maestro_backup", 1)
    instance.dispose()
"""

DAGSTER_YAML = """storage:
  postgres:
    postgres_url:
      env: MAESTRO_DAGSTER_DATABASE_URL
telemetry:
  enabled: false
"""


@dataclass
class Site:
    """One Maestro deployment: its databases on `server`, its store, the shell environment of
    its services (which on-call copies)."""

    tmp: Path
    server: Server
    name: str
    env: dict[str, str] = field(default_factory=dict)
    cleanups: list = field(default_factory=list)

    @property
    def mlflow(self) -> str:
        return f"{self.name}_mlflow"

    @property
    def dagster(self) -> str:
        return f"{self.name}_dagster"

    def point_at(self, server: Server) -> None:
        """The services' environment naming `server` (what on-call edits when a server is replaced)."""
        self.server = server
        self.env["MAESTRO_DATABASE_URL"] = server.url(self.name)
        self.env["MAESTRO_DAGSTER_DATABASE_URL"] = server.url(self.dagster)

    def maestro(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([MAESTRO, *args], env={**clean_environment(), **self.env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"maestro {' '.join(args)} failed: {done.stderr[-3000:]}"
        return done

    def psql_file(self, database: str, sql: str, **variables: str) -> str:
        args = [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.server.url(database)]
        for key, value in variables.items():
            args += ["-v", f"{key}={value}"]
        done = subprocess.run(args, input=sql, capture_output=True, text=True, timeout=120, env=clean_environment())
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def add_tenants(self, *names: str) -> None:
        for tenant in names:
            self.maestro("tenants", "add", tenant, "--display-name", tenant.capitalize())
        self.psql_file(self.name, TENANT_DATA, tenants=",".join(names))

    def side_databases(self, tenants: list[str] | None = None, runs: list[str] | None = None,
                       concurrency: bool = False) -> None:
        spec = {"tenants": tenants or [], "dagster_runs": runs, "concurrency": concurrency}
        if tenants:
            spec["mlflow"] = self.server.url(self.mlflow)
        done = subprocess.run([sys.executable, "-c", SIDE_DATABASES, json.dumps(spec)],
                              env={**clean_environment(), **self.env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    def backup(self) -> str:
        return json.loads(self.maestro("backup", "run", "--json").stdout)["id"]

    def backups(self) -> list[dict]:
        return json.loads(self.maestro("backup", "list", "--json").stdout)

    def tenants(self) -> dict[str, str]:
        return {t["name"]: t["status"] for t in json.loads(self.maestro("tenants", "list", "--json").stdout)}

    def dagster_runs(self) -> list[str]:
        out = self.server.psql(self.dagster, "SELECT run_id FROM runs ORDER BY id")
        return out.splitlines() if out else []


def _server(pg18) -> Server:
    socket = pg18.admin_url.query["host"]
    return Server(socket if isinstance(socket, str) else socket[0])


@contextmanager
def _deployment(server: Server, tmp_path: Path, name: str) -> Iterator[Site]:
    """A deployment named `name` on `server`, its folders under `tmp_path`; its databases
    dropped after (on the server it points at by then too)."""
    deployment = Site(tmp_path, server, name)
    (tmp_path / "store").mkdir()
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text(DAGSTER_YAML)
    (tmp_path / "oncall").mkdir()
    deployment.env.update({
        "MAESTRO_HOME": str(tmp_path / "maestro_home"),
        "MAESTRO_STORE_URL": (tmp_path / "store").as_uri(),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    })
    deployment.point_at(server)
    try:
        yield deployment
    finally:
        for where in {id(s): s for s in (server, deployment.server)}.values():
            try:
                where.drop(*where.databases(deployment.name))
            except AssertionError:  # a server the test stopped: nothing to drop there
                pass
        for cleanup in reversed(deployment.cleanups):
            cleanup()


@pytest.fixture
def site(pg18, tmp_path):
    """A deployment on the embedded test server, nothing in it yet; its databases dropped after."""
    with _deployment(_server(pg18), tmp_path, f"rb{uuid.uuid4().hex[:10]}") as deployment:
        yield deployment


def build(site: Site) -> str:
    """Platform database with acme and globex, MLflow's and Dagster's, a verified backup; its id."""
    site.maestro("db", "upgrade")
    site.add_tenants("acme", "globex")
    site.server.psql("postgres", f'CREATE DATABASE "{site.mlflow}"')
    site.server.psql("postgres", f'CREATE DATABASE "{site.dagster}"')
    site.side_databases(["acme", "globex"], [RUN_BEFORE], concurrency=True)
    backup_id = site.backup()
    [entry] = site.backups()
    assert entry["verified"] and entry["databases"] == ["platform", "mlflow", "dagster"]
    return backup_id


BUILT = "runbooks-built"
"""The xdist group of the tests that start from `built_site`: one worker builds it once."""


@pytest.fixture(scope="module")
def built(pg18, tmp_path_factory) -> Iterator[tuple[Site, str]]:
    """A deployment `build` made once (tenants, MLflow's registry, Dagster's run, a verified
    backup in its store), its three databases then renamed aside: (the deployment, the name
    they are kept under). Rebuilding it for every runbook was 13-18 s a test."""
    server = _server(pg18)
    with _deployment(server, tmp_path_factory.mktemp("built"), f"rb{uuid.uuid4().hex[:10]}") as deployment:
        build(deployment)
        aside = f"rbbuilt_{deployment.name[2:]}"  # not under the deployment's prefix: its teardown leaves it
        for suffix in ("", "_mlflow", "_dagster"):
            server.psql("postgres", f'ALTER DATABASE "{deployment.name}{suffix}" RENAME TO "{aside}{suffix}"')
        yield deployment, aside
        server.drop(aside, f"{aside}_mlflow", f"{aside}_dagster")


@pytest.fixture
def built_site(built, tmp_path) -> Iterator[Site]:
    """The `built` deployment as each test gets it, exactly as `build` left it: its databases
    copied under the names its backup was taken of (CREATE DATABASE ... TEMPLATE), its store's
    objects copied through the store (sha256 and metadata as they were written)."""
    from maestro_pipelines.storage import open_store

    original, aside = built
    with _deployment(original.server, tmp_path, original.name) as deployment:
        for suffix in ("", "_mlflow", "_dagster"):
            deployment.server.psql("postgres", f'CREATE DATABASE "{original.name}{suffix}" TEMPLATE "{aside}{suffix}"')
        copy_objects(open_store(original.env["MAESTRO_STORE_URL"]), open_store(deployment.env["MAESTRO_STORE_URL"]))
        yield deployment


def copy_objects(source, dest) -> None:
    """Every object of store `source` put into `dest` through the store (sha256 and metadata
    recorded as when they were written)."""
    for info in source.list():
        dest.put_bytes(info.key, source.get_bytes(info.key), info.metadata)


# ---- running a runbook ---------------------------------------------------------------------


@dataclass
class Transcript:
    steps: list[tuple[Block, subprocess.CompletedProcess]] = field(default_factory=list)

    def output(self, contains: str) -> str:
        """stdout of the first block whose code contains `contains`."""
        return next(done.stdout for block, done in self.steps if contains in block.code)


def run_runbook(site: Site, name: str, scenario: str | None = None, **placeholders: str) -> Transcript:
    """The README's runnable blocks, then the runbook's, in one on-call 'shell'."""
    book = RUNBOOKS / name
    steps = runnable(INDEX, None) + runnable(book, scenario)
    assert runnable(book, scenario), f"{name} has no runnable block for scenario {scenario}"
    state = site.tmp / "oncall-shell.sh"
    state.write_text("")
    (site.tmp / "oncall-tmp").mkdir(exist_ok=True)  # where the incident folder ($WORK) goes
    env = {**clean_environment(), **site.env, **placeholders, "TMPDIR": str(site.tmp / "oncall-tmp")}
    transcript = Transcript()
    log = site.tmp / "runbook.log"
    for block in steps:
        script = f"set -euo pipefail\nsource {shlex.quote(str(state))}\n{block.code}\nexport -p > {shlex.quote(str(state))}.next\n"
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", script], env=env, cwd=site.tmp / "oncall", capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
        with log.open("a") as out:
            out.write(f"===== {block.where} ({time.monotonic() - started:.1f} s, exit {done.returncode})\n{block.code}"
                      f"----- stdout\n{done.stdout}----- stderr\n{done.stderr}\n")
        assert done.returncode == 0, (
            f"{block.where} exited {done.returncode}\n{block.code}\n--- stdout:\n{done.stdout[-3000:]}\n"
            f"--- stderr:\n{done.stderr[-3000:]}"
        )
        os.replace(f"{state}.next", state)
        transcript.steps.append((block, done))
    return transcript


# ---- the runbooks --------------------------------------------------------------------------


@pytest.mark.xdist_group(BUILT)
@pytest.mark.parametrize("variant", ["dropped", "new-server"])
def test_total_database_loss(built_site, tmp_path, variant):
    site = built_site
    site.add_tenants("initech")                                  # after the backup: lost
    site.side_databases(runs=[RUN_AFTER])
    # The disaster: all three databases gone.
    site.server.drop(site.name, site.mlflow, site.dagster)
    if variant == "new-server":
        # The server is gone for good: on-call provisions a new one and points the environment at it.
        embedded = EmbeddedPostgres(tmp_path / "new-server")
        url = embedded.start()
        site.cleanups.append(embedded.stop)
        site.point_at(Server(url.query["host"]))
        assert site.server.databases(site.name) == []

    transcript = run_runbook(site, "total-database-loss.md")

    assert site.tenants() == {"acme": "active", "globex": "active"}
    assert site.server.psql(site.name, "SELECT count(*) FROM models") == "4"
    assert site.server.psql(site.name, "SELECT count(*) FROM predictions") == "120"
    assert site.server.psql(site.mlflow, "SELECT string_agg(name || ':' || alias || ':' || version, ',' ORDER BY name) "
                                         "FROM registered_model_aliases") == "maestro-acme:production:1,maestro-globex:production:1"
    assert site.dagster_runs() == [RUN_BEFORE]
    assert "maestro-acme" in transcript.output("registered_model_aliases")
    # Nothing was there to keep aside, nothing was left behind; the fresh backup is verified.
    assert site.server.databases(site.name) == sorted([site.name, site.mlflow, site.dagster])
    backups = site.backups()
    assert len(backups) == 2 and backups[-1]["verified"]


def _fingerprint(site: Site, tenant: str) -> dict[str, str]:
    """Rows and content of every registry table for one tenant, and its prediction ids."""
    sql = " UNION ALL ".join(
        f"SELECT '{table}', count(*) || ':' || md5(coalesce(string_agg(x::text, '|' ORDER BY x.id), '')) "
        f"FROM {table} x WHERE {column} IN (SELECT id FROM tenants WHERE name = '{tenant}')"
        for table, column in (("tenants", "id"), ("models", "tenant_id"), ("experiments", "tenant_id"),
                              ("model_versions", "tenant_id"), ("deployments", "tenant_id"))
    ) + (f" UNION ALL SELECT 'predictions', string_agg(id::text, ',' ORDER BY id) FROM predictions "
         f"WHERE tenant_id IN (SELECT id FROM tenants WHERE name = '{tenant}')")
    return dict(line.split("|", 1) for line in site.server.psql(site.name, sql).splitlines())


@pytest.mark.xdist_group(BUILT)
def test_bad_tenant_data(built_site):
    site = built_site
    acme_at_backup = _fingerprint(site, "acme")
    # After the backup, life goes on: a new tenant, a new model for globex, a new acme prediction.
    site.add_tenants("initech")
    site.server.psql(site.name, "INSERT INTO models (tenant_id, name, registry_name) "
                                "SELECT id, 'fraud-1', 'maestro-globex' FROM tenants WHERE name = 'globex'")
    site.server.psql(site.name, "INSERT INTO predictions (tenant_id, model_version_id, entity_key, created_at) "
                                "SELECT tenant_id, model_version_id, 'cust-new', now() FROM deployments "
                                "WHERE tenant_id = (SELECT id FROM tenants WHERE name = 'acme') ORDER BY id LIMIT 1")
    new_prediction = site.server.psql(site.name, "SELECT max(id) FROM predictions")
    globex_now = _fingerprint(site, "globex")
    # The disaster: a bad script deletes one of acme's models (with its versions and deployment),
    # some of its predictions, and overwrites its settings.
    site.server.psql(site.name, """
        DELETE FROM deployments WHERE model_id IN (SELECT m.id FROM models m JOIN tenants t ON t.id = m.tenant_id
                                                   WHERE t.name = 'acme' AND m.name = 'churn-1');
        DELETE FROM models WHERE id IN (SELECT m.id FROM models m JOIN tenants t ON t.id = m.tenant_id
                                        WHERE t.name = 'acme' AND m.name = 'churn-1');
        DELETE FROM predictions WHERE tenant_id = (SELECT id FROM tenants WHERE name = 'acme') AND id % 3 = 0;
        UPDATE tenants SET settings = '{"gates": {"accuracy": 2}}', updated_at = now() WHERE name = 'acme';
    """)
    assert _fingerprint(site, "acme")["models"] != acme_at_backup["models"]

    run_runbook(site, "bad-tenant-data.md", TENANT="acme")

    acme = _fingerprint(site, "acme")
    for table in ("tenants", "models", "experiments", "model_versions", "deployments"):
        assert acme[table] == acme_at_backup[table], table
    assert acme["predictions"] == ",".join(sorted(acme_at_backup["predictions"].split(",") + [new_prediction], key=int))
    assert _fingerprint(site, "globex") == globex_now                     # untouched
    assert set(site.tenants()) == {"acme", "globex", "initech"}           # nothing else went back in time
    assert site.server.databases(site.name) == sorted([site.name, site.mlflow, site.dagster])  # scratch dropped


def test_bad_tenant_runbook_copies_every_tenant_table(site):
    """A migration that adds a table with a tenant_id must add it to the runbook's copy."""
    site.maestro("db", "upgrade")
    tables = site.server.psql(site.name, """
        SELECT c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE a.attname = 'tenant_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
          AND NOT c.relispartition AND n.nspname = 'public' ORDER BY 1""").splitlines()
    code = "".join(b.code for b in runnable(RUNBOOKS / "bad-tenant-data.md", None))
    for table in ["tenants", *tables]:
        assert f"r_{table} FROM '{table}.copy'" in code and f"TO '{table}.copy'" in code, table


def test_point_in_time_restore(site, tmp_path):
    """On a server that archives its WAL into the store (as the embedded default does), with a
    base backup: back to a time between two transactions, the damage after it undone."""
    from maestro_pipelines.storage import open_store
    from tests.pitr.recovery_fixtures import ArchivingServer

    store = open_store(site.env["MAESTRO_STORE_URL"])
    (tmp_path / "pitr").mkdir(mode=0o755)
    archiving = ArchivingServer(tmp_path / "pitr" / "server", store)
    site.cleanups.append(archiving.stop)
    site.point_at(Server(archiving.url.query["host"]))
    build(site)                                # its `maestro backup run` takes a base backup too (archiving is on)
    site.server.psql(site.name, "UPDATE tenants SET updated_at = now()")   # written after the base backup: kept
    [(before,)] = archiving.execute("postgres", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    # The disaster: a bad deploy suspends every tenant and retires every deployment; a tenant
    # and a Dagster run are added; then the nightly backup runs and captures all of it.
    site.server.psql(site.name, "UPDATE tenants SET status = 'suspended'; DELETE FROM deployments")
    site.add_tenants("initech")
    site.side_databases(runs=[RUN_AFTER])
    site.backup()
    archiving.archive_now()  # the archiver's next minute: the WAL of all of it is in the store

    transcript = run_runbook(site, "point-in-time-restore.md", BEFORE=before)

    assert site.tenants() == {"acme": "active", "globex": "active"}
    assert site.server.psql(site.name, "SELECT count(*) FROM deployments") == "4"
    assert site.dagster_runs() == [RUN_BEFORE, RUN_AFTER]                  # Dagster's history left alone
    leftovers = [d for d in site.server.databases(site.name) if d not in (site.name, site.mlflow, site.dagster)]
    kept = [d for d in leftovers if d.startswith(f"{site.name}_pre_restore_")]
    assert len(kept) == 1 and len(leftovers) == 2                          # platform and MLflow kept aside, no scratch
    assert "initech" in site.server.psql(kept[0], "SELECT string_agg(name, ',') FROM tenants")
    assert "recovered to LSN" in transcript.output("export POINT_LSN")
    window = transcript.output("restoring to $BEFORE")
    assert "PITR" in window and " 0 gaps" in window, window
    backups = site.backups()
    assert len(backups) == 3 and backups[-1]["verified"]


@pytest.mark.xdist_group(BUILT)
@pytest.mark.parametrize("way", ["restore", "recreate"])
def test_lost_dagster_instance(built_site, way):
    site = built_site
    site.add_tenants("initech")                                  # platform data after the backup: must stay
    site.side_databases(runs=[RUN_AFTER])                        # Dagster history after it: lost with way A
    site.server.drop(site.dagster)

    transcript = run_runbook(site, "lost-dagster-instance.md", scenario=way)

    assert site.dagster_runs() == ([RUN_BEFORE] if way == "restore" else [])
    assert set(site.tenants()) == {"acme", "globex", "initech"}
    limit = subprocess.run([str(VENV_BIN / "dagster"), "instance", "concurrency", "get", "maestro_backup"],
                           env={**clean_environment(), **site.env}, capture_output=True, text=True, timeout=120)
    assert limit.returncode == 0 and re.search(r"\b1\b", limit.stdout), limit.stdout + limit.stderr
    if way == "restore":
        assert RUN_BEFORE in transcript.output("dagster run list")
    backups = site.backups()
    assert len(backups) == 2 and backups[-1]["verified"] and "dagster" in backups[-1]["databases"]
    assert site.server.databases(site.name) == sorted([site.name, site.mlflow, site.dagster])


@pytest.fixture
def moto_with_iam(tmp_path):
    """moto's S3 and IAM over HTTP, checking signatures and policies after the first six
    (setup) requests: IAM user maestro-backup (S3 only) with key 1, user oncall (IAM only)."""
    import boto3

    port = free_port()
    workdir = tmp_path / "moto"
    workdir.mkdir()
    args = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with server_process(args, port, workdir, env={"INITIAL_NO_AUTH_ACTION_COUNT": "6"}):
        endpoint = f"http://127.0.0.1:{port}"
        common = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **common)
        policy = lambda action: json.dumps({"Version": "2012-10-17", "Statement": [  # noqa: E731
            {"Effect": "Allow", "Action": [action], "Resource": "*"}]})
        iam.create_user(UserName="maestro-backup")
        iam.put_user_policy(UserName="maestro-backup", PolicyName="store", PolicyDocument=policy("s3:*"))
        maestro_key = iam.create_access_key(UserName="maestro-backup")["AccessKey"]
        iam.create_user(UserName="oncall")
        iam.put_user_policy(UserName="oncall", PolicyName="admin", PolicyDocument=policy("iam:*"))
        admin_key = iam.create_access_key(UserName="oncall")["AccessKey"]
        boto3.client("s3", aws_access_key_id=maestro_key["AccessKeyId"],
                     aws_secret_access_key=maestro_key["SecretAccessKey"], **common).create_bucket(Bucket="maestro-store")
        admin = boto3.client("iam", aws_access_key_id=admin_key["AccessKeyId"],
                             aws_secret_access_key=admin_key["SecretAccessKey"], **common)
        yield endpoint, maestro_key, admin_key, admin


@pytest.mark.xdist_group(BUILT)
@pytest.mark.parametrize("case", ["revoked", "leaked"])
def test_lost_store_credentials(built_site, tmp_path, moto_with_iam, case):
    from maestro_pipelines.storage import open_store

    site = built_site
    endpoint, maestro_key, admin_key, admin = moto_with_iam
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[oncall-admin]\naws_access_key_id = {admin_key['AccessKeyId']}\n"
                           f"aws_secret_access_key = {admin_key['SecretAccessKey']}\n")
    (tmp_path / "aws-config").write_text("")
    site.env.update({
        "MAESTRO_STORE_URL": "s3://maestro-store/prod",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": maestro_key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": maestro_key["SecretAccessKey"],
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
    })
    # The deployment's store is the bucket: its backup put there with the services' key.
    copy_objects(open_store((tmp_path / "store").as_uri()),
                 open_store(site.env["MAESTRO_STORE_URL"], endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=maestro_key["AccessKeyId"], aws_secret_access_key=maestro_key["SecretAccessKey"]))
    if case == "revoked":
        # The key was deleted (by security, or lost with the secret store): backups now fail.
        admin.delete_access_key(UserName="maestro-backup", AccessKeyId=maestro_key["AccessKeyId"])
        refused = subprocess.run([MAESTRO, "backup", "list"], env={**clean_environment(), **site.env},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr

    transcript = run_runbook(site, "lost-store-credentials.md", STORE_IAM_USER="maestro-backup",
                             ADMIN_PROFILE="oncall-admin")

    keys = {k["AccessKeyId"]: k["Status"] for k in admin.list_access_keys(UserName="maestro-backup")["AccessKeyMetadata"]}
    new = [key for key in keys if key != maestro_key["AccessKeyId"]]
    assert len(new) == 1 and keys[new[0]] == "Active"
    assert keys.get(maestro_key["AccessKeyId"]) == (None if case == "revoked" else "Inactive")
    assert "RTO" in transcript.output("maestro drill")
    # The services' new environment: the new key reads a store holding the old and the fresh backup.
    state = (tmp_path / "oncall-shell.sh").read_text()
    secret = re.search(r'NEW_SECRET="([^"]+)"', state).group(1)
    site.env.update({"AWS_ACCESS_KEY_ID": new[0], "AWS_SECRET_ACCESS_KEY": secret})
    backups = site.backups()
    assert len(backups) == 2 and all(b["verified"] for b in backups)


def test_lost_or_leaked_backup_key(site):
    """Backups under key K1 (the platform database only, dumps only: no database is touched
    here). K1 leaks: the runbook rotates to a new key and retires K1. Then that key is lost:
    the runbook takes a new backup under a third key and names what the lost one wrapped."""
    from maestro_pipelines.backup.rekey import key_census
    from maestro_pipelines.crypto import generate_key
    from maestro_pipelines.storage import open_store
    from tests.backup.sealed_records import DRILL_FIELDS, check_backup, keyring, write_backup

    k1 = generate_key()
    site.env.pop("MAESTRO_DAGSTER_DATABASE_URL")
    site.env["MAESTRO_BACKUP_KEY"] = k1
    site.maestro("db", "upgrade")
    site.add_tenants("acme")
    site.maestro("backup", "run", "--kind", "dump")
    store = open_store(site.env["MAESTRO_STORE_URL"])
    store.keyring = keyring(k1)
    # A record under K1 as a drill writes it, so that the rotation has one whatever else is encrypted.
    drill = "drills/20261201T030000000000Z-000001.json"
    write_backup(store, drill, DRILL_FIELDS)

    run_runbook(site, "lost-or-leaked-backup-key.md", "leaked")
    shell = (site.tmp / "oncall-shell.sh").read_text()
    k2 = re.search(r'MAESTRO_BACKUP_KEY="([^"]+)"', shell).group(1)
    assert k2 != k1 and "MAESTRO_BACKUP_OLD_KEYS" not in shell and k1 not in shell
    k2_id = keyring(k2).current.id
    assert set(key_census(store).by_kek) == {k2_id}                     # nothing left under the leaked key
    assert check_backup(store, drill, keyring(k2)) == k2_id             # the new key alone reads it
    site.env["MAESTRO_BACKUP_KEY"] = k2                                 # the services' new environment
    backups = site.backups()
    assert len(backups) == 2 and all(b["verified"] for b in backups)

    del site.env["MAESTRO_BACKUP_KEY"]                                  # then the new key is lost
    transcript = run_runbook(site, "lost-or-leaked-backup-key.md", "lost")
    k3 = re.search(r'MAESTRO_BACKUP_KEY="([^"]+)"', (site.tmp / "oncall-shell.sh").read_text()).group(1)
    gone = " ".join(transcript.output("rekey --dry-run").split())
    assert f"still need backup key {k2_id}, which is not configured" in gone, gone
    assert f"{k2_id}: 1 record, NOT CONFIGURED" in gone or re.search(rf"{k2_id}: \d+ records, NOT CONFIGURED", gone)
    assert f"under backup key {keyring(k3).current.id}" in gone and k2 not in gone and k3 not in gone
    site.env["MAESTRO_BACKUP_KEY"] = k3
    backups = site.backups()
    assert len(backups) == 3 and backups[-1]["verified"]


# ---- the runbooks as documents -------------------------------------------------------------


def test_every_runbook_is_indexed_and_tested():
    books = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert books == TESTED, "a runbook without a test here (or a test without its runbook)"
    index = INDEX.read_text()
    for name in books:
        assert f"]({name})" in index, f"README.md does not link {name}"
        assert runnable(RUNBOOKS / name, None) or any(b.tag and b.tag.startswith("runbook:") for b in blocks(RUNBOOKS / name))
    for path in [INDEX, *sorted(RUNBOOKS.glob("*.md"))]:
        for block in blocks(path):
            assert block.tag is None or re.fullmatch(r"runbook(:[a-z-]+)?", block.tag), f"{block.where}: tag {block.tag}"
            assert block.tag is None or block.lang == "bash", f"{block.where}: only bash blocks run"


def _maestro_invocations(code: str) -> list[list[str]]:
    """`maestro ...` commands in shell code (comments left out), as word lists."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for segment in re.split(r"\|\||&&|[|;]|\$\(|\bthen\b|\bdo\b|`", line):
            words = segment.strip().split()
            if words and words[0] == "maestro":
                found.append(words[1:])
    return found


def test_every_maestro_command_in_the_runbooks_exists():
    """Runnable or example, every `maestro` command and option the runbooks show is in --help."""
    helps: dict[tuple[str, ...], str | None] = {}

    def help_of(path: tuple[str, ...]) -> str | None:
        if path not in helps:
            done = subprocess.run([MAESTRO, *path, "--help"], capture_output=True, text=True, timeout=120,
                                  env=clean_environment())
            usage = f"Usage: maestro {' '.join(path)}".rstrip()
            helps[path] = done.stdout if done.returncode == 0 and usage in done.stdout else None
        return helps[path]

    seen = 0
    for path in [INDEX, *sorted(RUNBOOKS.glob("*.md"))]:
        for block in blocks(path):
            if block.lang != "bash":
                continue
            for words in _maestro_invocations(block.code):
                seen += 1
                command = ()
                for word in words:
                    if word.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", word):
                        break
                    if help_of(command + (word,)) is None:
                        break
                    command += (word,)
                assert command, f"{block.where}: `maestro {' '.join(words)}` is not a maestro command"
                text = help_of(command)
                for word in words:
                    if word.startswith("--"):
                        option = word.split("=", 1)[0]
                        assert option in text, f"{block.where}: `maestro {' '.join(command)}` has no {option}"
    assert seen > 20
