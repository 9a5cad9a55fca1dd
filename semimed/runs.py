"""Run identity: a run folder belongs to one run, and a run resumes only itself.

A run's identity is everything that determines its result: the config without its operational keys
(`semimed.config.OPERATIONAL_KEYS`: name, output folder, device, loader workers, …), the split's content and the
code version (semimed's version, git commit, a hash of its source files, and the versions of torch, timm, numpy,
lightly and scikit-learn). Its fingerprint is a SHA-256 of the three, written to
`<run_dir>/run.json` when the run starts and into every checkpoint. A run started in a folder that holds another
run — another config, split or code version — stops before it writes anything, with a message that names the
folder and what differs (`data.fraction 0.1 → 1.0`). One process writes a run folder at a time (`RunLock`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semimed import __version__
from semimed.config import Config, result_keys
from semimed.data.splits import Split
from semimed.errors import SemimedError
from semimed.files import atomic_write_text, process_alive

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Files that mean "a run has written here" (a folder with none of them is free to use).
RUN_CONTENT = ("config.yaml", "split.json", "metrics.json", "checkpoints", "backbone.safetensors", RUN_FILE)
HEARTBEAT_S = 10.0  # a lock holder refreshes its lock file this often ...
STALE_AFTER_S = 60.0  # ... so a lock from another host untouched this long is left by a dead process


class RunLockedError(SemimedError):
    """Another live process holds the run folder's lock."""


