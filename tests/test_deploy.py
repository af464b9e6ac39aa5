"""deploy/: the container and manifests are consistent with the package and with each other.

Nothing here runs Docker or a cluster (neither exists on the CI machine); these checks catch the
drift that breaks a deployment silently: a port or path that no longer matches, a plugin install
that would re-resolve vLLM's torch, a vLLM base version the docs no longer name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _args(container: dict) -> dict[str, str]:
    out = {}
    for a in container.get("args", []):
        key, _, value = a.partition("=")
        out[key] = value
    return out


def test_dockerfile_installs_the_plugin_without_touching_vllms_dependencies():
    text = _dockerfile()
    base = re.search(r"^ARG VLLM_VERSION=v(\S+)$", text, re.M)
    assert base and re.search(r"^FROM vllm/vllm-openai:\$\{VLLM_VERSION\}$", text, re.M)
    # the release docs/GPU.md measures, inside the range pyproject's gpu extra allows
    assert base.group(1) in (ROOT / "docs" / "GPU.md").read_text()
    assert '"vllm>=0.26,<0.33"' in (ROOT / "pyproject.toml").read_text() and base.group(1).startswith("0.26")
    assert re.search(r"pip install --no-cache-dir --no-deps /opt/hadaquant\b", text)
    # every package directory pyproject maps is copied in
    for src in ("hq_vllm", "offline", "kernels"):
        assert re.search(rf"^COPY {src} /opt/hadaquant/{src}$", text, re.M), src


def test_dockerfile_offline_pins_match_the_lock_file():
    lock = dict(line.split("==") for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s;]*)", _dockerfile())
    assert pins, "the offline extras must be pinned"
    for name, version in pins:
        assert lock.get(name) == version, f"{name}=={version} differs from requirements/cpu.lock ({lock.get(name)})"


def test_dockerignore_keeps_build_outputs_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".gpu", ".git", "runs"):
        assert path in ignored


def test_compose_serves_the_port_it_publishes():
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = spec["services"]["hadaquant"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    cmd = svc["command"]
    port = cmd[cmd.index("--port") + 1]
    assert f"{port}:{port}" in svc["ports"] and f"localhost:{port}/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "hadaquant.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_kubernetes_deployment_probes_service_and_volumes_agree(manifests):
    assert set(manifests) == {"PersistentVolumeClaim", "Deployment", "Service"}
    dep, svc, pvc = manifests["Deployment"], manifests["Service"], manifests["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = _args(c)
    port = int(args["--port"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    # the model path lies on the mounted claim
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert args["--model"].startswith(mounts["models"] + "/")
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["models"] == pvc["metadata"]["name"]
    # as many GPUs as tensor-parallel ranks
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(args["--tensor-parallel-size"])
    assert c["image"] == yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["hadaquant"]["image"]
