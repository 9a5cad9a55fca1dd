"""Ray Job adapter: `semimed submit` sends a sweep to a Ray cluster through the Job API and follows it;
`semimed jobs list|logs|stop` wrap the same API.

The job runs `python -m semimed.cli sweep SPACE --address auto [--storage STORAGE] [--max-concurrent-trials N]`
on the head node, in a copy of the current directory (`runtime_env.working_dir`), without data, results or
virtual environments (`excludes`; Ray caps the upload at 512 MiB). Clusters run with token authentication
(Ray 2.60's `RAY_AUTH_MODE=token`): the client sends the token from `--token-path`, `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`. Anyone who can reach an unauthenticated Ray cluster can run
code on it; reach the dashboard through a tunnel (`ray dashboard`, `kubectl port-forward`), never a public
address.

Following a job streams its log with `JobSubmissionClient.tail_job_logs` (a websocket: new lines as the job
writes them) until the job ends, however long that takes. A dropped connection (a tunnel that restarts) is
resumed without repeating lines; Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import asyncio
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
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECONNECT_S = 5.0
AGENT_WAIT_S = 120.0  # how long `submit` waits for a just-started head's job agent


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _client(address: str, token_path: str | None):
    use_token(token_path)
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def connect(address: str, token_path: str | None = None):
    """A JobSubmissionClient for the dashboard at `address`; an unreachable or refusing cluster is one line."""
    try:
        return _client(address, token_path)
    except Exception as exc:  # the SDK raises RuntimeError/ConnectionError/HTTP errors with long texts
        raise SemimedError(f"{address}: cannot reach the Ray Job API: {_first_line(exc)}") from None


def sweep_entrypoint(
    space: str,
    overrides: list[str],
    storage: str | None,
    max_concurrent_trials: int | None = None,
    resume: bool = False,
) -> str:
    args = ["python", "-m", "semimed.cli", "sweep", space, *overrides, "--address", "auto"]
    if storage:
        args += ["--storage", storage]
    if max_concurrent_trials:
        args += ["--max-concurrent-trials", str(max_concurrent_trials)]
    if resume:
        args.append("--resume")
    return shlex.join(args)


def submit(
    space: str,
    overrides: list[str],
    address: str,
    storage: str | None = None,
    token_path: str | None = None,
    wait: bool = True,
    runtime_env: dict | None = None,
    max_concurrent_trials: int | None = None,
    resume: bool = False,
) -> tuple[str, str]:
    """Submit the sweep; with `wait`, stream its logs until it ends. Returns (job id, final status)."""
    space_path = Path(space)
    if not space_path.is_file():
        raise SemimedError(f"{space}: search space not found")
    if space_path.is_absolute() or ".." in space_path.parts:
        raise SemimedError(
            f"{space}: pass the search space relative to the current directory (it is uploaded)"
        )
    env = {"working_dir": ".", "excludes": RUNTIME_ENV_EXCLUDES, **(runtime_env or {})}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client = _client(address, token_path)
            job_id = client.submit_job(
                entrypoint=sweep_entrypoint(
                    space_path.as_posix(), overrides, storage, max_concurrent_trials, resume
                ),
                runtime_env=env,
                metadata={"tool": "semimed", "space": space_path.name},
            )
            break
        except SemimedError:
            raise
        except Exception as exc:  # the SDK raises RuntimeError/ConnectionError/HTTP errors with long texts
            # A head that has just started serves the dashboard before its job agent: Ray answers 500 "No
            # available agent to submit job, please try again later" (nothing was submitted).
            if "try again later" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise SemimedError(f"{address}: job submission failed: {_first_line(exc)}") from None
    print(f"submitted job {job_id} to {address}", flush=True)
    if not wait:
        return job_id, "SUBMITTED"
    return job_id, follow(client, job_id, address)


def follow(client, job_id: str, address: str = "") -> str:
    """Print the job's log as it grows until the job ends; returns its final status (`SUCCEEDED`, ...)."""
    import aiohttp  # ray[default]'s HTTP client: a dropped websocket raises its ClientError

    printed = [0]  # characters of the log printed so far, kept when a stream breaks off
    try:
        while True:
            try:
                asyncio.run(_tail(client, job_id, printed))
                status = _status(client, job_id)
            except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                status = _status(client, job_id, quiet=True)
                if status not in TERMINAL:
                    print(
                        f"[semimed] log stream of {job_id} interrupted ({_first_line(exc)}); reconnecting",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(RECONNECT_S)
                    continue
            if status in TERMINAL:
                break
            time.sleep(1.0)  # the stream ended while the job runs (a restarted dashboard): follow it again
    except KeyboardInterrupt:
        print(
            f"\n[semimed] stopped following; job {job_id} keeps running. "
            f"Logs: semimed jobs logs {job_id} --follow --address {address}; "
            f"stop: semimed jobs stop {job_id} --address {address}",
            file=sys.stderr,
        )
        return "RUNNING"
    print(f"job {job_id}: {status}", flush=True)
    return status


async def _tail(client, job_id: str, printed: list[int]) -> None:
    """Stream the log, leaving out the characters printed before (a reconnect starts again at the log's
    beginning); `printed[0]` counts what has been printed, also when the stream breaks off."""
    seen = 0
    async for chunk in client.tail_job_logs(job_id):
        if seen + len(chunk) > printed[0]:
            sys.stdout.write(chunk[max(0, printed[0] - seen) :])
            sys.stdout.flush()
            printed[0] = seen + len(chunk)
        seen += len(chunk)


def _status(client, job_id: str, quiet: bool = False) -> str:
    try:
        status = client.get_job_status(job_id)
    except Exception as exc:  # noqa: BLE001 - the dashboard is unreachable: the caller retries
        if quiet:
            return "UNKNOWN"
        raise SemimedError(f"job {job_id}: no status: {_first_line(exc)}") from None
    return str(getattr(status, "value", status))


def list_jobs(address: str, token_path: str | None = None) -> list[str]:
    """One line per job, newest first: id, status, start time, entrypoint (shortened)."""
    client = connect(address, token_path)
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0, reverse=True)
    lines = []
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime((job.start_time or 0) / 1000))
        entry = job.entrypoint if len(job.entrypoint) <= 90 else job.entrypoint[:87] + "..."
        status = str(getattr(job.status, "value", job.status))
        lines.append(f"{job.submission_id or job.job_id}  {status:9s}  {started}  {entry}")
    return lines or ["no jobs"]


def job_logs(address: str, job_id: str, token_path: str | None = None, follow_logs: bool = False) -> str:
    """Print the job's log (all of it, or following it until the job ends); returns the job's status."""
    client = connect(address, token_path)
    if follow_logs:
        return follow(client, job_id, address)
    try:
        sys.stdout.write(client.get_job_logs(job_id))
    except Exception as exc:  # noqa: BLE001
        raise SemimedError(f"job {job_id}: no logs: {_first_line(exc)}") from None
    return _status(client, job_id)


def stop_job(address: str, job_id: str, token_path: str | None = None) -> str:
    """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL); returns the status after asking."""
    client = connect(address, token_path)
    try:
        client.stop_job(job_id)
    except Exception as exc:  # noqa: BLE001
        raise SemimedError(f"job {job_id}: cannot stop it: {_first_line(exc)}") from None
    return _status(client, job_id)