@functools.cache
def git_commit() -> str:
    """The commit of the checkout semimed runs from ('' outside a git checkout, e.g. a Ray job's upload).

    Read once per process: the code a process runs is what it imported when it started, and a commit made
    while it runs must not change its identity between two checks (e.g. a pretraining's folder name and the
    run written into it). A retried trial starts a new process and reads the commit again."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def source_sha256(package: Path = Path(__file__).parent) -> str:
    """SHA-256 of semimed's own source files (*.py and the packaged *.yaml, paths and bytes), read once per
    process. It catches what a commit hash does not: an edit not yet committed, or code shipped without its
    .git folder (a Ray job's working_dir), so neither can resume or reuse a result of other code."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def library_versions() -> dict[str, str]:
    """The versions of the libraries that compute a result (kernels, model definitions, SSL losses)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "timm", "numpy", "lightly", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


def code_version() -> dict[str, str]:
    return {
        "semimed": __version__,
        "git_commit": git_commit(),
        "source_sha256": source_sha256(),
        **library_versions(),
    }


@dataclass(frozen=True)
class RunIdentity:
    config: dict[str, Any]  # result keys of the config (flattened, sorted)
    split_sha256: str
    code: dict[str, str]

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {"config": self.config, "split": self.split_sha256, "code": self.code},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "config": self.config,
                "split_sha256": self.split_sha256,
                "code": self.code,
            },
            indent=1,
            sort_keys=True,
            default=str,
        )

    @classmethod
    def load(cls, path: Path) -> RunIdentity:
        try:
            values = json.loads(path.read_text())
            return cls(values["config"], values["split_sha256"], values["code"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SemimedError(f"{path}: unreadable run identity ({type(exc).__name__}: {exc})") from None

    def differences(self, other: RunIdentity) -> list[str]:
        """What changes from `self` (the folder's run) to `other` (the new one), one short phrase each."""
        out = []
        for key in sorted(set(self.config) | set(other.config)):
            old, new = self.config.get(key, "(unset)"), other.config.get(key, "(unset)")
            if old != new:
                out.append(f"{key} {old!r} → {new!r}")
        if self.split_sha256 != other.split_sha256:
            out.append("the split (other images in train/val/test/labeled)")
        if self.code != other.code:
            out.append(f"the code ({_code_changes(self.code, other.code)})")
        return out


def _code_changes(old: dict[str, str], new: dict[str, str]) -> str:
    """`git_commit 1a2b3c4d5e → 6f7a8b9c0d; torch 2.14.1 → 2.15.0`: the parts of the code version that differ."""

    def short(value: str | None) -> str:
        return "(none)" if not value else value[:10]

    keys = sorted(set(old) | set(new))
    return "; ".join(
        f"{k} {short(old.get(k))} → {short(new.get(k))}" for k in keys if old.get(k) != new.get(k)
    )


def run_identity(cfg: Config, split: Split) -> RunIdentity:
    split_sha = hashlib.sha256(split.to_json().encode()).hexdigest()
    return RunIdentity(result_keys(cfg.to_dict()), split_sha, code_version())


def check_run_dir(run_dir: str | Path, identity: RunIdentity) -> bool:
    """Raise unless `run_dir` is free or holds this very run. Returns True when it holds this run already
    (a resume). Reads only: a refused run modifies nothing."""
    run_dir = Path(run_dir)
    record = run_dir / RUN_FILE
    if record.is_file():
        existing = RunIdentity.load(record)
        if existing.fingerprint == identity.fingerprint:
            return True
        changes = existing.differences(identity)
        raise SemimedError(
            f"{run_dir} holds another run ({'; '.join(changes) or 'a different fingerprint'}); it is left as it is. "
            "Give this run another name (or leave `name` unset for a new folder), or delete that folder to start over."
        )
    found = [name for name in RUN_CONTENT if (run_dir / name).exists()]
    if found and found != ["checkpoints"]:
        raise SemimedError(
            f"{run_dir} holds results ({', '.join(found)}) without a run identity ({RUN_FILE}): written by an older "
            "semimed or by hand, so a resume cannot be verified; use another run name or folder."
        )
    # A folder with checkpoints only (copied in to be evaluated, or left by a run killed before it wrote its
    # files): the newest checkpoint carries the fingerprint. Checked here, before this run writes its run.json,
    # config and split into the folder (the engine checks again when it resumes).
    if found:
        from semimed.engine.checkpoint import latest_checkpoint, load_checkpoint

        newest = latest_checkpoint(run_dir / "checkpoints")
        if newest is not None:
            fingerprint = load_checkpoint(newest).get("fingerprint")
            if fingerprint != identity.fingerprint:
                raise SemimedError(
                    f"{newest}: this checkpoint was written by another run (fingerprint "
                    f"{(fingerprint or 'none')[:12]} vs {identity.fingerprint[:12]}: another config, split or code "
                    f"version); {run_dir} is left as it is. Start the run under another name, or delete that folder."
                )
    return bool(found)


def write_identity(run_dir: Path, identity: RunIdentity) -> Path:
    return atomic_write_text(run_dir / RUN_FILE, identity.to_json())


def default_run_name(cfg: Config) -> str:
    """`<method>-<dataset>-<YYYYmmdd-HHMMSS>-<config hash>`: unique per start, so a new run never lands in (and
    resumes) an old run's folder by accident; the hash tells two runs started in the same second apart."""
    digest = hashlib.sha256(json.dumps(result_keys(cfg.to_dict()), sort_keys=True, default=str).encode())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method.name}-{cfg.data.dataset}-{stamp}-{digest.hexdigest()[:6]}"


class RunLock:
    """`<run_dir>/.lock` (host and pid) while a process writes the run folder: a second process gets an error
    instead of interleaving checkpoints with the first. A lock left by a dead process is taken over: on this
    host when its pid is gone, from another host when it has not been refreshed for STALE_AFTER_S (a holder
    refreshes it every HEARTBEAT_S from a background thread)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"{self.run_dir}: another process ({self._holder()}) is writing this run folder; wait for it "
                    f"to finish, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            self._thread = threading.Thread(target=self._heartbeat, name="semimed-run-lock", daemon=True)
            self._thread.start()
            return self
        raise SemimedError(f"{self.path}: could not take the run folder's lock")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            # A failed refresh (a network filesystem's hiccup) is retried at the next beat: giving up would let
            # the lock of a live holder look stale to other hosts after STALE_AFTER_S.
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _stale(self) -> bool:
        host, _, pid = self._holder().partition(" pid ")
        if host == socket.gethostname() and pid.isdigit():
            return not process_alive(int(pid))
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True
