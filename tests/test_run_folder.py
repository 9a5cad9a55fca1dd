"""A run folder belongs to one run; what it holds is what was evaluated (issue: no silent wrong answers).

- identity: a run in a folder that holds another run (other config, split or code) stops before writing
  anything and says what differs; the same run resumes; default names never collide; one writer at a time;
- selection: the checkpoint the test metrics come from is stated; a typo in select_metric is an error;
- predictions.parquet: per-image scores at the reported checkpoint, which reproduce metrics.json;
- export: backbone.safetensors is the evaluated network at the reported checkpoint, for every method, and
  transfers and explains;
- file modes follow the umask.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semimed import runs
from semimed.cli import main
from semimed.config import load_config
from semimed.errors import SemimedError
from semimed.experiment import build_run, run_training
from semimed.losses import probabilities
from semimed.methods import METHODS
from semimed.metrics import evaluate_scores, roc_auc
from semimed.models.backbones import create_backbone
from semimed.models.checkpoints import read_backbone_metadata
from semimed.runs import RUN_FILE, RunIdentity, RunLock

pytestmark = [
    pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:val/.* was never defined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*dropped the head:RuntimeWarning"),
]
# Extra parameters a method cannot run without at 16 px (a new method that needs some adds them here).
METHOD_PARAMS = {"gan_ssl": ["method.params.image_size=16", "method.params.generator_width=8"]}


def config(demo_roots, *overrides: str):
    return load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=16",
            "data.fraction=0.3",
            "train.steps=8",
            "train.batch_size=8",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.lr=0.01",
            "train.device=cpu",
            "seed=0",
            *overrides,
        ],
    )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: 'nothing was modified' made checkable."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(demo_roots, tmp_path_factory) -> dict:
    """One finished supervised run (seed 0: the checkpoint selected on val is step 4, not the last, 8)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    cfg = config(demo_roots)
    final = run_training(cfg, folder, show_progress=False)
    return {"cfg": cfg, "folder": folder, "final": final}


# ------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("data.fraction=1.0", "data.fraction 0.3 → 1.0"),
        ("model.backbone=resnet18_28", "model.backbone 'small_cnn' → 'resnet18_28'"),
        ("method.name=fixmatch", "method.name 'supervised' → 'fixmatch'"),
        ("train.steps=12", "train.steps 8 → 12"),
    ],
)
def test_another_config_in_a_finished_run_folder_is_refused_and_changes_nothing(
    finished, demo_roots, override: str, said: str
) -> None:
    before = snapshot(finished["folder"])
    with pytest.raises(SemimedError) as error:
        run_training(config(demo_roots, override), finished["folder"], show_progress=False)
    message = str(error.value)
    assert str(finished["folder"]) in message and said in message and "another name" in message
    assert "\n" not in message
    assert snapshot(finished["folder"]) == before


def test_the_same_run_resumes_and_operational_keys_do_not_count(finished, demo_roots, tmp_path: Path) -> None:
    import shutil

    # A finished run is kept as it is (tests/test_run_outputs.py); one killed before its metrics.json resumes.
    folder = tmp_path / "run"
    shutil.copytree(finished["folder"], folder)
    (folder / "metrics.json").unlink()
    again = run_training(
        config(demo_roots, "train.loader_workers=0", "train.checkpoint_every=4", "name=other"),
        folder,
        show_progress=False,
    )
    assert again["resumed_from_step"] == 8 and again["test/roc_auc"] == finished["final"]["test/roc_auc"]


def test_a_checkpoint_of_another_run_is_never_resumed(finished, demo_roots, tmp_path: Path) -> None:
    # E.g. Ray Train restoring an old run of the same name from its storage.
    checkpoint = finished["folder"] / "checkpoints" / "step_0000008"
    with pytest.raises(SemimedError, match="written by another run .* refusing to resume"):
        run_training(config(demo_roots, "data.fraction=1.0"), tmp_path / "new", resume_from=checkpoint)


