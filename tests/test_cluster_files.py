"""cluster/ configs parse, carry the fields a launch needs, enable token auth, expose nothing publicly, and
use the Ray version semimed pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "docker",
    ):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray()}-")
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    gpu_types = [t for t in config["available_node_types"].values() if t.get("max_workers", 0) > 0]
    assert gpu_types, "no autoscaled worker type"


def test_kuberay_manifests():
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == pinned_ray()
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer
        (group,) = spec["workerGroupSpecs"]
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes["shared"]
    assert "semimed.cli sweep" in job["spec"]["entrypoint"]
    text = (CLUSTER / "kuberay-raycluster.yaml").read_text() + (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert "LoadBalancer" not in text.replace("no LoadBalancer", "")


def test_dockerfile_and_runtime_env():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base.startswith(f"rayproject/ray:{pinned_ray()}-")
    assert "RAY_AUTH_MODE=token" in dockerfile
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for excluded in (".venv", ".git", "*.npz", "runs/"):
        assert excluded in env["excludes"]
    from semimed.jobs import RUNTIME_ENV_EXCLUDES

    assert set(RUNTIME_ENV_EXCLUDES) == set(env["excludes"])  # `semimed submit` uploads what the YAML says
