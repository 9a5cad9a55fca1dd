"""What a sweep asks Ray for: the resources of one trial, how many trials run at once, and why.

A trial is one Tune trial (the `semimed_trial` function). With `scaling.num_workers >= 1` it reserves only
TRIAL_CPU for itself and starts a TorchTrainer whose workers each take `cpus_per_worker` (+ `gpus_per_worker`);
with `num_workers: 0` it trains in its own process and reserves the whole run.

How many trials run at once (`max_concurrent_trials`), first match:
1. `--max-concurrent-trials N`, then the search space's `max_concurrent_trials`;
2. what a cluster config fits at its largest (every worker group at its maximum): `--cluster-config FILE`
   (a `ray up` YAML or a KubeRay RayCluster/RayJob manifest), or, on a cluster started by `ray up`, the
   `~/ray_bootstrap_config.yaml` the launcher leaves on the head;
3. what the cluster fits now (a private local Ray: also at most one trial per physical core's worth of CPUs).
Never more than the sweep has trials. Trials are placed node by node (a trial's workers and itself must each
fit on one node), not by summing the cluster's resources.

Demand. Tune starts a placement group for each trial it has started but Ray cannot place yet. On a cluster it
may keep as many of those as the concurrency (TUNE_MAX_PENDING_TRIALS_PG), so an autoscaler sees the whole
sweep's demand at once and scales up to it. On a private local Ray only one: a 2-core machine deadlocked when
Tune staged trials ahead, as their reservations took the CPUs that the running trials' Train workers needed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semimed.config import Config, ScalingConfig
from semimed.errors import SemimedError
from semimed.tune.overrides import example_value, trial_label
from semimed.tune.space import SearchSpace

# The trial function itself only waits on its TorchTrainer: it reserves half a CPU, not a whole one.
TRIAL_CPU = 0.5
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster config on the head
MAX_NODES = 10_000  # a cluster config's nodes are simulated one by one; beyond this, the count is capped
PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


@dataclass(frozen=True)
class TrialShape:
    workers: int  # Ray Train workers; 0 = the trial trains in its own process
    worker: dict[str, float]  # one worker's reservation
    driver: dict[str, float]  # the Tune trial's own reservation (the whole run when in-process)

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [self.worker] * self.workers + [self.driver]

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles:
            for key, value in bundle.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def describe(self) -> str:
        if not self.workers:
            return f"in-process (no Train workers) {_res(self.driver)}"
        return (
            f"{self.workers} Ray Train worker(s) × {_res(self.worker)} + {_res(self.driver)} for the trial "
            f"itself = {_res(self.total)}"
        )


def trial_scaling(cfg: Config) -> ScalingConfig:
    """What a trial of `cfg` runs on. A closed-form method (`closed_form = True`: the classical baselines,
    scikit-learn on CPU, no network and no step loop) fits in the trial's own process on CPUs: no Ray Train
    worker group and no GPU, whatever the search space's `scaling` asks for the networks it is compared with."""
    from semimed.classical.fit import is_closed_form

    if is_closed_form(cfg.method.name):
        return dataclasses.replace(cfg.scaling, num_workers=0, use_gpu=False)
    return cfg.scaling


def shape_of(cfg: Config) -> TrialShape:
    """The resources of a trial of `cfg` (its `trial_scaling`)."""
    scaling = trial_scaling(cfg)
    own = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        own["GPU"] = float(scaling.gpus_per_worker)
    if scaling.num_workers == 0:
        return TrialShape(0, {}, own)
    return TrialShape(scaling.num_workers, own, {"CPU": TRIAL_CPU})


def trial_shapes(space: SearchSpace) -> list[tuple[TrialShape, list[str]]]:
    """Each distinct trial shape of the sweep with the methods of its trials (one entry per trial), in grid
    order. Trials differ when the grid varies `scaling.*` or mixes closed-form methods with networks."""
    shapes: list[tuple[TrialShape, list[str]]] = []
    for cell in space.cells or [{}]:
        cfg = space.trial_config(cell)
        shape = shape_of(cfg)
        methods = next((m for s, m in shapes if s == shape), None)
        if methods is None:
            shapes.append((shape, methods := []))
        methods.extend([cfg.method.name] * space.num_samples)
    return shapes