def test_a_folder_of_another_runs_checkpoints_only_is_refused_and_changes_nothing(
    finished, demo_roots, tmp_path: Path
) -> None:
    """Checkpoints copied into a folder (or left by a run killed before it wrote its files): a run of another
    config wrote its run.json, config and split into the folder before the engine refused the checkpoint, so
    the folder then claimed to be the new run and its owner's config was refused from it."""
    import shutil

    folder = tmp_path / "copied"
    shutil.copytree(finished["folder"] / "checkpoints", folder / "checkpoints")
    before = snapshot(folder)
    with pytest.raises(SemimedError, match=r"written by another run .* is left as it is"):
        run_training(config(demo_roots, "data.fraction=1.0"), folder, show_progress=False)
    assert snapshot(folder) == before
    resumed = run_training(finished["cfg"], folder, show_progress=False)  # its own run still resumes it
    assert resumed["resumed_from_step"] == 8


def test_another_code_version_is_refused(finished, demo_roots, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)
    identity = json.loads((folder / RUN_FILE).read_text())
    identity["code"]["git_commit"] = "0123456789abcdef"
    (folder / RUN_FILE).write_text(json.dumps(identity))
    with pytest.raises(SemimedError, match=r"the code \(git_commit 0123456789 → "):
        run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)


def test_an_uncommitted_edit_is_another_code_version(demo_roots, tmp_path: Path) -> None:
    """The git commit alone missed an edit not yet committed (and code shipped without .git): a run or a cached
    pretraining of the old code was resumed/reused by the new one. The source files' hash is in the identity."""
    package = tmp_path / "pkg"
    (package / "methods").mkdir(parents=True)
    (package / "methods" / "simclr.py").write_text("temperature = 0.5\n")
    before = runs.source_sha256(package)
    (package / "methods" / "simclr.py").write_text("temperature = 0.1\n")
    runs.source_sha256.cache_clear()  # a new process would read the files again
    assert runs.source_sha256(package) != before
    assert runs.code_version()["source_sha256"] == runs.source_sha256()  # the installed package's

    folder = tmp_path / "run"
    run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)
    identity = json.loads((folder / RUN_FILE).read_text())
    identity["code"]["source_sha256"] = before
    (folder / RUN_FILE).write_text(json.dumps(identity))
    with pytest.raises(SemimedError, match=r"the code \(source_sha256 [0-9a-f]{10} → [0-9a-f]{10}\)"):
        run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)


def test_a_commit_made_while_a_process_runs_does_not_change_its_code_version(monkeypatch) -> None:
    # Seen in a sweep: a commit landed between a trial naming its pretraining folder (by fingerprint) and
    # checking the run written into it, so the trial refused its own pretraining as "another run".
    commits = iter(["1111111111", "2222222222"])

    def rev_parse(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=next(commits) + "\n", stderr="")

    forget = getattr(runs.git_commit, "cache_clear", lambda: None)
    forget()
    monkeypatch.setattr(runs.subprocess, "run", rev_parse)
    try:
        assert runs.git_commit() == "1111111111"
        assert runs.code_version()["git_commit"] == "1111111111"  # not the commit made since
    finally:
        forget()  # later tests read the real checkout again


def test_the_callers_device_is_the_one_trained_on(demo_roots, tmp_path: Path) -> None:
    """A Ray Train worker passes its own device (cuda:<local rank>); seeding the run's GPU generator replaced it
    with train.device resolved again ("cuda" = GPU 0 for every rank). Here: train.device=cuda on a machine
    that trains on the CPU it was handed."""
    final = run_training(
        config(demo_roots, "train.steps=2", "train.device=cuda"),
        tmp_path / "run",
        device=torch.device("cpu"),
        show_progress=False,
    )
    assert final["step"] == 2


def test_results_without_an_identity_are_not_resumed(demo_roots, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SemimedError, match=f"without a run identity \\({RUN_FILE}\\)"):
        run_training(config(demo_roots, "train.steps=2"), tmp_path, show_progress=False)


