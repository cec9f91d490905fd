"""The container image and the Kubernetes manifests: linted, validated, and consistent with the relay.

The Dockerfile is built only where a Docker engine answers; everywhere it is linted with
hadolint, and what it installs (the wheel of this project plus workflows/) is run with the
settings of deploy/base. The kustomize output is validated against the Kubernetes schemas.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from relay.app import routes
from relay.config import ENV_NAMES, SECRETS, RelayConfig
from relay.emulator import RunningEmulator
from tests.test_emulator_cli import free_port
from tests.test_logs import until_ready

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
# K3s releases track upstream Kubernetes; validate against a version current clusters run.
KUBERNETES_VERSION = "1.31"
BIN = Path(sys.executable).parent


def env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    return found


def render(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}"
    return matches[0]


# Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), " ".join(rest.split())))
    return instructions


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """hadolint finds nothing in the Dockerfile (and, as a control, does flag a careless one)."""
    hadolint = BIN / "hadolint"
    result = subprocess.run([hadolint, ROOT / "Dockerfile"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get install curl\nADD . /app\n")
    control = subprocess.run([hadolint, careless], capture_output=True, text=True, check=False)
    assert control.returncode != 0
    assert "DL3007" in control.stdout  # the 'latest' tag


def test_dockerfile_matches_the_relay() -> None:
    """Non-root user, the relay's port, a /healthz check, settings the relay knows, sources that exist."""
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users == ["10001:10001"]
    assert [args for word, args in final if word == "EXPOSE"] == [str(RelayConfig().port)]
    healthcheck = next(args for word, args in final if word == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert any(route.path == "/healthz" for route in routes())  # type: ignore[attr-defined]
    assert [args for word, args in final if word == "ENTRYPOINT"] == ['["comfy-relay"]']
    assert [args for word, args in final if word == "CMD"] == ['["serve"]']
    known = set(ENV_NAMES.values())
    for word, args in final:
        if word == "ENV":
            for pair in args.split():
                name = pair.split("=")[0]
                assert name in known or name.startswith(("PATH", "PYTHON")), name
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}/" in ignored or f"!{source}" in ignored, source


