"""cluster/ files validate against the schemas of the tools that read them, enable token auth and autoscaling,
mount the shared storage, expose nothing publicly, use the Ray version semimed pins, and agree with each other
and with the concurrency `semimed sweep --dry-run` plans for them.

- Ray cluster launcher YAMLs: Ray's own schema, ray/autoscaler/ray-schema.json of the installed (pinned) Ray,
  the file `ray up` validates against.
- KubeRay manifests: the RayCluster and RayJob CRDs' OpenAPI schemas from KubeRay v1.7.0 (cluster/schemas/,
  source and checksums in cluster/schemas/SOURCE.md), strict: an unknown field is an error, as for
  `kubectl apply --validate=strict` (a structural CRD schema would otherwise prune it silently).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def strict(schema):
    """A CRD schema that refuses unknown fields: `additionalProperties: false` wherever an object lists its
    properties and does not keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(plural: str) -> dict:
    with gzip.open(CLUSTER / "schemas" / f"ray.io_{plural}.v1.schema.json.gz") as handle:
        return strict(json.load(handle))


def errors(schema: dict, document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)
    ]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_is_valid_for_ray_up_and_mounts_shared_storage(name):
    import ray

    config = load(name)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    assert errors(schema, config) == []
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"] == f"rayproject/ray:{pinned_ray()}-py311-gpu"
    options = config["docker"]["run_options"]
    assert any("--shm-size" in option for option in options)
    # Shared storage: mounted on the host before Docker starts, and passed into the container.
    assert any("mount" in c and "/mnt/shared" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in options
    assert "-e SEMIMED_CACHE=/mnt/shared/semimed_cache" in options
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # what `semimed sweep` plans from
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    for node_type in config["available_node_types"].values():  # written out: the dry-run plans from them
        assert "CPU" in node_type["resources"]
    workers = [t for t in config["available_node_types"].values() if t.get("max_workers", 0) > 0]
    assert workers and all(t["resources"].get("GPU") == 1 and t.get("min_workers") == 0 for t in workers)


def test_gcp_boot_image_is_the_family_rays_gpu_example_uses():
    # Ray's python/ray/autoscaler/gcp/example-gpu-docker.yaml boots GPU docker nodes from this family with the
    # install-nvidia-driver metadata (an unverified family is what the issue found).
    config = load("gcp.yaml")
    for node_type in config["available_node_types"].values():
        for disk in node_type["node_config"]["disks"]:
            assert disk["initializeParams"]["sourceImage"] == (
                "projects/deeplearning-platform-release/global/images/family/common-cu121"
            )
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert {"key": "install-nvidia-driver", "value": "True"} in worker["metadata"]["items"]


@pytest.mark.parametrize(
    ("name", "plural"), [("kuberay-raycluster.yaml", "rayclusters"), ("kuberay-rayjob.yaml", "rayjobs")]
)
def test_kuberay_manifest_validates_against_the_crd(name, plural):
    document = load(name)
    assert errors(crd_schema(plural), document) == []
    # The strict schema does catch a misplaced field (a check that the check checks).
    broken = copy.deepcopy(document)
    spec = broken["spec"] if plural == "rayclusters" else broken["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["maxReplica"] = 8
    assert any("maxReplica" in e for e in errors(crd_schema(plural), broken))


def test_kuberay_cluster_and_job_agree_and_autoscale_with_token_auth():
    cluster, job = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # one cluster shape: tolerations, volumes, auth
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_ray()
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    pvc = load("kuberay-pvc.yaml")
    assert (pvc["kind"], pvc["spec"]["accessModes"]) == ("PersistentVolumeClaim", ["ReadWriteMany"])
    for group_spec in [spec["headGroupSpec"], group]:
        volumes = group_spec["template"]["spec"]["volumes"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
        assert pvc["metadata"]["name"] in claims
        mounts = group_spec["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in mounts
    text = (CLUSTER / "kuberay-raycluster.yaml").read_text() + (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert "LoadBalancer" not in text.replace("no LoadBalancer", "")


def test_rayjob_entrypoint_runs_the_concurrency_the_dry_run_plans(capsys):
    """The head of a KubeRay cluster cannot read the manifest: the RayJob passes --max-concurrent-trials, and
    it must be what `semimed sweep --dry-run --cluster-config cluster/kuberay-rayjob.yaml` plans."""
    from semimed.cli import main

    job = load("kuberay-rayjob.yaml")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "semimed.cli", "sweep"]
    assert any(a.startswith("data.root=/mnt/shared/") for a in args)
    given = int(args[args.index("--max-concurrent-trials") + 1])
    overrides = [a for a in args[5:] if "=" in a and not a.startswith("-")]
    space = str(ROOT / args[4])
    assert (
        main(
            [
                "sweep",
                space,
                *overrides,
                "--dry-run",
                "--cluster-config",
                str(CLUSTER / "kuberay-rayjob.yaml"),
            ]
        )
        == 0
    )
    planned = re.search(r"^plan: \d+ trial\(s\), at most (\d+) at a time", capsys.readouterr().out, re.M)
    assert planned and int(planned.group(1)) == given == 8


@pytest.mark.parametrize("name", [*LAUNCHERS, "kuberay-raycluster.yaml"])
def test_dry_run_on_a_cluster_config_prints_the_concurrency_a_user_gets(name, capsys):
    """8 GPU nodes at most, one 1-GPU trial each: 8 at a time, and the demand Tune shows the autoscaler."""
    from semimed.cli import main

    space = ROOT / "search_spaces" / "breakhis_label_fraction.yaml"
    assert main(["sweep", str(space), "--dry-run", "--cluster-config", str(CLUSTER / name)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^plan: \d+ trial\(s\), at most 8 at a time \(as many as fit ", out, re.M), out[-800:]
    assert "each trial: 1 Ray Train worker(s) × {CPU: 4, GPU: 1} + {CPU: 0.5} for the trial itself" in out
    assert "8 at a time: {CPU: 36, GPU: 8}" in out
    assert "Tune keeps up to 8 trial(s) pending" in out


def test_dockerfile_and_runtime_env():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    # rayproject/ray tags: {Ray version}-{py3XX}-{cpu|gpu|cuXXX} (docker/ray/README.md in the Ray repository).
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cpu|gpu|cu\d+)", base)
    assert match and match.group(1) == pinned_ray()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">=3.{match.group(2)}"  # the image's Python is the one semimed is tested with
    assert "RAY_AUTH_MODE=token" in dockerfile
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for excluded in (".venv", ".git", "*.npz", "runs/"):
        assert excluded in env["excludes"]
    from semimed.jobs import RUNTIME_ENV_EXCLUDES

    assert set(RUNTIME_ENV_EXCLUDES) == set(env["excludes"])  # `semimed submit` uploads what the YAML says


def test_cluster_walkthrough_exists_and_readme_links_it():
    walkthrough = (ROOT / "docs" / "cluster.md").read_text()
    for step in (
        "ray up cluster/aws.yaml",
        "semimed prepare",
        "semimed submit",
        "semimed report",
        "kubectl apply",
    ):
        assert step in walkthrough, step
    assert "docs/cluster.md" in (ROOT / "README.md").read_text()
    assert "docs/cluster.md" in (CLUSTER / "README.md").read_text()


def test_following_a_job_prints_its_log_once_through_a_dropped_connection(monkeypatch, capsys):
    """`semimed submit` / `semimed jobs logs --follow` stream with Ray's tail_job_logs until the job ends, with no
    time limit; a dropped stream (a restarted tunnel) is resumed without printing a line twice."""
    import aiohttp

    from semimed import jobs

    monkeypatch.setattr(jobs, "RECONNECT_S", 0.0)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)

    class Client:
        log = ["plan: 4 trial(s)\n", "start  a\n", "done   a\n", "start  b\n", "done   b\n"]

        def __init__(self) -> None:
            self.streams = 0
            self.statuses = iter(["RUNNING", "SUCCEEDED"])  # at the drop, at the end of the second stream

        async def tail_job_logs(self, job_id: str):
            self.streams += 1
            written = (
                3 if self.streams == 1 else 5
            )  # the job has written 3 chunks when the first stream drops
            for chunk in self.log[:written]:
                yield chunk
            if self.streams == 1:
                raise aiohttp.ClientConnectionError("connection reset")

        def get_job_status(self, job_id: str) -> str:
            return next(self.statuses)

    client = Client()
    assert jobs.follow(client, "raysubmit_1", "http://127.0.0.1:8265") == "SUCCEEDED"
    captured = capsys.readouterr()
    assert captured.out == "".join(Client.log) + "job raysubmit_1: SUCCEEDED\n"
    assert "interrupted (connection reset); reconnecting" in captured.err
    assert client.streams == 2
