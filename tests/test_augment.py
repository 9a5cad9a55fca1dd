"""Batched augmentation on the device (`data.augment_device: cuda`), run here on CPU tensors: the distribution of
each per-sample parameter, each op against its reference kernel, shapes and dtypes, determinism in (seed, step),
and the engine's wiring (methods see the same batch keys; a resumed run is exact). Also `train.compile`'s wiring.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from semimed.config import TrainConfig, load_config
from semimed.data.augment import (
    COLOR_OPS,
    CUTOUT_FILL,
    RAND_AUGMENT_OPS,
    Normalizer,
    augment_batch,
    cutout,
    cutout_params,
    flip_translate,
    rand_augment,
    rand_augment_params,
    step_generator,
    strong_batch,
    weak_batch,
    weak_params,
)
from semimed.data.views import RunData
from semimed.engine import fit
from semimed.engine.checkpoint import canonical_key
from semimed.engine.loop import TrainStreams
from semimed.errors import SemimedError, UnknownNameError
from semimed.methods import create_method
from semimed.models.backbones import create_backbone

CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:cannot choose a threshold:RuntimeWarning"),
]


def images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def gen(seed: int = 0, step: int = 0, rank: int = 0) -> torch.Generator:
    return step_generator(seed, step, rank)


# ------------------------------------------------------------------------------------------------ weak view


def test_weak_parameters_are_drawn_per_sample_with_the_cpu_path_ranges() -> None:
    n, size = 20_000, 32
    params = weak_params(n, size, gen())
    for key in ("flip_h", "flip_v"):
        rate = params[key].float().mean().item()
        assert abs(rate - 0.5) < 0.015, (key, rate)  # 4.2 standard errors of a rate over 20,000 samples
    pad = size // 8  # RandomCrop(size, padding=size // 8): shifts of -4 .. 4 px
    for key in ("shift_x", "shift_y"):
        counts = torch.bincount(params[key] + pad, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1, "no shift beyond the padding"
        assert counts.min().item() > 0.8 * n / (2 * pad + 1), "every shift in [-pad, pad] about equally often"
    # Independent per sample and between the two axes (not one draw for the whole batch).
    assert len(torch.unique(params["shift_x"][:50])) > 5
    assert (params["flip_h"] != params["flip_v"]).float().mean().item() == pytest.approx(0.5, abs=0.015)


def test_flip_translate_matches_torchvision_flip_pad_crop_per_sample() -> None:
    batch, size = images(64, size=16, channels=3), 16
    pad = size // 8
    params = weak_params(len(batch), size, gen(1))
    out = flip_translate(batch, params)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    for i in range(len(batch)):
        ref = batch[i]
        if params["flip_v"][i]:
            ref = TF.vertical_flip(ref)
        if params["flip_h"][i]:
            ref = TF.horizontal_flip(ref)
        ref = TF.pad(ref, [pad], padding_mode="reflect")  # what RandomCrop(padding, "reflect") does
        top, left = pad + int(params["shift_y"][i]), pad + int(params["shift_x"][i])
        assert torch.equal(out[i], TF.crop(ref, top, left, size, size)), i


def test_weak_batch_is_deterministic_in_seed_step_and_rank() -> None:
    batch = images(32)
    first = weak_batch(batch, gen(0, 5))
    assert torch.equal(first, weak_batch(batch, gen(0, 5)))
    for other in (gen(0, 6), gen(1, 5), gen(0, 5, rank=1)):
        assert not torch.equal(first, weak_batch(batch, other))


# --------------------------------------------------------------------------------------------------- Cutout


def test_cutout_covers_a_quarter_of_each_image_at_its_own_place() -> None:
    n, size = 4000, 28
    params = cutout_params(n, size, gen())
    out = cutout(torch.zeros(n, 1, size, size, dtype=torch.uint8), params)
    filled = (out == CUTOUT_FILL).sum(dim=(1, 2, 3))
    assert torch.all(filled == (size // 2) ** 2), (
        "a square of half the side: 1/4 of the area, inside the image"
    )
    assert out.dtype == torch.uint8
    side = size // 2
    for key in ("top", "left"):  # corners uniform over the positions that keep the square inside
        counts = torch.bincount(params[key], minlength=size - side + 1)
        assert len(counts) == size - side + 1 and counts.min().item() > 0.6 * n / (size - side + 1)
    assert (
        len({(int(t), int(c)) for t, c in zip(params["top"][:100], params["left"][:100], strict=True)}) > 50
    )


# ------------------------------------------------------------------------------------------------ RandAugment


def test_rand_augment_draws_op_and_magnitude_per_sample_and_call() -> None:
    n = 14_000
    params = rand_augment_params(n, gen())
    assert params["op"].shape == (2, n)
    counts = torch.bincount(params["op"].flatten(), minlength=len(RAND_AUGMENT_OPS))
    assert counts.min().item() > 0.85 * 2 * n / len(RAND_AUGMENT_OPS)  # every op about equally often
    magnitude = params["magnitude"]
    assert 0.0 <= magnitude.min().item() and magnitude.max().item() < 1.0
    assert magnitude.mean().item() == pytest.approx(0.5, abs=0.01)  # U(0, 1), not one fixed magnitude
    assert (params["sign"] > 0).float().mean().item() == pytest.approx(0.5, abs=0.015)
    again = rand_augment_params(n, gen(0, 1))  # the next step: new magnitudes
    assert not torch.equal(again["magnitude"], magnitude)


def one_op(name: str, n: int, magnitude: float, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """Params applying op `name` in the first slot and identity in the second."""
    return {
        "op": torch.tensor([[RAND_AUGMENT_OPS.index(name)] * n, [0] * n]),
        "magnitude": torch.full((2, n), magnitude),
        "sign": torch.full((2, n), sign),
    }


def test_identity_and_zero_magnitudes_leave_images_unchanged() -> None:
    batch = images(8, channels=3)
    assert torch.equal(rand_augment(batch, one_op("identity", 8, 0.7)), batch)
    for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "contrast"):
        assert torch.equal(rand_augment(batch, one_op(name, 8, 0.0)), batch), name


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_match_torchvision_kernels(channels: int) -> None:
    batch = images(6, size=12, channels=channels, seed=3)
    m = 0.5
    factor = 1 + m * 0.9
    expected = {
        "brightness": TF.adjust_brightness(batch, factor),
        "contrast": TF.adjust_contrast(batch, factor),
        "sharpness": TF.adjust_sharpness(batch, factor),
        "posterize": TF.posterize(batch, 6),  # 8 - round(4 * 0.5) bits kept
        "solarize": TF.solarize(batch, 255 * (1 - m)),
        "autocontrast": TF.autocontrast(batch),
        "equalize": TF.equalize(batch),
    }
    if channels == 3:
        expected["color"] = TF.adjust_saturation(batch, factor)
    for name, ref in expected.items():
        out = rand_augment(batch, one_op(name, len(batch), m))
        # torchvision rounds some blends differently (float -> uint8 truncation vs rounding): within 1 level.
        assert (out.int() - ref.int()).abs().max().item() <= 1, name
    assert set(expected) <= set(COLOR_OPS)


def test_translate_moves_by_the_sampled_fraction_of_the_side() -> None:
    batch = images(2, size=20)
    out = rand_augment(batch, one_op("translate_x", 2, 0.5, sign=1.0))  # 0.3 * 0.5 * 20 = 3 px
    moved = torch.zeros_like(batch)
    moved[..., :-3] = batch[..., 3:]
    assert torch.equal(out, moved)


def test_each_sample_gets_its_own_strong_view() -> None:
    batch = images(1, size=24).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    out = strong_batch(batch, gen())
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    distinct = {bytes(v.numpy().tobytes()) for v in out}
    assert len(distinct) == 64
    # Cutout is always there: a square of the fill value, a quarter of the image or more.
    assert torch.all((out == CUTOUT_FILL).sum(dim=(1, 2, 3)) >= 12 * 12)


def test_augment_batch_checks_kind_and_input() -> None:
    batch = images(4)
    assert torch.equal(augment_batch("none", batch, gen()), batch)
    assert augment_batch("strong", batch, gen()).shape == batch.shape
    with pytest.raises(UnknownNameError, match="valid: none, weak, strong"):
        augment_batch("medium", batch, gen())
    with pytest.raises(ValueError, match="uint8 batch"):
        augment_batch("weak", batch.float(), gen())


# ---------------------------------------------------------------------------------------- engine wiring


def run_data(n_labeled: int = 24, n_unlabeled: int = 72, size: int = 16, seed: int = 0) -> RunData:
    rng = np.random.default_rng(seed)
    n = n_labeled + n_unlabeled + 40
    pixels = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    targets = np.arange(n) % 2
    pixels[targets == 1, :, :4, :] = 250  # a learnable class signal
    rows = np.arange(n)
    return RunData(
        pixels=pixels,
        targets=targets,
        rows={
            "labeled": rows[:n_labeled],
            "unlabeled": rows[n_labeled : n_labeled + n_unlabeled],
            "val": rows[-40:-20],
            "test": rows[-20:],
        },
        classes=["a", "b"],
        multilabel=False,
    )


def fixmatch(seed: int = 0):
    torch.manual_seed(seed)
    return create_method("fixmatch", create_backbone("small_cnn", 2, 1), 2, False, threshold=0.6)


def streams(augment_device: str, start_step: int = 0) -> TrainStreams:
    cfg = TrainConfig(batch_size=8, unlabeled_ratio=2, device="cpu")
    return TrainStreams(run_data(), fixmatch().needs, cfg, 0, start_step, 0, 1, augment_device)


def test_device_views_give_methods_the_same_batch_keys() -> None:
    normalize = Normalizer(1)
    cpu = streams("cpu").next(CPU, False, normalize)
    device = streams("cuda").next(CPU, False, normalize)
    assert list(device) == list(
        cpu
    )  # same keys in the same order: x, y, x_rows, x_index, u_weak, u_strong, …
    for key in cpu:
        assert device[key].shape == cpu[key].shape and device[key].dtype == cpu[key].dtype, key
    assert torch.equal(device["u_rows"], cpu["u_rows"]) and torch.equal(device["x_rows"], cpu["x_rows"])
    assert device["x"].dtype == torch.float32 and -1.0 <= device["x"].min() and device["x"].max() <= 1.0
    assert not torch.equal(device["u_weak"], device["u_strong"])


def test_device_views_of_a_step_do_not_depend_on_where_the_stream_started() -> None:
    normalize = Normalizer(1)
    straight = streams("cuda")
    for _ in range(3):
        straight.next(CPU, False, normalize)
    expected = straight.next(CPU, False, normalize)
    resumed = streams("cuda", start_step=3).next(CPU, False, normalize)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    state = torch.get_rng_state()
    streams("cuda").next(CPU, False, normalize)
    assert torch.equal(torch.get_rng_state(), state), "device views never draw from torch's global generator"


class Crash(Exception):
    pass


def crash_at(step: int):
    def report(metrics: dict, checkpoint: str | None) -> None:
        if metrics["step"] == step:
            raise Crash

    return report


def resume_matches_straight(tmp_path: Path, cfg: TrainConfig, **fit_kwargs) -> dict:
    """Train straight; train again with a crash at step 6 and resume; the weights and metrics agree exactly."""
    method = fixmatch()
    straight = fit(method, run_data(), cfg, seed=1, run_dir=tmp_path / "a", show_progress=False, **fit_kwargs)
    expected = {k: v.clone() for k, v in method.state_dict().items()}
    with pytest.raises(Crash):
        fit(
            fixmatch(),
            run_data(),
            cfg,
            seed=1,
            run_dir=tmp_path / "b",
            report=crash_at(6),
            show_progress=False,
            **fit_kwargs,
        )
    method = fixmatch(seed=7)  # another init: the checkpoint must replace it
    resumed = fit(method, run_data(), cfg, seed=1, run_dir=tmp_path / "b", show_progress=False, **fit_kwargs)
    assert resumed["resumed_from_step"] == 6
    for key, value in method.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert resumed["test/roc_auc"] == straight["test/roc_auc"]
    return straight


def test_fit_with_device_views_resumes_exactly(tmp_path: Path) -> None:
    cfg = TrainConfig(
        steps=10, batch_size=8, unlabeled_ratio=2, eval_every=6, checkpoint_every=6, device="cpu"
    )
    final = resume_matches_straight(tmp_path, cfg, augment_device="cuda")
    assert np.isfinite(final["train/loss"])


def test_augment_device_is_a_closed_set_result_key(tmp_path: Path) -> None:
    from semimed.config import result_keys

    with pytest.raises(SemimedError, match=r"data.augment_device 'gpu'; valid: cpu, cuda"):
        load_config(None, ["data.augment_device=gpu"])
    cfg = load_config(None, ["data.augment_device=cuda", "train.compile=true"])
    assert cfg.data.augment_device == "cuda" and cfg.train.compile is True
    keys = result_keys(cfg.to_dict())
    assert keys["data.augment_device"] == "cuda", "the two paths draw different views: part of the result"
    assert "train.compile" not in keys, "compiling is how a run executes, not what it computes"


# ------------------------------------------------------------------------------------------- train.compile


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile with the eager backend: Dynamo traces the networks as with inductor, in a fraction of the
    time (no code generation), so the wiring is tested here and the speed in scripts/bench_engine.py."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def test_compile_keeps_canonical_checkpoints_and_resumes_exactly(tmp_path: Path, eager_compile) -> None:
    cfg = TrainConfig(
        steps=10,
        batch_size=8,
        unlabeled_ratio=2,
        eval_every=6,
        checkpoint_every=6,
        device="cpu",
        compile=True,
    )
    resume_matches_straight(tmp_path, cfg)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step_0000010" / "state.pt", weights_only=True)
    assert state["method"], "a method state was saved"
    assert not [k for k in state["method"] if "_orig_mod" in k or k != canonical_key(k)]


def test_compile_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(torch, "compile", broken)
    cfg = TrainConfig(steps=2, batch_size=8, unlabeled_ratio=2, device="cpu", compile=True)
    with pytest.raises(
        SemimedError, match=r"train.compile=true, but torch.compile does not work.*cc is not found"
    ):
        fit(fixmatch(), run_data(), cfg, show_progress=False)


def test_compiled_module_prefix_is_not_part_of_the_canonical_key() -> None:
    assert canonical_key("model._orig_mod.module.fc.weight") == "model.fc.weight"
    assert canonical_key("model.module._orig_mod.conv1.weight") == "model.conv1.weight"
    assert canonical_key("model.submodule.weight") == "model.submodule.weight"


# ------------------------------------------------------------------------------------ sharing a device


def test_fit_sets_no_process_wide_device_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager_compile
) -> None:
    """Packed trials (`scaling.gpus_per_worker` < 1) share a GPU as separate processes; the engine must not
    set what a process would impose on the device's other users or on later code in the process: the
    current device, a memory cap, cuDNN's autotuner and determinism flags."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the engine must not set process-wide CUDA state")

    for name in ("set_device", "set_per_process_memory_fraction"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cfg = TrainConfig(steps=4, batch_size=8, unlabeled_ratio=2, eval_every=4, device="cpu", compile=True)
    fit(fixmatch(), run_data(), cfg, seed=1, run_dir=tmp_path, show_progress=False, augment_device="cuda")
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == flags


def test_augment_device_reaches_the_engine_from_a_run_config(demo_roots, tmp_path: Path, monkeypatch) -> None:
    """`data.augment_device` set in a config is the one the run uses (an option that validated but was never
    passed on would silently train with the other augmentation)."""
    import semimed.engine.loop as loop
    from semimed.experiment import run_training

    calls: list[str] = []
    original = loop.augment_batch

    def counting(kind, images, generator):
        calls.append(kind)
        return original(kind, images, generator)

    monkeypatch.setattr(loop, "augment_batch", counting)
    for device, expected in (("cpu", []), ("cuda", ["weak", "weak", "strong"])):
        calls.clear()
        cfg = load_config(
            None,
            [
                f"data.root={demo_roots['breakhis']}",
                "data.image_size=16",
                "method.name=fixmatch",
                "train.steps=1",
                "train.batch_size=8",
                "train.device=cpu",
                f"data.augment_device={device}",
            ],
        )
        run_training(cfg, tmp_path / device, show_progress=False)
        assert calls == expected, device
