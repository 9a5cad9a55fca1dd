"""Run identity: a run folder belongs to one run, and a run resumes only itself.

A run's identity is everything that determines its result: the config without its operational keys
(`semimed.config.OPERATIONAL_KEYS`: name, output folder, device, loader workers, …), the split's content and the
code version (semimed's version, git commit, a hash of its source files, and the versions of torch, timm, numpy,
lightly and scikit-learn), and a fingerprint of the data it read: every row's (path, size, mtime_ns) of its source
file, as the decode cache keys rows (`semimed.data.cache.source_stats`), so the same name over a dataset file
rewritten with other pixels is another run. Its fingerprint is a SHA-256 of the four, written to
`<run_dir>/run.json` when the run starts and into every checkpoint. A run started in a folder that holds another
run — another config, split, data or code version — stops before it writes anything, with a message that names
the folder and what differs (`data.fraction 0.1 → 1.0`). One process writes a run folder at a time (`RunLock`).
A finished run (metrics.json written) is never written again: the same run started there returns its results.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semimed import __version__
from semimed.config import Config, result_keys
from semimed.data.splits import Split
from semimed.errors import SemimedError
from semimed.files import atomic_write_text
from semimed.lockfile import HEARTBEAT_S, STALE_AFTER_S, Heartbeat, holder_line, read_holder, stale_reason

if TYPE_CHECKING:
    from semimed.data.base import LabeledImageSet

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"  # written last: a folder that holds it is a finished run
# Files that mean "a run has written here" (a folder with none of them is free to use).
RUN_CONTENT = ("config.yaml", "split.json", METRICS_FILE, "checkpoints", "backbone.safetensors", RUN_FILE)
# What a run writes into its folder (files and subfolders): no other command writes its output over them.
RUN_OWNED = (*RUN_CONTENT, "env.json", "predictions.parquet", "tb", "workers", LOCK_FILE)


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


def data_fingerprint(dataset: LabeledImageSet) -> dict[str, Any]:
    """What the run reads, cheaply: a SHA-256 over every row's (path, size, mtime_ns) of its source file, the
    key the decode cache notices a replaced image by (`semimed.data.cache.source_stats`: one stat per distinct
    file, so a MedMNIST .npz is stat'ed once), plus totals that make a change readable (`differences`).
    Rows read by a custom reader with no file semimed can see count by their path only."""
    from semimed.data.cache import source_stats

    files = dataset.source_files()
    stats = source_stats(dataset).tolist()
    digest = hashlib.sha256()
    distinct: dict[str, tuple[int, int]] = {}
    for path, source, (size, mtime_ns) in zip(dataset.meta["path"].astype(str), files, stats, strict=True):
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
        if source is not None:
            distinct[str(source)] = (size, mtime_ns)
    present = [stat for stat in distinct.values() if stat[0] >= 0]
    record: dict[str, Any] = {
        "rows": len(stats),
        "files": len(present),
        "bytes": sum(size for size, _ in present),
        "newest_mtime_ns": max((mtime for _, mtime in present), default=0),
        "sha256": digest.hexdigest(),
    }
    if len(distinct) == 1:  # a one-file dataset (MedMNIST .npz): name it in a difference
        record["file"] = next(iter(distinct))
    if len(present) < len(distinct):
        record["missing_files"] = len(distinct) - len(present)
    record["table_sha256"] = _table_digest(dataset)
    return record


def _table_digest(dataset: LabeledImageSet) -> str:
    """SHA-256 of what the metadata says of each row — classes, labels, patient ids, official split — so a
    relabelled manifest row or an edited label CSV is other data even where no image file changed."""
    digest = hashlib.sha256()
    digest.update(json.dumps([dataset.name, dataset.task, list(dataset.classes)]).encode())
    labels = np.nan_to_num(np.asarray(dataset.labels, dtype=np.float64), nan=-1.0)  # one byte form for NaN
    digest.update(np.ascontiguousarray(labels).tobytes())
    digest.update("\0".join(dataset.patients.astype(str)).encode())
    if dataset.official_split is not None:
        digest.update("\0".join(np.asarray(dataset.official_split).astype(str)).encode())
    return digest.hexdigest()


def _describe_data(record: dict[str, Any]) -> str:
    if not record:
        return "(not recorded)"
    when = datetime.fromtimestamp(record.get("newest_mtime_ns", 0) / 1e9).isoformat(sep=" ")
    text = (
        f"{record.get('bytes')} bytes, modified {when}"
        if "file" in record
        else f"{record.get('rows')} rows in {record.get('files')} file(s), {record.get('bytes')} bytes, "
        f"newest modified {when}"
    )
    return text + (f", {record['missing_files']} missing" if record.get("missing_files") else "")


@dataclass(frozen=True)
class RunIdentity:
    config: dict[str, Any]  # result keys of the config (flattened, sorted)
    split_sha256: str
    code: dict[str, str]
    data: dict[str, Any] = field(default_factory=dict)  # `data_fingerprint` of the dataset the run read

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {"config": self.config, "split": self.split_sha256, "code": self.code, "data": self.data},
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
                "data": self.data,
            },
            indent=1,
            sort_keys=True,
            default=str,
        )

    @classmethod
    def load(cls, path: Path) -> RunIdentity:
        try:
            values = json.loads(path.read_text())
            # A run.json written before the data fingerprint existed has none: it differs from any run now.
            return cls(values["config"], values["split_sha256"], values["code"], values.get("data") or {})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
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
        if self.data.get("table_sha256") != other.data.get("table_sha256"):
            out.append("the dataset's labels, classes, patient ids or official split (its metadata) changed")
        images = ("rows", "files", "bytes", "newest_mtime_ns", "sha256", "file", "missing_files")
        if any(self.data.get(k) != other.data.get(k) for k in images):
            where = other.data.get("file") or self.data.get("file")
            old, new = _describe_data(self.data), _describe_data(other.data)
            if old == new:  # the same totals: a file other than the newest changed, or one was renamed
                new += " (another file changed or was renamed)"
            out.append(f"data fingerprint changed: {where + ' ' if where else ''}{old} → {new}")
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


def run_identity(cfg: Config, split: Split, dataset: LabeledImageSet | None = None) -> RunIdentity:
    """The identity of the run `cfg` on `split` of `dataset` (loaded from cfg.data when not given)."""
    if dataset is None:
        from semimed.data import load_dataset

        dataset = load_dataset(cfg.data)
    split_sha = hashlib.sha256(split.to_json().encode()).hexdigest()
    return RunIdentity(result_keys(cfg.to_dict()), split_sha, code_version(), data_fingerprint(dataset))


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
            "This is a new run: use another name (or leave `name` unset for a new folder), or delete that folder "
            "to start over."
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
                    f"{(fingerprint or 'none')[:12]} vs {identity.fingerprint[:12]}: another config, split, data or "
                    f"code version); {run_dir} is left as it is. Start the run under another name, or delete that "
                    "folder."
                )
    return bool(found)


def write_identity(run_dir: Path, identity: RunIdentity) -> Path:
    return atomic_write_text(run_dir / RUN_FILE, identity.to_json())


def finished_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """The final metrics of a finished run (its metrics.json, which a run writes last), None when unfinished.
    A finished run is never written again: its results are what it reported, not a re-scoring."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SemimedError(
            f"{path}: unreadable metrics ({type(exc).__name__}: {exc}); left as it is"
        ) from None
    if not isinstance(values, dict):
        raise SemimedError(f"{path}: not a metrics file (a JSON object); left as it is")
    # metrics.json writes an undefined metric (NaN) as null: give it back as the NaN a fresh run returns, so a
    # kept run and a fresh one report the same values (Tune's searchers compare floats). Non-metric keys
    # (positive_class: null for a multi-class run) stay as written.
    return {k: (math.nan if v is None and "/" in k else v) for k, v in values.items()}


