"""A real two-node Ray cluster on loopback with token authentication, and `semimed submit` against it.

Head and worker are separate `ray start` processes (RAY_AUTH_MODE=token, the token in a file of the test's
own); a node and a job client without the token are refused; a sweep submitted through the Job API finishes
and leaves its results and TensorBoard files in the shared storage path. Both nodes are stopped at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cluster(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(
        HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0"
    )
    authed = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    gcs, dashboard = free_port(), free_port()
    # Each node its own short temp dir (Unix socket paths are limited to ~107 bytes): two nodes on one machine
    # sharing one would also share the job's unpacked working_dir, which one node may garbage-collect while the
    # job on the other still runs in it.
    head_tmp, worker_tmp = (Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw"))
    head = ray_cli(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--temp-dir={head_tmp}",
        "--disable-usage-stats",
        env=authed,
    )
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        yield {
            "gcs": f"127.0.0.1:{gcs}",
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "token": token,
            "authed": authed,
            "anonymous": base,
            "tmp": tmp_path,
            "worker_tmp": worker_tmp,
        }
    finally:
        ray_cli("stop", "--force", env=authed, timeout=60)
        for folder in (head_tmp, worker_tmp):
            shutil.rmtree(folder, ignore_errors=True)


def test_token_cluster_refuses_strangers_and_runs_a_submitted_sweep(cluster, demo_roots, tmp_path):
    # A node without the token cannot join.
    stranger = ray_cli(
        "start",
        f"--address={cluster['gcs']}",
        "--num-cpus=1",
        "--disable-usage-stats",
        env=cluster["anonymous"],
    )
    assert stranger.returncode != 0
    assert "auth" in (stranger.stdout + stranger.stderr).lower()
    # The second node, with the token, joins: a 2-node cluster on one machine.
    worker = ray_cli(
        "start",
        f"--address={cluster['gcs']}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        f"--temp-dir={cluster['worker_tmp']}",
        "--disable-usage-stats",
        env=cluster["authed"],
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    deadline = time.monotonic() + 60
    while True:  # the new raylet registers with the GCS a few seconds after `ray start` returns
        status = ray_cli("status", f"--address={cluster['gcs']}", env=cluster["authed"])
        if status.stdout.count("node_") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status.stdout.count("node_") >= 2, status.stdout

    project = tmp_path / "project"  # what the job uploads: just the search space
    project.mkdir()
    (project / "space.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "cluster_sweep",
                "base": {
                    "data": {"dataset": "breakhis", "root": str(demo_roots["breakhis"]), "image_size": 24},
                    "model": {"backbone": "small_cnn"},
                    "train": {"steps": 20, "batch_size": 16, "eval_every": 10, "checkpoint_every": 10},
                },
                "grid": {"data.fraction": [0.2, 1.0]},
                "trial_resources": {"num_workers": 1, "cpus_per_worker": 1},
                "max_concurrent_trials": 2,
            }
        )
    )
    storage = tmp_path / "shared_storage"
    submit = [
        sys.executable,
        "-m",
        "semimed.cli",
        "submit",
        "space.yaml",
        "--address",
        cluster["dashboard"],
        "--storage",
        str(storage),
    ]
    # A client without the token is refused by the Job API.
    refused = subprocess.run(
        submit, cwd=project, env=cluster["anonymous"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "job submission failed" in refused.stderr
    # With the token: submitted, followed to the end, results in the shared storage path.
    done = subprocess.run(
        [*submit, "--token-path", str(cluster["token"])],
        cwd=project,
        env=cluster["anonymous"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "SUCCEEDED" in done.stdout
    experiment = storage / "cluster_sweep"
    metrics = sorted(experiment.glob("runs/*/metrics.json"))
    assert len(metrics) == 2
    assert all(list(m.parent.glob("tb/events.out.tfevents.*")) for m in metrics)
    assert list(experiment.glob("**/events.out.tfevents.*"))