def test_identity_differences_read_as_changes() -> None:
    old = RunIdentity({"data.fraction": 0.1, "seed": 0}, "aa", {"semimed": "0.1.0", "git_commit": "x"})
    new = RunIdentity({"data.fraction": 1.0, "seed": 0}, "bb", {"semimed": "0.1.0", "git_commit": "x"})
    assert old.differences(new) == [
        "data.fraction 0.1 → 1.0",
        "the split (other images in train/val/test/labeled)",
    ]
    assert old.fingerprint != new.fingerprint and len(old.fingerprint) == 64


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(demo_roots, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")  # a live process holds it
    with pytest.raises(SemimedError, match=rf"another process \({socket.gethostname()} pid {os.getpid()}\)"):
        run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (folder / ".lock").write_text(f"{socket.gethostname()} pid {dead.stdout.strip()}\n")
    assert run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)["step"] == 2
    assert not (folder / ".lock").exists()


def test_a_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    lock.write_text("elsewhere pid 1\n")
    with pytest.raises(SemimedError, match="another process"):
        RunLock(tmp_path).__enter__()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    with RunLock(tmp_path):
        assert lock.read_text().startswith(socket.gethostname())
    assert not lock.exists()


def test_cli_default_names_are_new_folders_and_resume_is_explicit(demo_roots, tmp_path: Path, capsys) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"output_dir: {tmp_path / 'runs'}\ndata:\n  root: {demo_roots['breakhis']}\n  image_size: 16\n"
        "train:\n  steps: 2\n  batch_size: 8\n  eval_every: 2\n"
    )
    assert main(["train", str(config_file), "--local"]) == 0
    assert main(["train", str(config_file), "--local", "data.fraction=1.0"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(p.name.startswith("supervised-breakhis-") for p in runs)
    fractions = sorted(load_config(p / "config.yaml").data.fraction for p in runs)
    assert fractions == [0.1, 1.0]  # two runs, two folders: neither resumed the other
    capsys.readouterr()
    assert main(["train", str(config_file), "--local", "--resume"]) == 2
    assert "--resume needs the run's name" in capsys.readouterr().err
    metrics = (runs[0] / "metrics.json").read_bytes()
    assert main(["train", str(runs[0] / "config.yaml"), "--local", "--resume"]) == 0
    assert "is finished (metrics.json); its results are kept" in capsys.readouterr().err
    assert (runs[0] / "metrics.json").read_bytes() == metrics  # a finished run is not run again
    assert main(["train", str(runs[0] / "config.yaml"), "--local", "--resume", "train.lr=0.5"]) == 2
    assert "train.lr 0.001 → 0.5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- selection, files


def test_a_select_metric_typo_is_an_error_naming_the_valid_ones() -> None:
    with pytest.raises(
        SemimedError, match="unknown train.select_metric 'balanced_acc'; valid: .*balanced_accuracy"
    ):
        load_config(None, ["train.select_metric=balanced_acc"])


def test_a_select_metric_of_the_other_task_is_an_error(demo_roots, tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match="'subset_accuracy' is not defined for this binary task"):
        run_training(config(demo_roots, "train.select_metric=subset_accuracy"), tmp_path, show_progress=False)


def test_metrics_say_which_checkpoint_they_come_from(finished, demo_roots, tmp_path: Path) -> None:
    final = finished["final"]
    assert final["reported_checkpoint"] == "selected" and final["selected_step"] == 4
    assert final["select_metric"] == "roc_auc" and final["evaluated_model"] == "model"
    assert final["test/roc_auc"] != final["test_last/roc_auc"]  # the two checkpoints differ here
    last = run_training(config(demo_roots, "data.val_policy=none"), tmp_path, show_progress=False)
    assert last["reported_checkpoint"] == "last" and last["selected_step"] == 8
    assert last["test/roc_auc"] == last["test_last/roc_auc"]


def test_predictions_are_the_reported_checkpoints_and_reproduce_the_metrics(finished) -> None:
    folder, final = finished["folder"], finished["final"]
    table = pd.read_parquet(folder / "predictions.parquet")
    split = json.loads((folder / "split.json").read_text())
    test = table[table["split"] == "test"]
    assert sorted(test["path"]) == sorted(split["test"]) and (test["step"] == 4).all()
    assert sorted(table[table["split"] == "val"]["path"]) == sorted(split["val"])
    scores = test[["score/benign", "score/malignant"]].to_numpy()
    metrics = evaluate_scores(
        test["label"].to_numpy(), scores, ["benign", "malignant"], False, test["patient_id"]
    )
    for key in ("roc_auc", "accuracy", "balanced_accuracy", "patient_accuracy"):
        assert metrics[key] == pytest.approx(final[f"test/{key}"], abs=1e-9), key


def exported_scores(folder: Path, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(dataset rows, probabilities) of the run's test images under its exported backbone alone."""
    _, data, _ = build_run(cfg)
    meta = read_backbone_metadata(folder / "backbone.safetensors")
    model = create_backbone(
        cfg.model.backbone, len(data.classes), data.channels, checkpoint=str(folder / "backbone.safetensors")
    ).eval()
    mean, std = (
        np.array(json.loads(meta[k]), dtype=np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std")
    )
    rows = data.rows["test"]
    x = torch.from_numpy(
        ((np.asarray(data.pixels[rows], dtype=np.float32) / 255.0 - mean) / std).astype(np.float32)
    )
    with torch.no_grad():
        return rows, probabilities(model(x), data.multilabel).numpy()


def test_the_export_is_the_reported_network_not_the_last_step(finished) -> None:
    folder, final, cfg = finished["folder"], finished["final"], finished["cfg"]
    rows, scores = exported_scores(folder, cfg)
    labels = np.asarray(build_run(cfg)[1].targets)[rows]
    assert roc_auc(labels == 1, scores[:, 1]) == pytest.approx(final["test/roc_auc"], abs=1e-6)
    assert read_backbone_metadata(folder / "backbone.safetensors")["step"] == "4"


@pytest.mark.parametrize(
    "name", [n for n in METHODS.names() if not getattr(METHODS.get(n), "closed_form", False)]
)
def test_every_method_exports_transfers_and_explains(name: str, demo_roots, tmp_path: Path) -> None:
    """Train 2 steps, then: the export reproduces the reported test scores, another run starts from it, and
    `semimed explain` opens it (GAN-SSL's export failed both before)."""
    cfg = config(
        demo_roots, f"method.name={name}", "train.steps=2", "train.eval_every=1", *METHOD_PARAMS.get(name, [])
    )
    source = tmp_path / name
    run_training(cfg, source, show_progress=False)
    image = next(demo_roots["breakhis"].rglob("*.png"))
    out = tmp_path / "cam"
    if not METHODS.get(name).classifies:  # self-supervised pretraining: a backbone, nothing to explain
        assert not (source / "predictions.parquet").exists()
        assert main(["explain", str(source), "--images", str(image), "--out", str(out)]) == 2
    else:
        rows, scores = exported_scores(source, cfg)
        table = pd.read_parquet(source / "predictions.parquet").set_index("row")
        reported = table[table["split"] == "test"].loc[rows, ["score/benign", "score/malignant"]].to_numpy()
        np.testing.assert_allclose(scores, reported, atol=1e-5)
        assert main(["explain", str(source), "--images", str(image), "--out", str(out)]) == 0
        assert len(list(out.glob("*_gradcam.png"))) == 1

    target = config(demo_roots, "train.steps=1", "data.task=subtype", f"model.pretrained_checkpoint={source}")
    assert run_training(target, tmp_path / "transfer", show_progress=False)["step"] == 1


def test_explain_writes_one_overlay_per_input_even_for_equal_file_names(finished, tmp_path: Path) -> None:
    images = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((20, 20, 3), 40 if folder == "a" else 200, np.uint8)).save(
            tmp_path / folder / "x.png"
        )
        images.append(str(tmp_path / folder / "x.png"))
    assert (
        main(["explain", str(finished["folder"]), "--images", *images, "--out", str(tmp_path / "cam")]) == 0
    )
    written = sorted(p.name.split("_")[0] for p in (tmp_path / "cam").glob("*.png"))
    assert written == ["x", "x-2"]


def test_result_files_follow_the_umask(demo_roots, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        folder = tmp_path / "run"
        run_training(config(demo_roots, "train.steps=2"), folder, show_progress=False)
    finally:
        os.umask(previous)
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (str(path.relative_to(tmp_path)), oct(mode))