async def test_what_the_image_installs_runs_with_the_deploy_settings(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    """Built from the image's context alone, the package serves page, workflows and probes as deployed."""
    # The build stage's context: what .dockerignore lets through, copied as COPY does.
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(ROOT / "pyproject.toml", context)
    shutil.copy(ROOT / "README.md", context)
    shutil.copytree(ROOT / "relay", context / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, context,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, errors = await asyncio.wait_for(build.communicate(), 300)
    assert build.returncode == 0, errors.decode()
    (wheel,) = wheels.glob("comfy_relay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "relay/static/relay-client.js" in names
        assert "relay/static/index.html" in names
        archive.extractall(tmp_path / "site")
    site = tmp_path / "site"
    port = free_port()
    settings = env_file(DEPLOY / "base" / "relay.env")
    settings.update(
        COMFYUI_URL=emulator.url,
        RELAY_HOST="127.0.0.1",  # 0.0.0.0 in the pod; loopback here
        RELAY_PORT=str(port),
        RELAY_WORKFLOWS_DIR=str(ROOT / "workflows"),  # the image copies them to /app/workflows
        RELAY_ETA_FILE=str(tmp_path / "state" / "durations.json"),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import relay, sys; assert relay.__file__.startswith(sys.argv[1]); "
        "from relay.cli import main; sys.exit(main(['serve']))", str(site),
        cwd=tmp_path, env={**os.environ, **settings, "PYTHONPATH": str(site)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            await until_ready(http, process)
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/")).status_code == 200
            assert (await http.get("/static/relay-client.js")).status_code == 200
            workflows = (await http.get("/workflows")).json()["workflows"]
            assert {w["name"] for w in workflows} >= {"text2img", "portrait_mode"}
            assert (await http.get("/metrics")).status_code == 200
    finally:
        if process.returncode is None:
            process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    lines = stderr.decode().splitlines()
    assert lines
    assert all(line.startswith("{") for line in lines), "RELAY_LOG_FORMAT=json from relay.env"


def test_docker_build_where_an_engine_runs() -> None:
    """docker build, where a Docker engine answers (CI machines without one lint the Dockerfile instead)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine on this machine: the Dockerfile is linted (hadolint) instead")
    result = subprocess.run(
        [docker, "build", "-t", "comfy-relay:test", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# Manifests ----------------------------------------------------------------------------------


def validate(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_plain_manifests_validate_and_the_validator_bites() -> None:
    """Each file of the base validates strictly as it stands; an unknown field is caught (control)."""
    docs = []
    for path in sorted((DEPLOY / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    validate(docs)
    broken = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "folder", ["base", "overlays/in-cluster-comfyui", "overlays/replicas-redis", "overlays/comfyui-pool"]
)
def test_rendered_manifests_validate(folder: str) -> None:
    """`kubectl kustomize` output of the base and the overlay validates against the Kubernetes schemas."""
    docs = render(DEPLOY / folder)
    validate(docs)
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}


def test_every_setting_is_in_the_config_map() -> None:
    """The ConfigMap's env file names every setting but the secrets (from a Secret), with values the
    relay takes; the Deployment reads each secret from the Secret."""
    settings = env_file(DEPLOY / "base" / "relay.env")
    secrets = {ENV_NAMES[name] for name in SECRETS}
    assert set(settings) == set(ENV_NAMES.values()) - secrets
    deployment = (DEPLOY / "base" / "deployment.yaml").read_text()
    assert all(f"name: {env}\n" in deployment for env in secrets)
    config = RelayConfig.from_env(settings)
    assert config.host == "0.0.0.0"  # reachable from the kubelet and the Service
    assert config.log_format == "json"


def test_deploy_guide_names_every_setting() -> None:
    """docs/deploy.md has a row for each environment variable, the token included."""
    guide = (ROOT / "docs" / "deploy.md").read_text()
    missing = [env for env in ENV_NAMES.values() if f"| `{env}` |" not in guide]
    assert missing == []


def test_overlay_points_at_in_cluster_comfyui() -> None:
    """The overlay sets ComfyUI's cluster DNS name, a namespace, an image, and the ingress with affinity."""
    docs = render(DEPLOY / "overlays" / "in-cluster-comfyui")
    config = of_kind(docs, "ConfigMap")["data"]
    assert config["COMFYUI_URL"].endswith(".svc.cluster.local:8188")
    assert config["RELAY_PORT"] == "8190"  # merged over the base, not replacing it
    RelayConfig.from_env(config)
    assert {doc["metadata"].get("namespace") for doc in docs} == {"comfyui"}
    deployment = of_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == of_kind(docs, "ConfigMap")["metadata"]["name"]
    assert ":" in container["image"]
    ingress = of_kind(docs, "Ingress")
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$arg_clientId"
    )
    assert (
        of_kind(docs, "Service")["metadata"]["annotations"][
            "traefik.ingress.kubernetes.io/service.sticky.cookie"
        ]
        == "true"
    )


def test_pool_overlay_finds_every_comfyui_pod_through_a_headless_service() -> None:
    """The relay's backends are the addresses of a headless Service of the ComfyUI pods, ready
    ones only, looked up by the name the relay is given."""
    docs = render(DEPLOY / "overlays" / "comfyui-pool")
    config = RelayConfig.from_env(of_kind(docs, "ConfigMap")["data"])
    assert config.pooled
    (entry,) = config.backend_entries
    pods = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "comfyui-pods")
    assert pods["spec"]["clusterIP"] == "None"
    assert pods["spec"]["publishNotReadyAddresses"] is False
    port = pods["spec"]["ports"][0]["port"]
    namespace = pods["metadata"]["namespace"]
    assert entry == f"dns+http://comfyui-pods.{namespace}.svc.cluster.local:{port}"
    relay = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "comfy-relay")
    assert relay["spec"]["selector"] != pods["spec"]["selector"]


def test_replicas_overlay_runs_three_relays_on_redis_without_affinity() -> None:
    """Three relay pods on the overlay's Redis, each telling the others where it is, no client
    affinity anywhere, and a disruption budget and rollout that keep two serving."""
    docs = render(DEPLOY / "overlays" / "replicas-redis")
    relays = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "comfy-relay")
    redis = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "comfy-relay-redis"
    )
    config = RelayConfig.from_env(of_kind(docs, "ConfigMap")["data"])
    assert relays["spec"]["replicas"] == 3
    assert relays["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    redis_services = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "comfy-relay-redis"
    ]
    port = redis_services[0]["spec"]["ports"][0]["port"]
    assert config.redis_url == f"redis://comfy-relay-redis:{port}/0"
    assert "noeviction" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    container = relays["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["RELAY_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{config.port}"
    relay_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "comfy-relay")
    assert "annotations" not in relay_service["metadata"]  # no sticky cookie
    assert (
        "nginx.ingress.kubernetes.io/upstream-hash-by"
        not in of_kind(docs, "Ingress")["metadata"]["annotations"]
    )
    assert of_kind(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    # The relay Service does not send traffic to Redis, nor the Redis Service to relays.
    assert (
        not relay_service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


def test_deployment_fits_the_relay() -> None:
    """Probes, ports, grace period, security context and writable paths agree with the relay and image."""
    docs = render(DEPLOY / "base")
    config = RelayConfig.from_env(of_kind(docs, "ConfigMap")["data"])
    deployment = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    paths = {route.path for route in routes() if hasattr(route, "path")}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    assert container["readinessProbe"]["timeoutSeconds"] > config.ready_timeout
    assert container["ports"][0]["containerPort"] == config.port
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == config.port
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.shutdown_grace
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert str(Path(config.eta_file).parent) in mounts  # learned durations are written there
    assert "/tmp" in mounts
    token = next(item for item in container["env"] if item["name"] == "RELAY_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    labels = pod["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        of_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        of_kind(docs, "Service")["spec"]["selector"],
    ):
        assert selector
        assert selector.items() <= labels.items()
