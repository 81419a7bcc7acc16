"""infra/ cannot run here (no Docker, no cluster), so these check that its files
parse and agree with the code: ports, environment variable names, commands,
image names and the paths the Dockerfiles copy."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sluicegate.config import Settings
from tests.conftest import REPO

INFRA = REPO / "infra"
PORTS = {"prefect": 4200, "mlflow": 5000, "serve": 8080}
IMAGE = "sluicegate:cpu"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else cmd


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _up_default(var: str) -> int:
    match = re.search(rf"\${{{var}:-(\d+)}}", (REPO / "scripts/up.sh").read_text())
    assert match, f"scripts/up.sh has no default for {var}"
    return int(match.group(1))


def test_compose_has_the_whole_stack(compose):
    assert set(compose) >= {"postgres", "prefect-server", "prefect-worker", "mlflow", "minio", "redis",
                            "model-server"}


def test_ports_agree_with_make_up_and_the_server_defaults(compose):
    from sluicegate.serve.settings import ServeSettings

    assert _up_default("SLUICEGATE_PREFECT_PORT") == PORTS["prefect"]
    assert _up_default("SLUICEGATE_MLFLOW_PORT") == PORTS["mlflow"]
    assert _up_default("SLUICEGATE_SERVE_PORT") == PORTS["serve"] == ServeSettings().port
    for service, key in (("prefect-server", "prefect"), ("mlflow", "mlflow"), ("model-server", "serve")):
        port = PORTS[key]
        assert int(_flag(_command(compose[service]), "--port")) == port, service
        assert f"{port}:{port}" in compose[service]["ports"], service
    env = compose["prefect-worker"]["environment"]
    assert env["PREFECT_API_URL"].endswith(f":{PORTS['prefect']}/api")
    assert env["SLUICEGATE_MLFLOW_TRACKING_URI"].endswith(f":{PORTS['mlflow']}")
    assert env["SLUICEGATE_FEAST_REDIS"] == "redis:6379" and "6379:6379" in compose["redis"]["ports"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" and "9000:9000" in compose["minio"]["ports"]


def _env_names(compose: dict) -> set[str]:
    names = set()
    for service in compose.values():
        env = service.get("environment") or {}
        names |= set(env) - {"<<"}
    for doc in _yaml_docs(INFRA / "k8s/sluicegate.yaml"):
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
    values = yaml.safe_load((INFRA / "k8s/prefect-worker-values.yaml").read_text())
    names |= {e["name"] for e in values["worker"]["extraEnvVars"]}
    return names


def test_environment_variable_names_are_read_by_the_code(compose):
    import prefect.settings

    from sluicegate.serve.settings import ServeSettings

    ours = {f"SLUICEGATE_{f.upper()}" for f in Settings.model_fields}
    ours |= {f"SLUICEGATE_SERVE_{f.upper()}" for f in ServeSettings.model_fields}
    for name in _env_names(compose):
        if name.startswith("SLUICEGATE_"):
            assert name in ours, f"{name} is not a Sluicegate setting"
        elif name.startswith("PREFECT_"):
            assert hasattr(prefect.settings, name), f"{name} is not a Prefect setting"
        else:
            assert name.startswith(("POSTGRES_", "MINIO_", "MLFLOW_", "AWS_")), name


def test_commands_exist_and_name_the_right_pool_and_flags(compose):
    from mlflow.cli import cli as mlflow_cli

    from sluicegate.cli import app

    pool = {d["work_pool"]["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    worker = " ".join(_command(compose["prefect-worker"]))
    pool = pool.pop()
    # The pool exists before `prefect deploy --all` (which refuses a missing one), the worker after.
    create, deploy = worker.index(f"prefect work-pool create {pool} --type process"), worker.index("deploy --all")
    assert create < deploy < worker.index(f"prefect worker start --pool {pool} --type process")
    assert "prefect --no-prompt deploy --all" in worker and "SLUICEGATE_REPO=/opt/sluicegate" in worker
    assert not (REPO / "src/sluicegate/flows/deployments.py").exists()
    mlflow_cmd = _command(compose["mlflow"])
    assert mlflow_cmd[:2] == ["mlflow", "server"]
    known = {o for p in mlflow_cli.commands["server"].params for o in p.opts}
    assert {a for a in mlflow_cmd if a.startswith("--")} <= known
    assert _command(compose["prefect-server"])[:3] == ["prefect", "server", "start"]
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"serve", "monitor", "ingest"} <= commands
    assert _command(compose["model-server"])[:2] == ["sluicegate", "serve"]


def test_databases_and_buckets_line_up(compose):
    init = (INFRA / "postgres-init.sql").read_text()
    prefect_db = compose["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = _command(compose["mlflow"])
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    assert _flag(mlflow_cmd, "--backend-store-uri").endswith("/mlflow")
    assert "CREATE DATABASE prefect;" in init and "CREATE DATABASE mlflow;" in init
    bucket = _flag(mlflow_cmd, "--artifacts-destination").removeprefix("s3://").split("/")[0]
    assert f"s3/{bucket}" in " ".join(compose["minio-buckets"]["entrypoint"])
    up = (REPO / "scripts/up.sh").read_text()
    assert "/prefect" in up and "/mlflow" in up and "postgresql+asyncpg:" in up


@pytest.mark.parametrize("flavour", ["cpu", "cuda", "rocm"])
def test_dockerfiles_build_what_the_stack_runs(flavour):
    text = (INFRA / "docker" / f"Dockerfile.{flavour}").read_text()
    assert f"-t sluicegate:{flavour} ." in text
    torch_pin = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"torch=={torch_pin}"' in text
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile.{flavour} copies {src}, which is not in the repository"
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, flags=re.M).group(1).split()}
    assert exposed == set(PORTS.values())
    assert "sluicegate" in re.search(r"^CMD (.+)$", text, flags=re.M).group(1)


def _constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: specifier}."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every `pip install` a Dockerfile's RUN lines run."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    installs = []
    for run in re.findall(r"^RUN (.+)$", text, flags=re.M):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


# What a build from each PyTorch index is called: its wheels carry the index's name as a local label.
TORCH_INDEX = re.compile(r"^https://download\.pytorch\.org/whl/(cpu|cu\d+|rocm[\d.]+)/?$")


def _installed_versions(args: list[str]) -> tuple[list[tuple[str, str]], list[str], bool]:
    """(name, version the install leaves) for each `name==version`, the project's extras, and -c constraints."""
    from packaging.requirements import Requirement

    pinned, extras, constrained, label = [], [], False, None
    for flag, value in zip(args, args[1:], strict=False):  # the index applies wherever it is written
        if flag in ("--index-url", "-i") and (match := TORCH_INDEX.match(value)):
            label = match.group(1)
    words = iter(args)
    for word in words:
        if word in ("--index-url", "-i", "--extra-index-url"):
            next(words)
        elif word in ("-c", "--constraint"):
            assert next(words) == "constraints.txt"
            constrained = True
        elif word.startswith("-"):
            continue
        elif word == "." or word.startswith(".["):
            extras += [e.strip() for e in word[2:-1].split(",")] if word.startswith(".[") else [""]
        else:
            req = Requirement(word)
            for spec in req.specifier:
                if spec.operator == "==":
                    pinned.append((req.name, spec.version + (f"+{label}" if label else "")))
    return pinned, extras, constrained


