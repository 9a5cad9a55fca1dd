"""The engine without Ray: the LR schedule, the resumable batch stream, a loss that falls, resume from a checkpoint.

Runs are small (small_cnn, 16–32 px, at most 150 steps) so each test stays well under 20 s on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from semimed.config import Config, TrainConfig, load_config
from semimed.data.base import LabeledImageSet
from semimed.data.breakhis import load_breakhis
from semimed.data.splits import Split, make_split
from semimed.data.views import ImageView, StepBatchSampler, step_loader
from semimed.engine import RunData, fit, latest_checkpoint, load_checkpoint, lr_factor
from semimed.errors import SemimedError
from semimed.experiment import run_training
from semimed.methods import create_method
from semimed.models.backbones import create_backbone

FINAL_KEYS = ("accuracy", "balanced_accuracy", "roc_auc", "patient_accuracy")


# Barely trained models never predict some classes, and small test sets lack some findings: those metrics
# are NaN with a RuntimeWarning by design.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:cannot choose a threshold:RuntimeWarning"),
]


def demo_config(demo_roots: dict[str, Path], *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=32",
            "model.backbone=small_cnn",
            "method.name=supervised",
            "train.batch_size=32",
            "train.device=cpu",
            "seed=0",
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------------------------ lr_factor


def test_cosine_schedule() -> None:
    cfg = TrainConfig(steps=100, schedule="cosine", warmup_steps=0)
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(25, cfg) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))  # cos(pi/4) = 0.7071 -> 0.8536
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(75, cfg) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # 0.1464
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(130, cfg) == pytest.approx(0.0, abs=1e-12)  # past the budget: stays at 0


def test_linear_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, schedule="cosine", warmup_steps=10)
    # warm-up: (step + 1) / 10 -> 0.1, 0.2, ..., 1.0 at step 9
    assert [lr_factor(s, cfg) for s in range(10)] == pytest.approx([0.1 * (s + 1) for s in range(10)])
    # cosine over the remaining 100 steps, starting at step 10
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    constant = TrainConfig(steps=110, schedule="constant", warmup_steps=4)
    assert [lr_factor(s, constant) for s in (0, 3, 4, 109)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_step_schedule() -> None:
    cfg = TrainConfig(steps=200, schedule="step", milestones=[0.5, 0.75])  # milestones at steps 100 and 150
    values = {s: lr_factor(s, cfg) for s in (0, 99, 100, 149, 150, 199)}
    assert values == pytest.approx({0: 1.0, 99: 1.0, 100: 0.1, 149: 0.1, 150: 0.01, 199: 0.01})


def test_unknown_schedule() -> None:
    with pytest.raises(SemimedError, match="unknown train.schedule 'linear'; valid: constant, cosine, step"):
        lr_factor(0, TrainConfig(schedule="linear"))


# ------------------------------------------------------------------------------------------ StepBatchSampler


def take(sampler: StepBatchSampler, count: int) -> list[list[int]]:
    stream = iter(sampler)
    return [next(stream) for _ in range(count)]


def test_sampler_resumes_mid_stream() -> None:
    n, batch, seed = 37, 8, 3  # 37 is not a multiple of 8: batches straddle epochs
    whole = take(StepBatchSampler(n, batch, seed), 25)
    for start in (1, 4, 5, 19):
        assert take(StepBatchSampler(n, batch, seed, start_step=start), 25 - start) == whole[start:]
    # random access does not depend on what the sampler produced before
    sampler = StepBatchSampler(n, batch, seed)
    later = sampler.global_batch_positions(20).tolist()
    assert sampler.global_batch_positions(0).tolist() == whole[0] and later == whole[20]
    assert take(StepBatchSampler(n, batch, seed + 1), 25) != whole


def test_sampler_ranks_share_the_global_batch() -> None:
    n, batch, seed = 37, 8, 5
    whole = take(StepBatchSampler(n, batch, seed), 12)
    for world in (2, 4):
        shares = [
            take(StepBatchSampler(n, batch, seed, start_step=0, rank=r, world_size=world), 12)
            for r in range(world)
        ]
        for step in range(12):
            assert all(len(share[step]) == batch // world for share in shares)
            interleaved = [shares[i % world][step][i // world] for i in range(batch)]
            assert interleaved == whole[step]
    # resuming on two ranks gives the same shares as running through
    resumed = take(StepBatchSampler(n, batch, seed, start_step=7, rank=1, world_size=2), 5)
    assert resumed == take(StepBatchSampler(n, batch, seed, rank=1, world_size=2), 12)[7:]


def test_sampler_epochs_are_permutations() -> None:
    n, batch = 37, 8
    stream = np.concatenate(take(StepBatchSampler(n, batch, seed=0), 20))  # 160 positions = 4 epochs + 12
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    tail = stream[4 * n :]
    assert len(set(tail.tolist())) == len(tail)
    epochs = [stream[e * n : (e + 1) * n].tolist() for e in range(4)]
    assert len({tuple(e) for e in epochs}) == 4, "each epoch is shuffled anew"
    # a set smaller than the batch: one batch spans several permutations
    small = take(StepBatchSampler(5, 12, seed=1), 5)
    flat = np.concatenate(small)
    assert all(sorted(flat[i : i + 5].tolist()) == list(range(5)) for i in range(0, 60, 5))


def test_sampler_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="empty set"):
        StepBatchSampler(0, 8, 0)
    with pytest.raises(ValueError, match="batch size 7 is not divisible by 2 workers"):
        StepBatchSampler(10, 7, 0, world_size=2)


def test_step_loader_yields_the_sampled_rows() -> None:
    pixels = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1).repeat(4, axis=2).repeat(4, axis=3)
    targets = torch.arange(20) % 3
    indices = np.array([3, 5, 7, 11, 13, 17, 19])
    view = ImageView(pixels, targets, indices, lambda image: image.float())
    loader = iter(step_loader(view, 4, seed=2, start_step=3, rank=0, world_size=1))
    sampler = StepBatchSampler(len(indices), 4, seed=2)
    for step in range(3, 8):
        x, y, rows = next(loader)
        expected = indices[sampler.global_batch_positions(step)]
        assert rows.tolist() == expected.tolist()
        assert x[:, 0, 0, 0].tolist() == expected.tolist() and y.tolist() == (expected % 3).tolist()


# ------------------------------------------------------------------------------------- a loss that falls


@pytest.fixture(scope="module")
def learning_run(demo_roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """150 supervised steps on the demo BreakHis subtypes (8 classes), reporting every 10 steps."""
    cfg = demo_config(
        demo_roots,
        "data.task=subtype",
        "data.fraction=0.5",
        "train.steps=150",
        "train.eval_every=10",
        "train.checkpoint_every=1000",
        "train.lr=1e-3",
    )
    run_dir = tmp_path_factory.mktemp("learning")
    reports: list[tuple[dict, str | None]] = []
    final = run_training(cfg, run_dir, report=lambda m, c: reports.append((dict(m), c)), show_progress=False)
    return {"cfg": cfg, "run_dir": run_dir, "reports": reports, "final": final}


def test_training_loss_falls(learning_run: dict[str, Any]) -> None:
    metrics = [m for m, _ in learning_run["reports"]]
    assert [m["step"] for m in metrics] == list(range(10, 151, 10))
    assert metrics[-1]["final"] is True
    losses = [m["train/loss"] for m in metrics]
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.6 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f} ({losses})"


def test_reported_lr_follows_the_schedule(learning_run: dict[str, Any]) -> None:
    cfg = learning_run["cfg"]
    for metrics, _ in learning_run["reports"]:
        # the LR after `step` optimizer steps, i.e. the one step `step` will use
        assert metrics["train/lr"] == pytest.approx(
            cfg.train.lr * lr_factor(metrics["step"], cfg.train), abs=1e-12
        )


def test_final_metrics(learning_run: dict[str, Any]) -> None:
    final = learning_run["final"]
    assert final["step"] == 150 and final["selected_step"] in range(10, 151, 10)
    for prefix in ("test", "test_last"):
        for key in FINAL_KEYS:
            value = final[f"{prefix}/{key}"]
            assert np.isfinite(value) and 0.0 <= value <= 1.0, (prefix, key, value)
    # the final report is the returned dict plus final=True, with the last checkpoint
    last_metrics, last_checkpoint = learning_run["reports"][-1]
    assert last_metrics == {**final, "final": True}
    assert Path(last_checkpoint) == learning_run["run_dir"] / "checkpoints" / "step_0000150"


def test_run_directory_holds_what_produced_the_numbers(learning_run: dict[str, Any], demo_roots) -> None:
    run_dir, cfg, final = learning_run["run_dir"], learning_run["cfg"], learning_run["final"]
    assert load_config(run_dir / "config.yaml") == cfg
    dataset = load_breakhis(demo_roots["breakhis"], task="subtype")
    assert Split.load(run_dir / "split.json") == make_split(dataset, 0.5, seed=0)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test/accuracy"] == pytest.approx(final["test/accuracy"]) and saved["step"] == 150
    assert {"python", "torch", "timm", "numpy"} <= set(json.loads((run_dir / "env.json").read_text()))
    assert any((run_dir / "tb").iterdir())
    # the decode-once cache went to $SEMIMED_CACHE (a session temp dir), never ~/.cache
    assert any(p.name.startswith("breakhis-32px-") for p in Path(os.environ["SEMIMED_CACHE"]).iterdir())


# ---------------------------------------------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


def resume_scenario(cfg: Config, root: Path) -> dict[str, Any]:
    """An uninterrupted 60-step run, and a run that crashes at step 40 and is then resumed in the same folder."""
    straight_dir, crash_dir = root / "straight", root / "crash"
    straight = run_training(cfg, straight_dir, show_progress=False)
    before: list[tuple[int, str | None]] = []

    def crash(metrics: dict, checkpoint: str | None) -> None:
        before.append((metrics["step"], checkpoint))
        if metrics["step"] == 40:  # reported after the step-40 checkpoint is written
            raise Crash("preempted")

    with pytest.raises(Crash):
        run_training(cfg, crash_dir, report=crash, show_progress=False)
    after: list[dict] = []
    final = run_training(cfg, crash_dir, report=lambda m, c: after.append(dict(m)), show_progress=False)
    return {
        "cfg": cfg,
        "straight_dir": straight_dir,
        "straight": straight,
        "crash_dir": crash_dir,
        "before": before,
        "after": after,
        "final": final,
    }


@pytest.fixture(scope="module")
def resume_runs(demo_roots, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """resume_runs(augment) -> the scenario for train.augment=augment (run once per module and value)."""
    done: dict[str, dict[str, Any]] = {}

    def get(augment: str) -> dict[str, Any]:
        if augment not in done:
            cfg = demo_config(
                demo_roots,
                "data.image_size=16",  # resume is about steps and state, not accuracy: keep it cheap
                "train.batch_size=16",
                "train.steps=60",
                "train.checkpoint_every=20",
                "train.eval_every=20",
                f"train.augment={augment}",
            )
            done[augment] = resume_scenario(cfg, tmp_path_factory.mktemp(f"resume_{augment}"))
        return done[augment]

    return get


def same_metrics(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> bool:
    """Equal keys and values, NaN equal to NaN (an undefined precision stays undefined)."""
    keys = set(a) - set(skip)
    if keys != set(b) - set(skip):
        return False
    return all(
        a[k] == b[k]
        or (isinstance(a[k], float) and isinstance(b[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in keys
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoints" / "step_0000060")["method"]


@pytest.mark.parametrize("augment", ["weak", "none"])
def test_resume_continues_from_the_saved_step(resume_runs, augment: str) -> None:
    runs = resume_runs(augment)
    crash_dir = runs["crash_dir"]
    assert [step for step, _ in runs["before"]] == [20, 40]
    assert Path(runs["before"][-1][1]) == crash_dir / "checkpoints" / "step_0000040"
    # resumed from 40: the only report is the final one at 60 (from 0 it would have reported 20 and 40 again)
    assert [m["step"] for m in runs["after"]] == [60]
    assert runs["after"][0]["final"] is True and runs["final"]["step"] == 60
    assert runs["final"]["resumed_from_step"] == 40 and runs["straight"]["resumed_from_step"] == 0
    folders = sorted(p.name for p in (crash_dir / "checkpoints").iterdir())
    assert folders == [
        "step_0000060"
    ]  # a finished run keeps its last checkpoint only, no staging folder left
    assert latest_checkpoint(crash_dir / "checkpoints") == crash_dir / "checkpoints" / "step_0000060"


def test_checkpoint_loads_with_weights_only(resume_runs) -> None:
    path = resume_runs("weak")["crash_dir"] / "checkpoints" / "step_0000060" / "state.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 60
    assert {"method", "optimizer", "scheduler", "scaler", "best"} <= set(state)
    assert state["scheduler"]["last_epoch"] == 60
    assert all(isinstance(v, torch.Tensor) for v in state["method"].values())
    assert any(k.startswith("model.") for k in state["method"])
    assert load_checkpoint(path.parent)["step"] == 60


def test_resume_without_augmentation_is_exact(resume_runs) -> None:
    runs = resume_runs("none")
    a, b = weights(runs["straight_dir"]), weights(runs["crash_dir"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert same_metrics(runs["final"], runs["straight"], skip=("train/images_per_s", "resumed_from_step"))


def test_uninterrupted_run_is_deterministic(resume_runs, tmp_path: Path) -> None:
    # Same seed and config in a fresh folder: identical weights on CPU, so equality below is a fair test.
    runs = resume_runs("weak")
    again = run_training(runs["cfg"], tmp_path, show_progress=False)
    a, b = weights(runs["straight_dir"]), weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["test/accuracy"] == runs["straight"]["test/accuracy"]


def test_resume_with_augmentation_matches_uninterrupted_run(resume_runs) -> None:
    runs = resume_runs("weak")
    a, b = weights(runs["straight_dir"]), weights(runs["crash_dir"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------- engine.fit on in-memory data


def memory_run_data(dataset: LabeledImageSet, method_seed: int = 0, augment: str = "none"):
    """(method, RunData) over an in-memory set: patient-disjoint split at fraction 0.5, a class signal added."""
    n = len(dataset)
    pixels = np.stack([dataset.read_image(i).transpose(2, 0, 1) for i in range(n)]).astype(np.int64)
    known = np.nan_to_num(dataset.stratify_labels(), nan=0.0)
    for k in range(dataset.num_classes):  # class k brightens row band k: learnable in a few steps
        band = slice(2 * k, 2 * k + 2)
        pixels[known[:, k] > 0.5, :, band, :] += 90
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    split = make_split(dataset, 0.5, seed=0)
    index = split.indices(dataset)
    channels = pixels.shape[1]
    torch.manual_seed(method_seed)
    model = create_backbone("small_cnn", dataset.num_classes, channels)
    method = create_method("supervised", model, dataset.num_classes, dataset.multilabel)
    data = RunData(
        pixels=pixels,
        targets=np.asarray(dataset.labels),
        rows=index,
        classes=dataset.classes,
        multilabel=dataset.multilabel,
        patient_ids=None if dataset.multilabel else dataset.patients.astype(str),
        labeled_augment=augment,
    )
    return method, data


def test_fit_resume_is_exact_without_random_augmentation(make_single_label_set, tmp_path: Path) -> None:
    dataset = make_single_label_set(num_classes=3, patients_per_class=8, images_per_patient=4, size=16)
    cfg = TrainConfig(steps=30, batch_size=16, eval_every=10, checkpoint_every=10, device="cpu")

    method, data = memory_run_data(dataset)
    straight = fit(method, data, cfg, seed=1, run_dir=tmp_path / "straight", show_progress=False)
    straight_state = {k: v.clone() for k, v in method.state_dict().items()}

    def crash(metrics: dict, checkpoint: str | None) -> None:
        if metrics["step"] == 20:
            raise Crash

    method, data = memory_run_data(dataset)
    with pytest.raises(Crash):
        fit(method, data, cfg, seed=1, run_dir=tmp_path / "resumed", report=crash, show_progress=False)
    method, data = memory_run_data(dataset, method_seed=99)  # other init: the checkpoint must overwrite it
    steps: list[int] = []
    resumed = fit(
        method,
        data,
        cfg,
        seed=1,
        run_dir=tmp_path / "resumed",
        show_progress=False,
        report=lambda m, c: steps.append(m["step"]),
    )
    assert steps == [30]
    for key, value in method.state_dict().items():
        assert torch.equal(value, straight_state[key]), key
    assert resumed["resumed_from_step"] == 20
    assert same_metrics(resumed, straight, skip=("train/images_per_s", "resumed_from_step"))


def test_fit_multilabel_with_unknown_labels(make_multilabel_set) -> None:
    dataset = make_multilabel_set(num_findings=4, num_patients=40, images_per_patient=3, nan_rate=0.2)
    method, data = memory_run_data(dataset, augment="weak")
    cfg = TrainConfig(steps=40, batch_size=16, eval_every=20, checkpoint_every=1000, lr=3e-3, device="cpu")
    reports: list[dict] = []
    final = fit(method, data, cfg, seed=0, report=lambda m, c: reports.append(m), show_progress=False)
    assert [m["step"] for m in reports] == [20, 40]
    for key in ("test/roc_auc", "test/average_precision", "test_last/roc_auc", "val/roc_auc"):
        assert np.isfinite(final[key]) and 0.0 <= final[key] <= 1.0, key
    assert {f"test/roc_auc/finding_{k}" for k in range(4)} <= set(final)
    assert final["test/roc_auc"] > 0.6, "a bright band per finding is learnable in 40 steps"


# ---------------------------------------------------------------------------------------- checkpoints, errors


class NotATensor:
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_checkpoint_needing_full_unpickling_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "step_0000010"
    folder.mkdir()
    torch.save({"step": 10, "method": {}, "extra": NotATensor()}, folder / "state.pt")
    with pytest.raises(SemimedError, match=rf"{folder / 'state.pt'}: not a loadable semimed checkpoint"):
        load_checkpoint(folder)
    with pytest.raises(SemimedError, match=r"state\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_fit_refuses_an_unsafe_checkpoint_to_resume_from(make_single_label_set, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step_0000010"
    folder.mkdir(parents=True)
    torch.save({"step": 10, "evil": NotATensor()}, folder / "state.pt")
    method, data = memory_run_data(make_single_label_set(patients_per_class=6, images_per_patient=2))
    cfg = TrainConfig(steps=20, batch_size=8, device="cpu")
    with pytest.raises(SemimedError, match=str(folder / "state.pt")):
        fit(method, data, cfg, run_dir=tmp_path, show_progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.name=fixmatchh", r"unknown method 'fixmatchh'; valid: .*\bsupervised\b"),
        (
            "model.backbone=resnet_nope",
            r"unknown model.backbone 'resnet_nope'; valid: .*\bsmall_cnn\b.*\bresnet18\b",
        ),
        ("method.params.threshold=0.9", r"unknown parameter\(s\) threshold for method 'supervised'"),
        ("train.optimizer=lion", r"unknown train.optimizer 'lion'; valid: adam, adamw, sgd"),
        ("train.amp=fp8", r"unknown train.amp 'fp8'; valid: off, bf16, fp16"),
    ],
)
def test_unknown_names_list_the_valid_ones(demo_roots, tmp_path: Path, override: str, message: str) -> None:
    # Closed sets (optimizer, amp) fail when the config is built; registry names when the run is built.
    with pytest.raises(SemimedError, match=message):
        run_training(demo_config(demo_roots, "train.steps=2", override), tmp_path, show_progress=False)


def test_run_training_rejects_a_split_for_another_dataset(demo_roots, tmp_path: Path) -> None:
    split = make_split(load_breakhis(demo_roots["breakhis"], task="binary"), 0.5, seed=0)
    path = split.save(tmp_path / "split.json")
    cfg = demo_config(demo_roots, "data.task=subtype", f"data.split_file={path}", "train.steps=2")
    with pytest.raises(SemimedError, match="split is for breakhis/binary, not breakhis/subtype"):
        run_training(cfg, tmp_path / "run", show_progress=False)


def test_rerunning_a_finished_run_keeps_its_results(resume_runs) -> None:
    """A finished run is never re-scored: the rerun returns (and reports once) the kept metrics.json, and no
    file of the folder changes (it used to re-evaluate and rewrite metrics.json without its val/train keys)."""
    runs = resume_runs("none")
    folder = runs["crash_dir"]
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    reports: list[dict] = []
    again = run_training(runs["cfg"], folder, report=lambda m, c: reports.append(m), show_progress=False)
    kept = json.loads((folder / "metrics.json").read_text())
    assert [m["step"] for m in reports] == [60] and reports[0]["final"] is True
    assert same_metrics(again, {k: (math.nan if v is None else v) for k, v in kept.items()})
    assert any(k.startswith(("train/", "val/")) for k in again), "the kept val/train entries are returned"
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("override", ["train.eval_every=0", "train.checkpoint_every=0", "train.batch_size=0"])
def test_zero_intervals_and_batch_are_named_or_mean_off(
    make_single_label_set, tmp_path: Path, override
) -> None:
    method, data = memory_run_data(make_single_label_set(patients_per_class=6, images_per_patient=2))
    key = override.split("=")[0]
    try:
        cfg = load_config(None, ["train.steps=4", "train.batch_size=8", "train.device=cpu", override])
        fit(method, data, cfg.train, run_dir=tmp_path, show_progress=False)
    except SemimedError as exc:  # a clear error naming the key ...
        assert key in str(exc)
    else:  # ... or, for the intervals, 0 meaning "off" (as grad_clip=0 does); a batch of 0 has no meaning
        assert key != "train.batch_size"