def trial_shape(space: SearchSpace) -> TrialShape:
    """The resources of the sweep's first trial (grid order)."""
    return shape_of(space.trial_config(space.cells[0] if space.cells else {}))


def trial_resources(space: SearchSpace) -> Callable[[dict[str, Any]], Any]:
    """`tune.with_resources`'s per-trial reservation: Tune calls it with a trial's parameters (the grid and
    sampled keys), and it reserves what that trial's `shape_of` says the trial process itself needs."""
    keys = list(space.grid) + list(space.sample)

    def reserve(params: dict[str, Any]):
        from ray import tune

        driver = shape_of(space.trial_config({k: params[k] for k in keys if k in params})).driver
        return tune.PlacementGroupFactory([driver])

    return reserve


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    count: int


@dataclass(frozen=True)
class Cluster:
    source: str  # what the numbers describe, e.g. "cluster/aws.yaml at its largest"
    nodes: tuple[NodeType, ...]
    cores: int | None = None  # a private local Ray: physical cores, which CPU trials compete for

    def describe(self) -> str:
        return "; ".join(f"{n.name} × {n.count} {_res(n.resources)}" for n in self.nodes)


def fits(shape: TrialShape, cluster: Cluster, limit: int) -> int:
    """How many trials (at most `limit`) fit at once, placing each reservation on the first node with room."""
    free = [dict(n.resources) for n in cluster.nodes for _ in range(min(n.count, MAX_NODES))][:MAX_NODES]
    count = 0
    while count < limit:
        taken: list[tuple[dict[str, float], dict[str, float]]] = []
        for bundle in shape.bundles:
            node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
            if node is None:
                for owner, back in taken:  # this trial does not fit: give back what it took
                    for key, value in back.items():
                        owner[key] += value
                return count
            for key, value in bundle.items():
                node[key] = node.get(key, 0.0) - value
            taken.append((node, bundle))
        count += 1
    if cluster.cores is not None and not shape.total.get("GPU"):
        # CPU trials on one machine compete for its physical cores (the private Ray pads logical CPUs to 4).
        per_trial = max(1, shape.workers) * (shape.worker or shape.driver).get("CPU", 1.0)
        count = min(count, max(1, int(cluster.cores // per_trial)))
    return count


def this_machine() -> Cluster:
    """This machine as a private local Ray sees it (semimed.train.init_ray: at least 4 logical CPUs)."""
    import torch

    cores = os.cpu_count() or 1
    resources = {"CPU": float(max(4, cores))}
    if torch.cuda.is_available():
        resources["GPU"] = float(torch.cuda.device_count())
    return Cluster("this machine", (NodeType("local", resources, 1),), cores=cores)


def running_cluster(local: bool) -> Cluster:
    """The nodes of the Ray this process is connected to, as they are now."""
    import ray

    nodes = [_ray_resources(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    shapes: list[dict[str, float]] = []
    for resources in nodes:  # nodes of the same size, counted together
        if resources not in shapes:
            shapes.append(resources)
    types = tuple(NodeType("node", shape, nodes.count(shape)) for shape in shapes)
    if local:
        return Cluster("this machine's local Ray", types, cores=os.cpu_count() or 1)
    return Cluster(f"the running cluster ({len(nodes)} node(s))", types)


def _ray_resources(values: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if k in ("CPU", "GPU")}


def load_cluster_config(path: str | Path) -> Cluster:
    """The largest cluster a config can grow to: a Ray cluster launcher YAML (every node type at its
    max_workers, within the global max_workers) or a KubeRay RayCluster / RayJob (every worker group at
    maxReplicas when enableInTreeAutoscaling, else replicas)."""
    path = Path(path).expanduser()
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as exc:
        raise SemimedError(f"{path}: cannot read the cluster config ({exc})") from None
    for doc in documents:
        if "available_node_types" in doc:
            return Cluster(f"{path} at its largest", _launcher_nodes(doc, path))
        if doc.get("kind") in ("RayCluster", "RayJob"):
            spec = doc.get("spec") or {}
            spec = spec.get("rayClusterSpec", {}) if doc["kind"] == "RayJob" else spec
            return Cluster(f"{path} ({doc['kind']}) at its largest", _kuberay_nodes(spec, path))
    raise SemimedError(f"{path}: neither a Ray cluster launcher config nor a KubeRay RayCluster/RayJob")


def _launcher_nodes(config: dict[str, Any], path: Path) -> tuple[NodeType, ...]:
    head = config.get("head_node_type")
    left = int(config.get("max_workers", 2))  # Ray's default for the global cap
    nodes = []
    for name, node in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (node.get("resources") or {}).items() if k in ("CPU", "GPU")}
        count = 1 if name == head else min(int(node.get("max_workers", left)), left)
        if name != head:
            left -= count
        if count and "CPU" not in resources:
            raise SemimedError(
                f"{path}: node type {name} has no resources (the launcher reads them from the instance type only "
                "at launch); write them, e.g. resources: {CPU: 8, GPU: 1}"
            )
        nodes.append(NodeType(name, resources, count))
    return tuple(nodes)


def _kuberay_nodes(spec: dict[str, Any], path: Path) -> tuple[NodeType, ...]:
    autoscaled = bool(spec.get("enableInTreeAutoscaling"))
    head = spec.get("headGroupSpec") or {}
    nodes = [NodeType("head", _pod_resources(head), 1)]
    for group in spec.get("workerGroupSpecs") or []:
        count = group.get("maxReplicas" if autoscaled else "replicas", group.get("replicas", 0))
        count = int(count or 0) * int(group.get("numOfHosts", 1))
        nodes.append(NodeType(group.get("groupName", "workers"), _pod_resources(group), count))
    return tuple(nodes)


def _pod_resources(group: dict[str, Any]) -> dict[str, float]:
    """A Ray pod's CPU/GPU as KubeRay starts Ray on it: rayStartParams first, else the container's limits."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    limits = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    cpu = params.get("num-cpus", limits.get("cpu", 0))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    out = {"CPU": float(_quantity(cpu))}
    if float(_quantity(gpu)):
        out["GPU"] = float(_quantity(gpu))
    return out


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity as a number of units (`500m` -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Plan:
    trials: int
    concurrency: int
    shape: TrialShape
    why: str
    cluster: Cluster
    fits: int
    local: bool
    # Every distinct trial shape with its trials' methods, when trials differ (see `trial_shapes`); `shape`
    # is then the one that fits the fewest trials at once, which sets the concurrency.
    shapes: tuple[tuple[TrialShape, tuple[str, ...]], ...] = ()

    @property
    def pending_trials(self) -> int:
        """Tune's TUNE_MAX_PENDING_TRIALS_PG (see the module docstring); a value the user set wins."""
        given = os.environ.get(PENDING_ENV, "")
        return int(given) if given.isdigit() else 1 if self.local else self.concurrency

    def _share(self, shape: TrialShape) -> str:
        """`18 of 72 trials: supervised` for the trials of `shape`."""
        methods = next(m for s, m in self.shapes if s == shape)
        return f"{len(methods)} of {self.trials} trials: {', '.join(dict.fromkeys(methods))}"

    def unfit(self) -> str:
        """Why not even one trial can run ("" when one can)."""
        if self.concurrency:
            return ""
        return (
            f"one trial needs {_res(self.shape.total)} ({self.shape.describe()}), more than any node of "
            f"{self.cluster.source} has ({self.cluster.describe()})"
        )

    def lines(self) -> list[str]:
        if not self.concurrency:
            return [
                f"plan: {self.trials} trial(s), none can run on {self.cluster.source}: {self.unfit()}",
                "  run it on a cluster (`--cluster-config FILE` plans for one) or lower trial_resources",
            ]
        total = {k: v * self.concurrency for k, v in self.shape.total.items()}
        lines = [
            f"plan: {self.trials} trial(s), at most {self.concurrency} at a time ({self.why})",
            f"  each trial: {self.shape.describe()}",
            f"  {self.concurrency} at a time: {_res(total)}; {self.cluster.source}: {self.cluster.describe()}",
        ]
        if len(self.shapes) > 1:  # trials differ: each kind, with how many trials and which methods
            lines[1] += f" ({self._share(self.shape)})"
            others = [f"  and: {s.describe()} ({self._share(s)})" for s, _ in self.shapes if s != self.shape]
            lines[2:2] = others
            lines[-1] += " (at most: the other trials ask for less)"
        if self.fits < min(self.concurrency, self.trials):
            lines.append(
                f"  note: {self.cluster.source} fits {self.fits} trial(s) at once; the others wait for resources"
                + (" (an autoscaler adds nodes for them)" if not self.local else "")
            )
        pending = self.pending_trials
        if self.local and pending == 1:
            lines.append(
                "  Tune stages 1 pending trial at a time on a local Ray (more deadlocked Train workers on 2 cores)"
            )
        elif pending >= self.concurrency:
            lines.append(
                f"  Tune keeps up to {pending} trial(s) pending, so an autoscaler sees the demand at once"
            )
        else:
            lines.append(f"  Tune keeps up to {pending} trial(s) pending ({PENDING_ENV})")
        return lines


def make_plan(space: SearchSpace, cluster: Cluster, local: bool, from_config: bool = False) -> Plan:
    """The concurrency by the rules in the module docstring (`from_config`: `cluster` is a config's largest).
    Concurrency 0: not one trial fits a machine or config that cannot grow (`Plan.unfit` says why). When
    trials differ in shape (`trial_shapes`), the one that fits the fewest at once sets the concurrency (Tune
    has one `max_concurrent_trials`)."""
    trials = max(1, len(space.trials))
    shapes = trial_shapes(space)
    shape, fit = min(((s, fits(s, cluster, trials)) for s, _ in shapes), key=lambda pair: pair[1])
    if fit == 0 and (from_config or local):
        concurrency, why = 0, "nothing fits"
    elif space.max_concurrent_trials:
        concurrency, why = min(space.max_concurrent_trials, trials), "max_concurrent_trials"
    elif fit == 0:
        concurrency = 1
        why = (
            "nothing fits the running cluster now; an autoscaling cluster grows only for the trials Tune asks "
            "for: pass --max-concurrent-trials N or --cluster-config FILE"
        )
    else:
        concurrency = fit
        why = f"as many as fit {cluster.source}" if fit < trials else f"all of them fit {cluster.source}"
    mixed = tuple((s, tuple(methods)) for s, methods in shapes) if len(shapes) > 1 else ()
    return Plan(trials, concurrency, shape, why, cluster, fit, local, mixed)


def plan_for_run(space: SearchSpace, cluster_config: str | None, local: bool) -> Plan:
    """The plan of a sweep about to run on the Ray this process is connected to."""
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if cluster_config or (not local and bootstrap.is_file()):
        plan = make_plan(space, load_cluster_config(cluster_config or bootstrap), local, from_config=True)
    else:
        plan = make_plan(space, running_cluster(local), local)
    if not plan.concurrency:  # the sweep would wait forever
        raise SemimedError(plan.unfit())
    return plan


def describe_trials(space: SearchSpace) -> list[str]:
    """One line per trial with its resources (what `--dry-run` prints)."""
    sampled = ", ".join(
        f"{k}~{kind}{args}" for k, spec in space.sample.items() for kind, args in spec.items()
    )
    lines = []
    for i, cell in enumerate(space.trials or [{}]):
        cfg = space.trial_config({**cell, **{k: example_value(v) for k, v in space.sample.items()}})
        s = trial_scaling(cfg)
        gpus = f", {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
        extra = f"; sampled {sampled}" if sampled else ""
        workers = f"{s.num_workers} Ray Train worker(s)" if s.num_workers else "in-process (no Train workers)"
        lines.append(
            f"{i:3d}  {trial_label(cell) or '(base)'}  [{workers} × {s.cpus_per_worker:g} CPU{gpus}; "
            f"{cfg.train.steps} steps; method {cfg.method.name}{extra}]"
        )
    return lines


def _res(values: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(values.items())) + "}"