def test_no_local_version_label_is_pinned_in_the_constraints():
    labelled = {name: spec for name, spec in _constraints().items() if "+" in spec}
    assert not labelled, f"{labelled}: a local label matches only that one build, which the index may not serve"


@pytest.mark.parametrize("flavour", ["cpu", "cuda", "rocm"])
def test_dockerfile_installs_are_satisfiable_against_the_constraints(flavour):
    """What a Dockerfile installs before `pip install -c constraints.txt .` must still satisfy the
    constraints then, or pip cannot resolve: a +cu128 torch against a `torch==2.13.0+cpu` pin fails."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    constraints = _constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed: dict[str, str] = {}
    installs = _pip_installs(INFRA / "docker" / f"Dockerfile.{flavour}")
    project_installed = False
    for args in installs:
        pinned, extras, constrained = _installed_versions(args)
        for name, version in pinned:
            installed[canonicalize_name(name)] = version
        if not extras:
            continue
        project_installed = True
        assert constrained, f"Dockerfile.{flavour} installs the project without -c constraints.txt"
        for extra in extras:
            assert not extra or extra in project["optional-dependencies"], f"no extra {extra!r} in pyproject"
        wanted = [Requirement(r) for r in project["dependencies"]]
        wanted += [Requirement(r) for e in extras if e for r in project["optional-dependencies"][e]]
        for req in wanted:
            name = canonicalize_name(req.name)
            if name in constraints:  # the constraint must admit a version the project accepts
                pinned_version = constraints[name].removeprefix("==")
                assert req.specifier.contains(Version(pinned_version), prereleases=True), (req, constraints[name])
            if name in installed:  # and what was installed before must satisfy both
                have = Version(installed[name])
                assert req.specifier.contains(have, prereleases=True), (flavour, req, have)
                assert SpecifierSet(constraints.get(name, "")).contains(have, prereleases=True), (
                    f"Dockerfile.{flavour} installs {name} {have} first; constraints.txt wants "
                    f"{constraints[name]}: pip cannot satisfy both")
    assert project_installed and "torch" in installed, f"Dockerfile.{flavour} installs no torch build or no project"


def test_image_names_agree(compose):
    for name in ("prefect-server", "mlflow", "prefect-worker", "model-server"):
        assert compose[name]["image"] == IMAGE, name
    deployment = next(d for d in _yaml_docs(INFRA / "k8s/sluicegate.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE
    values = yaml.safe_load((INFRA / "k8s/prefect-worker-values.yaml").read_text())["worker"]
    assert f"{values['image']['repository']}:{values['image']['prefectTag']}" == IMAGE


def test_kubernetes_worker_and_model_server_agree_with_the_code():
    from sluicegate.serve.settings import ServeSettings

    values = yaml.safe_load((INFRA / "k8s/prefect-worker-values.yaml").read_text())["worker"]
    assert values["config"]["type"] == "kubernetes"
    pool = values["config"]["workPool"]
    readme = (INFRA / "README.md").read_text()
    assert f"--pool {pool}" in readme  # the registration command documented for that pool
    assert values["selfHostedServerApiConfig"]["apiUrl"].endswith(f":{PORTS['prefect']}/api")
    deployment = next(d for d in _yaml_docs(INFRA / "k8s/sluicegate.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == ServeSettings().port
    probe = container["readinessProbe"]["httpGet"]["path"]
    assert probe in (REPO / "src/sluicegate/serve/app.py").read_text()


def test_readme_says_docker_does_not_run_here():
    text = (INFRA / "README.md").read_text().lower()
    assert "docker cannot run" in text


# The onnxruntime build each image serves with: it must carry the provider of the image's target.
IMAGE_BUILDS = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "rocm": "onnxruntime-migraphx"}


def _pinned_builds(flavour: str) -> dict[str, str]:
    """{onnxruntime distribution: pinned version} a Dockerfile installs by name (the project's own pin aside)."""
    from sluicegate.runtime import ONNXRUNTIME_BUILDS

    pinned = {}
    for args in _pip_installs(INFRA / "docker" / f"Dockerfile.{flavour}"):
        pinned |= {name: version for name, version in _installed_versions(args)[0] if name in ONNXRUNTIME_BUILDS}
    return pinned


@pytest.mark.parametrize("flavour", ["cuda", "rocm"])
def test_gpu_images_serve_with_the_onnxruntime_build_that_carries_their_targets_provider(flavour):
    from sluicegate.hardware import HARDWARE_PATH
    from sluicegate.runtime import PROVIDER_PACKAGES

    text = (INFRA / "docker" / f"Dockerfile.{flavour}").read_text()
    target = re.search(r"SLUICEGATE_TARGET=(\w+)", text).group(1)
    provider = yaml.safe_load(HARDWARE_PATH.read_text())["targets"][target]["provider"]
    build = IMAGE_BUILDS[flavour]
    assert PROVIDER_PACKAGES[provider].split()[0] == build, (flavour, provider)
    assert list(_pinned_builds(flavour)) == [build], f"Dockerfile.{flavour} must install {build} by its pin"
    assert "pip uninstall -y onnxruntime" in text  # the CPU build would shadow it: same `onnxruntime` module


def _index_versions(name: str) -> list[str] | None:
    """The versions the package index lists for `name`, as pip sees it; None when the index does not answer."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    match = re.search(r"^Available versions: (.+)$", out.stdout, flags=re.M)
    return [v.strip() for v in match.group(1).split(",")] if match else None


@pytest.mark.parametrize("flavour", ["cuda", "rocm"])
def test_the_onnxruntime_builds_the_images_pin_are_on_the_index(flavour):
    for name, version in _pinned_builds(flavour).items():
        versions = _index_versions(name)
        if versions is None:
            pytest.skip(f"the package index did not answer for {name}")
        assert version in versions, f"Dockerfile.{flavour} pins {name}=={version}; the index has {versions[:8]}"