def check_name(value: str, key: str) -> str:
    """`value` as one folder name under its root (output_dir, --storage): a name with a path separator, `..`
    or an absolute path would put the run or experiment somewhere else, over whatever is there."""
    text = str(value)
    if text in (".", "..") or "/" in text or "\\" in text or "\0" in text or Path(text).is_absolute():
        raise SemimedError(
            f"{key}={text!r}: must be one folder name (no path separator, '..' or absolute path): it would "
            "put its files outside the results folder"
        )
    return text


def run_owning(path: str | Path) -> Path | None:
    """The run folder whose own files (`RUN_OWNED`: metrics.json, checkpoints/, …) `path` is or lies in, else
    None: what another command (predict, explain) must not write its output over."""
    target = Path(path).expanduser().resolve()
    for folder in target.parents:
        relative = target.relative_to(folder).parts
        if (folder / RUN_FILE).is_file() and relative and relative[0] in RUN_OWNED:
            return folder
    return None


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
    refreshes it every HEARTBEAT_S from a background thread): semimed/lockfile.py, shared with the cache's lock."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._heartbeat: Heartbeat | None = None

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
                handle.write(f"{holder_line()}\n")
            self._heartbeat = Heartbeat(self.path, HEARTBEAT_S)
            return self
        raise SemimedError(f"{self.path}: could not take the run folder's lock")

    def __exit__(self, *exc: object) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.path.unlink(missing_ok=True)

    def _holder(self) -> str:
        return read_holder(self.path)

    def _stale(self) -> bool:
        # A lock file gone meanwhile counts as stale too: there is nothing left to wait for.
        return not self.path.exists() or stale_reason(self.path, STALE_AFTER_S) is not None
