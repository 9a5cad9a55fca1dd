"""A real two-node Ray cluster on loopback with token authentication, storage on a real S3 API (moto_server on
loopback), and `semimed submit` / `semimed jobs` / `semimed report s3://…` against it.

Head and worker are separate `ray start --block` processes (RAY_AUTH_MODE=token, the token in a file of the
test's own), each in its own session, working directory, HOME, TMPDIR, Ray temp dir and data cache, so that no
result can pass from one node to the other, or to the test, through a shared local folder: they share only the
dataset (read-only, as on NFS) and the bucket. A node and a job client without the token are refused. A 4-trial
sweep (Ray Train trials) is submitted, one Train worker is SIGKILLed mid-trial, the sweep finishes, every
trial's files are in the bucket and `semimed report s3://…` prints the table. The test stops exactly the
processes it started (their process groups), never other Ray clusters on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from s3server import free_port, moto_server

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
RUN_FILES = {"run.json", "config.yaml", "split.json", "env.json", "metrics.json", "predictions.parquet"}
STEPS = 60


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


class Node:
    """`ray start --block` in a session of its own: stopping it ends every process of that node, and only those."""

    def __init__(self, name: str, args: list[str], env: dict, root: Path) -> None:
        self.home = root / name  # its working directory, HOME, TMPDIR and data cache
        for sub in ("tmp", "cache"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        # Ray's own temp dir: short (Unix socket paths are limited to ~107 bytes), one per node.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix=f"r{name[0]}", dir="/tmp"))
        self.env = {
            **env,
            "HOME": str(self.home),
            "TMPDIR": str(self.home / "tmp"),
            "SEMIMED_CACHE": str(self.home / "cache"),
        }
        self.log = (root / f"{name}.log").open("w")
        # Agent ports of its own: Ray's default (52365) belongs to whichever Ray on the machine took it first.
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
        self.process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                f"--temp-dir={self.ray_tmp}",
                "--disable-usage-stats",
                *ports,
                *args,
            ],
            cwd=self.home,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        # SIGTERM lets `ray start --block` stop its processes (Ray drains a node for up to 30 s: not waited for
        # here), then SIGKILL ends whatever is left of this node's process group.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait)
        self.log.close()
        # Ray's logs of this node stay with the test's folder (pytest keeps the last runs' folders).
        with contextlib.suppress(OSError):
            shutil.copytree(
                self.ray_tmp / "session_latest" / "logs", self.home / "ray_logs", dirs_exist_ok=True
            )
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def wait_for(what: str, check, timeout: float = 90, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:  # 401 without the token: the server is up
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def cluster(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "TUNE_"))}
    base.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    nodes: list[Node] = []
    with moto_server(tmp_path / "moto.log") as s3:
        # Every node reaches the bucket as an EC2 node with an instance role would: by its environment.
        gcs, dashboard = free_port(), free_port()
        authed = {
            **base,
            **s3.env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # This cluster's processes look up the cluster by RAY_ADDRESS first (Ray Train's placement group
            # cleaner asks the State API), not by scanning the machine, which may run other Ray clusters.
            "RAY_ADDRESS": f"127.0.0.1:{gcs}",
        }
        try:
            head = Node(
                "head",
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={gcs}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}",
                    "--include-dashboard=true",
                    "--num-cpus=2",
                ],
                authed,
                tmp_path,
            )
            nodes.append(head)
            wait_for("the head's dashboard", lambda: http_up(f"http://127.0.0.1:{dashboard}/api/version"))
            yield {
                "gcs": f"127.0.0.1:{gcs}",
                "dashboard": f"http://127.0.0.1:{dashboard}",
                "token": token,
                "authed": authed,
                "anonymous": {**base, "HOME": str(tmp_path)},  # no token, no ~/.ray/auth_token
                "s3": s3,
                "nodes": nodes,
                "root": tmp_path,
            }
        finally:
            for node in reversed(nodes):
                node.stop()


def test_token_cluster_on_s3_runs_a_submitted_sweep_through_a_killed_worker(cluster, demo_roots, tmp_path):
    s3, env = cluster["s3"], cluster["authed"]
    # A node without the token cannot join.
    stranger = ray_cli(
        "start",
        f"--address={cluster['gcs']}",
        "--num-cpus=1",
        "--disable-usage-stats",
        env=cluster["anonymous"],
        timeout=120,
    )
    assert stranger.returncode != 0
    assert "auth" in (stranger.stdout + stranger.stderr).lower()
    # The second node, with the token, joins: a 2-node cluster on one machine.
    worker = Node(
        "worker",
        [f"--address={cluster['gcs']}", "--node-ip-address=127.0.0.1", "--num-cpus=2"],
        env,
        tmp_path,
    )
    cluster["nodes"].append(worker)

    def two_nodes() -> bool:
        status = ray_cli("status", f"--address={cluster['gcs']}", env=env)
        return status.stdout.count("node_") >= 2

    wait_for("the worker node to join", two_nodes, every=2)

    project = tmp_path / "project"  # what the job uploads: just the search space
    project.mkdir()
    (project / "space.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "cluster_sweep",
                "base": {
                    "data": {"dataset": "breakhis", "root": str(demo_roots["breakhis"]), "image_size": 24},
                    "model": {"backbone": "small_cnn"},
                    "train": {"steps": STEPS, "batch_size": 16, "eval_every": 30, "checkpoint_every": 10},
                },
                "grid": {"data.fraction": [0.2, 1.0], "seed": [0, 1]},
                "trial_resources": {"num_workers": 1, "cpus_per_worker": 1},
                # No max_concurrent_trials: the plan reads the cluster (1 trial per 2-CPU node: 2).
            }
        )
    )
    bucket = s3.create_bucket("semimed")
    experiment = f"s3://{bucket}/results/cluster_sweep"
    submit = [
        sys.executable,
        *("-m", "semimed.cli", "submit", "space.yaml"),
        *("--address", cluster["dashboard"], "--storage", f"s3://{bucket}/results"),
    ]
    client = cluster["anonymous"]  # the user's machine: no token unless --token-path
    # A client without the token is refused by the Job API.
    refused = subprocess.run(submit, cwd=project, env=client, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "job submission failed" in refused.stderr

    # With the token: submitted and followed while one trial's Train worker is killed.
    log = tmp_path / "submit.log"
    with log.open("w") as out:
        job = subprocess.Popen(
            [*submit, "--token-path", str(cluster["token"])], cwd=project, env=client, stdout=out, stderr=out
        )
    try:
        seen: dict[str, set[str]] = {}  # trial id -> Ray Train checkpoint folders seen in the bucket

        def committed_checkpoint() -> str | None:
            """The pid file of a trial whose first checkpoint Ray Train has registered: a worker uploads a
            checkpoint before the controller takes its report, and the third upload waits for the first report
            to be taken. (Ray keeps the two newest checkpoints, so the folders seen are counted over time.)"""
            assert job.poll() is None, log.read_text()[-4000:]  # the job must still run
            keys = s3.keys(bucket, "results/cluster_sweep/")
            for key in keys:
                if "/train/train-" in key and "/checkpoint_" in key:
                    trial, folder = key.split("/train/train-")[1].split("/")[:2]
                    seen.setdefault(trial, set()).add(folder)
            ready = [t for t, folders in seen.items() if len(folders) >= 3]
            pids = [k for k in keys if k.endswith("/workers/rank0.pid") and any(t in k for t in ready)]
            return pids[0] if pids else None

        pid_key = wait_for("a committed Ray Train checkpoint", committed_checkpoint, timeout=400, every=0.3)
        killed = int(s3.read(bucket, pid_key))
        os.kill(killed, signal.SIGKILL)  # one Train worker (rank 0 of one trial), mid-trial
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    job_id = re.search(r"submitted job (\S+) to ", output).group(1)
    assert f"job {job_id}: SUCCEEDED" in output
    # The plan the sweep printed on the head: one 1.5-CPU trial per 2-CPU node.
    assert "plan: 4 trial(s), at most 2 at a time (as many as fit the running cluster (2 node(s)))" in output

    # Every trial's files are in the bucket; the killed trial resumed from a checkpoint in another process.
    keys = s3.keys(bucket, "results/cluster_sweep/")
    trials = sorted({k.split("/")[3] for k in keys if k.startswith("results/cluster_sweep/runs/")})
    assert len(trials) == 4
    killed_trial = pid_key.split("/")[3]
    for trial in trials:
        files = {k.split(f"/runs/{trial}/", 1)[1] for k in keys if f"/runs/{trial}/" in k}
        assert RUN_FILES | {"backbone.safetensors", "workers/rank0.pid"} <= files, (trial, sorted(files))
        assert any(f.startswith("tb/events.out.tfevents.") for f in files)
        metrics = json.loads(s3.read(bucket, f"results/cluster_sweep/runs/{trial}/metrics.json"))
        assert metrics["step"] == STEPS
        if trial == killed_trial:
            assert 10 <= metrics["resumed_from_step"] < STEPS  # from a checkpoint, not from step 0
            assert int(s3.read(bucket, pid_key)) != killed
    trial_dirs = {k.split("/")[2] for k in keys if "/semimed_trial_" in k}
    assert len(trial_dirs) == 4  # Tune's own trial folders (results, its logs) are in the bucket too
    # Nothing went through the nodes' local folders: their staging folders are gone.
    for node in cluster["nodes"]:
        assert not list((node.home / "tmp").glob("semimed-staging/*")), node.home

    # `semimed report` reads the experiment from the bucket (this process's own client, AWS_* only).
    report_env = {**cluster["anonymous"], **s3.env()}
    report = subprocess.run(
        [sys.executable, "-m", "semimed.cli", "report", experiment],
        env=report_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "4 finished trial(s) in 1 study." in report.stdout
    assert "| supervised" in report.stdout, report.stdout[-3000:]
    written = s3.keys(bucket, "results/cluster_sweep/report")
    assert [f"results/cluster_sweep/report.{ext}" for ext in ("csv", "md", "png")] == written

    # `semimed jobs` wraps the Job API: list and logs of this job; stop of a running one.
    jobs = [sys.executable, "-m", "semimed.cli", "jobs"]
    auth = ["--address", cluster["dashboard"], "--token-path", str(cluster["token"])]
    listed = subprocess.run([*jobs, "list", *auth], env=client, capture_output=True, text=True, timeout=60)
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s", listed.stdout, re.M), listed.stdout + listed.stderr
    logs = subprocess.run(
        [*jobs, "logs", job_id, *auth], env=client, capture_output=True, text=True, timeout=60
    )
    assert "plan: 4 trial(s)" in logs.stdout
    sleeper = ray_cli(
        *("job", "submit", "--no-wait", f"--address={cluster['dashboard']}", "--", "sleep", "600"),
        env={**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster["token"])},
    )
    sleeper = re.search(r"raysubmit_\w+", sleeper.stdout + sleeper.stderr).group(0)
    stopped = subprocess.run(
        [*jobs, "stop", sleeper, *auth], env=client, capture_output=True, text=True, timeout=60
    )
    assert stopped.returncode == 0, stopped.stderr
    assert re.match(rf"job {sleeper}: (STOPPED|PENDING|RUNNING)", stopped.stdout)

    def is_stopped() -> bool:
        listed = subprocess.run(
            [*jobs, "list", *auth], env=client, capture_output=True, text=True, timeout=60
        )
        return bool(re.search(rf"^{sleeper}\s+STOPPED\s", listed.stdout, re.M))

    wait_for("the stopped job", is_stopped, timeout=60, every=2)
