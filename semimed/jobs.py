"""Ray Job adapter: `semimed submit` sends a sweep to a Ray cluster through the Job API and follows it.

The job runs `python -m semimed.cli sweep SPACE --address auto --storage STORAGE` on the head node, in a copy
of the current directory (`runtime_env.working_dir`), without data, results or virtual environments
(`excludes`; Ray caps the upload at 512 MiB). Clusters run with token authentication (Ray 2.60's
`RAY_AUTH_MODE=token`): the client sends the token from `--token-path`, `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`. Anyone who can reach an unauthenticated Ray cluster can run
code on it; reach the dashboard through a tunnel (`ray dashboard`, `kubectl port-forward`), never a public
address.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from semimed.errors import SemimedError

RUNTIME_ENV_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.npz",
    "*.npy",
    "data/",
    "semimed_demo/",
    "semimed_results/",
    "runs/",
    ".whl/",
    "*.pt",
    "*.safetensors",
    "*.png",
    "*.jpg",
]


def use_token(token_path: str | None) -> None:
    """Turn on token auth for this client process (the Ray SDK reads these variables)."""
    if token_path:
        if not Path(token_path).is_file():
            raise SemimedError(f"{token_path}: Ray auth token file not found")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_path).resolve())
    has_token = (
        token_path
        or os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def sweep_entrypoint(space: str, overrides: list[str], storage: str | None) -> str:
    args = ["python", "-m", "semimed.cli", "sweep", space, *overrides, "--address", "auto"]
    if storage:
        args += ["--storage", storage]
    return shlex.join(args)


def submit(
    space: str,
    overrides: list[str],
    address: str,
    storage: str | None = None,
    token_path: str | None = None,
    wait: bool = True,
    timeout_s: float = 24 * 3600,
    runtime_env: dict | None = None,
) -> tuple[str, str]:
    """Submit the sweep; with `wait`, stream its logs until it ends. Returns (job id, final status)."""
    use_token(token_path)
    from ray.job_submission import JobStatus, JobSubmissionClient

    space_path = Path(space)
    if not space_path.is_file():
        raise SemimedError(f"{space}: search space not found")
    if space_path.is_absolute() or ".." in space_path.parts:
        raise SemimedError(
            f"{space}: pass the search space relative to the current directory (it is uploaded)"
        )
    env = {"working_dir": ".", "excludes": RUNTIME_ENV_EXCLUDES, **(runtime_env or {})}
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=sweep_entrypoint(space_path.as_posix(), overrides, storage),
            runtime_env=env,
            metadata={"tool": "semimed", "space": space_path.name},
        )
    except Exception as exc:  # the SDK raises RuntimeError/ConnectionError/HTTP errors with long texts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SemimedError(f"{address}: job submission failed: {first}") from None
    print(f"submitted job {job_id} to {address}")
    if not wait:
        return job_id, "SUBMITTED"
    deadline = time.monotonic() + timeout_s
    seen = 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
        status = client.get_job_status(job_id)
        if status in terminal:
            break
        if time.monotonic() > deadline:
            raise SemimedError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(2.0)
    print(f"job {job_id}: {status}")
    return job_id, str(status.value if hasattr(status, "value") else status)
