"""Storage locations (semimed/storage.py) against a real S3-compatible server on loopback (moto_server): paths and
URIs, the mirror of a staged run folder (what is uploaded, what never is), run identity on object storage, and
`semimed report s3://…` reading trials from the bucket and writing its files back. No Ray here: the sweep on
object storage is tests/test_ray.py and tests/test_cluster.py."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pandas as pd
import pytest
from s3server import moto_environment

from semimed import storage
from semimed.errors import SemimedError
from semimed.runs import RunIdentity, check_run_dir, write_identity


@pytest.fixture(scope="module")
def s3():
    """The server, with this process's AWS_* variables pointing at it (pyarrow reads them)."""
    with moto_environment() as server:
        yield server


def test_paths_and_uris_join_and_name_alike(tmp_path):
    uri = "s3://bucket/results/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.is_uri(uri) and not storage.is_uri(tmp_path) and not storage.is_uri(f"file://{tmp_path}")
    assert storage.normalize(uri) == "s3://bucket/results?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "exp", "runs/") == (
        "s3://bucket/results/exp/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.name_of(storage.join(uri, "exp")) == "exp"
    assert storage.normalize(f"file://{tmp_path}/a/../b") == str(tmp_path / "b")
    assert storage.join(str(tmp_path), "exp", "runs") == str(tmp_path / "exp" / "runs")
    with pytest.raises(SemimedError, match=r"^nosuchfs://x: not a storage location pyarrow can open"):
        storage.filesystem("nosuchfs://x")


def test_mirror_uploads_changes_only_and_never_checkpoints_or_hidden_files(s3, tmp_path):
    bucket = s3.create_bucket("mirror")
    local = tmp_path / "run"
    (local / "tb").mkdir(parents=True)
    (local / "checkpoints" / "step_0000010").mkdir(parents=True)
    (local / "config.yaml").write_text("a: 1\n")
    (local / "tb" / "events.out.tfevents.1").write_bytes(b"\x00" * 100)
    (local / "checkpoints" / "step_0000010" / "state.pt").write_bytes(b"weights")
    (local / ".lock").write_text("host pid 1")
    (local / ".metrics.json.123.tmp").write_text("{half")
    mirror = storage.Mirror(local, f"s3://{bucket}/exp/runs/t1")
    assert sorted(mirror.push()) == ["config.yaml", "tb/events.out.tfevents.1"]
    assert s3.keys(bucket) == ["exp/runs/t1/config.yaml", "exp/runs/t1/tb/events.out.tfevents.1"]
    assert mirror.push() == []  # nothing changed: nothing sent again
    (local / "tb" / "events.out.tfevents.1").write_bytes(b"\x00" * 150)  # a growing event file
    (local / "metrics.json").write_text('{"test/accuracy": 0.75}')
    assert sorted(mirror.push()) == ["metrics.json", "tb/events.out.tfevents.1"]
    assert len(s3.read(bucket, "exp/runs/t1/tb/events.out.tfevents.1")) == 150

    # A retry on another node: pull brings back what the bucket holds, byte for byte.
    other = storage.Mirror(tmp_path / "elsewhere", f"s3://{bucket}/exp/runs/t1")
    assert sorted(other.pull()) == ["config.yaml", "metrics.json", "tb/events.out.tfevents.1"]
    assert (tmp_path / "elsewhere" / "metrics.json").read_text() == '{"test/accuracy": 0.75}'
    assert other.push() == []  # what was pulled is in sync


def test_run_identity_holds_on_object_storage(s3, tmp_path):
    """A run folder on S3 belongs to one run: the staged folder pulls run.json, so a run with another config is
    refused (naming the S3 location, writing nothing) and the same run resumes."""
    bucket = s3.create_bucket("identity")
    target = f"s3://{bucket}/exp/runs/trial_1"
    mine = RunIdentity({"data.fraction": 0.1, "seed": 0}, "abc", {"semimed": "0.1.0", "git_commit": ""})
    other = RunIdentity({"data.fraction": 1.0, "seed": 0}, "abc", {"semimed": "0.1.0", "git_commit": ""})
    with storage.staged_folder(target) as folder:
        assert check_run_dir(folder.path, mine) is False  # a new folder
        write_identity(folder.path, mine)
        (folder.path / "config.yaml").write_text("seed: 0\n")
        staging = folder.path
    assert not staging.exists()  # the staging folder is removed; the bucket has the run
    before = s3.keys(bucket)
    assert before == ["exp/runs/trial_1/config.yaml", "exp/runs/trial_1/run.json"]

    with pytest.raises(SemimedError) as info, storage.staged_folder(target) as folder:
        check_run_dir(folder.path, other)
    assert str(info.value).startswith(f"{target} holds another run (data.fraction 0.1 → 1.0)")
    assert s3.keys(bucket) == before
    with storage.staged_folder(target) as folder:
        assert check_run_dir(folder.path, mine) is True  # the same run: it resumes


def test_staging_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    root = tmp_path / storage.STAGING_ROOT
    dead = root / f"trial.{socket.gethostname()}.999999999"
    foreign = root / "trial.otherhost.999999999"  # another host's pid says nothing here
    for folder in (dead, foreign):
        (folder / "checkpoints").mkdir(parents=True)
    fresh = storage._new_staging("trial")
    assert fresh.is_dir() and fresh.name == f"trial.{socket.gethostname()}.{os.getpid()}"
    assert not dead.exists() and foreign.exists()


def test_report_reads_trials_from_s3_and_writes_its_files_back(s3, tmp_path, capsys):
    from test_report import write_trial  # the report tests' trial builder (real config, split, predictions)

    from semimed.cli import main
    from semimed.report import write_report

    local = tmp_path / "exp"
    for seed in (0, 1):
        for fraction in (0.1, 1.0):
            write_trial(local, f"f{fraction}_s{seed}", seed=seed, fraction=fraction, skill=1.0 + fraction)
    (local / "runs" / "unfinished").mkdir()
    (local / "runs" / "unfinished" / "config.yaml").write_text("seed: 3\n")
    bucket = s3.create_bucket("results")
    uri = f"s3://{bucket}/semimed/exp"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.copy_file(path, storage.join(uri, path.relative_to(local).as_posix()))
    expected, _ = write_report(local)  # the same trials, read from disk

    assert main(["report", uri]) == 0
    out = capsys.readouterr().out
    assert f"Experiment directory: `{uri}`" in out and "# semimed report: exp" in out
    assert "1 unfinished (no metrics.json): unfinished." in out
    assert f"wrote {uri}/report.csv, report.md, report.png" in out
    keys = set(s3.keys(bucket, "semimed/exp/"))
    assert {"semimed/exp/report.csv", "semimed/exp/report.md", "semimed/exp/report.png"} <= keys
    from_s3 = pd.read_csv(io.BytesIO(s3.read(bucket, "semimed/exp/report.csv")))
    pd.testing.assert_frame_equal(from_s3, pd.read_csv(local / "report.csv"))
    assert not any(Path(k).name.startswith("report") for k in keys if "/runs/" in k)
    assert len(expected) == len(from_s3)

    with pytest.raises(SemimedError, match=rf"^s3://{bucket}/nothing: experiment directory not found$"):
        write_report(f"s3://{bucket}/nothing")
