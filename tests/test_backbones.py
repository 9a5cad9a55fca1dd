"""The backbone zoo: every documented backbone builds, trains a step on gray and RGB input at 64 px, and has
timm's parameter count; local weights load (and round-trip) or fail with a one-line error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from semimed.cli import main
from semimed.errors import SemimedError
from semimed.explain import GRADCAM_LAYERS, gradcam
from semimed.models.backbones import (
    TIMM_BACKBONES,
    SmallCNN,
    backbone_names,
    count_parameters,
    create_backbone,
)
from semimed.models.checkpoints import (
    BACKBONE_FILE,
    checkpoint_normalization,
    load_backbone_checkpoint,
    save_backbone,
)

ZOO = ["small_cnn", *TIMM_BACKBONES]
# Published ImageNet-1k parameter counts (3 x 224 px input, 1000-class head), as timm and the papers give them.
IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "seresnet50": 28_088_024,
    "darknet53": 41_609_928,
    "vgg16_bn": 138_365_992,
    "efficientnet_b0": 5_288_548,
    "vit_small_patch16_224": 22_050_664,
}


def small_cnn_params(in_chans: int, classes: int, width: int = 32) -> int:
    """Convs have no bias (BatchNorm follows); each BatchNorm has 2 affine parameters per channel."""
    total, cin = 0, in_chans
    for cout in (width, 2 * width, 4 * width):
        total += cin * cout * 9 + cout * cout * 9 + 2 * (2 * cout)
        cin = cout
    return total + 4 * width * classes + classes


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------- the zoo


def test_the_documented_zoo() -> None:
    assert set(ZOO) <= set(backbone_names())
    assert "resnet18_28" in backbone_names()


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ZOO)
def test_backbone_builds_trains_and_explains_at_64px(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=3, in_chans=in_chans, image_size=64)
    if name == "small_cnn":
        expected = small_cnn_params(in_chans, 3)
    else:
        extra = {"img_size": 64} if "vit" in name else {}
        expected = count_parameters(timm.create_model(name, num_classes=3, in_chans=in_chans, **extra))
    assert count_parameters(model) == expected

    x = torch.randn(2, in_chans, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The gradient reaches the first layer (the stem adapted to in_chans) and the head.
    first = next(n for n, p in model.named_parameters() if p.ndim == 4)
    assert grads[first].abs().sum() > 0
    assert model.get_classifier().weight.grad.abs().sum() > 0

    # Grad-CAM's documented layer exists and gives one map per image at the input size, scaled to [0, 1]
    # (run on RGB only: the gray path differs in the stem, not in what Grad-CAM hooks).
    assert GRADCAM_LAYERS[name] in dict(model.named_modules())
    if in_chans == 1:
        return
    cams, chosen, _ = gradcam(model, x, backbone=name)
    assert cams.shape == (2, 64, 64)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert chosen.shape == (2,)


def test_backbones_command_lists_imagenet_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name, count in IMAGENET_PARAMS.items():
        assert f"{count:,}" in lines[name], lines[name]
    assert f"{small_cnn_params(3, 1000):,}" in lines["small_cnn"]
    assert "layer4" in lines["resnet50"] and "features.norm5" in lines["densenet121"]


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(KeyError, match="resnet18, resnet50"):
        create_backbone("resnet_18", num_classes=2)


# -------------------------------------------------------------------------------------- pretrained weights


def test_pretrained_without_network_says_how_to_provide_weights() -> None:
    # HF_HUB_OFFLINE=1 (conftest): timm's hub download fails at once instead of waiting on the network.
    with pytest.raises(SemimedError) as excinfo:
        create_backbone("resnet18", num_classes=2, pretrained=True)
    message = one_line_error(excinfo)
    assert "'resnet18'" in message and "model.pretrained_checkpoint=PATH" in message


def test_local_backbone_has_no_published_weights() -> None:
    with pytest.raises(SemimedError, match="pretrained_checkpoint"):
        create_backbone("small_cnn", num_classes=2, pretrained=True)


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone())
        for k, v in model.state_dict().items()
    }
    # Variances must be positive, and small weights keep 18 random layers from overflowing.
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v * 0.05 for k, v in state.items()}


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "semimed_checkpoint", "run_dir", "nested"])
def test_checkpoint_round_trip(tmp_path: Path, fmt: str) -> None:
    source = create_backbone("resnet18", num_classes=4, in_chans=3)
    state = random_state(source, seed=1)
    if fmt == "torch":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    elif fmt == "nested":  # timm's train.py layout
        path = tmp_path / "checkpoint.pth.tar"
        torch.save(
            {"epoch": 3, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path
        )
    else:  # what semimed's engine writes: run/checkpoints/step_XXXXXXX/state.pt with state["method"]
        step = tmp_path / "run" / "checkpoints" / "step_0000040"
        step.mkdir(parents=True)
        method = {f"model.{k}": v for k, v in state.items()}
        method["teacher.fc.weight"] = torch.zeros(4, 512)  # another network of the method: ignored
        torch.save({"step": 40, "method": method, "optimizer": {}}, step / "state.pt")
        path = step / "state.pt" if fmt == "semimed_checkpoint" else tmp_path / "run"

    target = create_backbone("resnet18", num_classes=4, in_chans=3)
    report = load_backbone_checkpoint(target, path, name="resnet18")
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert report.dropped == [] and report.adapted == []
    assert len(report.loaded) == len(state)


def test_head_for_another_number_of_classes_is_dropped_and_reported(tmp_path: Path) -> None:
    state = random_state(create_backbone("resnet18", num_classes=14), seed=2)
    torch.save(state, tmp_path / "chest.pth")
    torch.manual_seed(5)
    target = create_backbone("resnet18", num_classes=2)
    head_before = target.fc.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"dropped the head \(fc.weight, fc.bias"):
        model = create_backbone("resnet18", num_classes=2, checkpoint=str(tmp_path / "chest.pth"))
    assert model.checkpoint_report.dropped == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.fc.weight.shape == (2, 512)
    report = load_backbone_checkpoint(target, tmp_path / "chest.pth")
    assert report.dropped == ["fc.weight", "fc.bias"]
    assert torch.equal(target.fc.weight, head_before)  # the new head keeps its fresh initialization


def test_first_conv_is_adapted_between_gray_and_rgb(tmp_path: Path) -> None:
    rgb = random_state(create_backbone("resnet18", num_classes=2, in_chans=3), seed=3)
    torch.save(rgb, tmp_path / "rgb.pth")
    gray_model = create_backbone("resnet18", num_classes=2, in_chans=1)
    report = load_backbone_checkpoint(gray_model, tmp_path / "rgb.pth")
    assert report.adapted == ["conv1.weight (3->1 input channels)"]
    # timm's adapt_input_conv: a gray image through the summed kernel = the same image replicated into RGB.
    assert torch.allclose(gray_model.conv1.weight, rgb["conv1.weight"].sum(dim=1, keepdim=True))

    gray = random_state(gray_model, seed=4)
    torch.save(gray, tmp_path / "gray.pth")
    rgb_model = create_backbone("resnet18", num_classes=2, in_chans=3)
    load_backbone_checkpoint(rgb_model, tmp_path / "gray.pth")
    # The reverse: each RGB channel gets a third, so a gray image replicated into RGB responds as before.
    assert torch.allclose(rgb_model.conv1.weight, gray["conv1.weight"].repeat(1, 3, 1, 1) / 3)
    x = torch.rand(1, 1, 32, 32)
    gray_model.load_state_dict(gray)
    gray_model.eval(), rgb_model.eval()
    with torch.no_grad():
        assert torch.allclose(
            rgb_model.forward_features(x.repeat(1, 3, 1, 1)), gray_model.forward_features(x), atol=1e-5
        )


def test_vit_position_embeddings_are_resampled(tmp_path: Path) -> None:
    big = random_state(create_backbone("vit_small_patch16_224", num_classes=2, image_size=224), seed=6)
    torch.save(big, tmp_path / "vit224.pth")
    small = create_backbone("vit_small_patch16_224", num_classes=2, image_size=64)
    report = load_backbone_checkpoint(small, tmp_path / "vit224.pth")
    assert report.adapted == ["pos_embed (197->17 tokens)"]  # 1 class token + 14x14 patches -> 1 + 4x4
    assert torch.equal(small.pos_embed[:, 0], big["pos_embed"][:, 0])  # the class token's embedding is kept
    assert torch.equal(small.blocks[11].mlp.fc2.weight, big["blocks.11.mlp.fc2.weight"])
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_export_carries_normalization_into_the_next_run(tmp_path: Path) -> None:
    source = create_backbone("small_cnn", num_classes=14, in_chans=1)
    path = save_backbone(
        source,
        tmp_path / BACKBONE_FILE,
        {"backbone": "small_cnn", "mean": [0.5], "std": [0.25], "multilabel": True},
    )
    target = create_backbone("resnet18", num_classes=2)
    assert checkpoint_normalization(tmp_path, target) == ((0.5,), (0.25,))
    with pytest.warns(RuntimeWarning, match="adapted features.0.0.weight"):
        fine = create_backbone("small_cnn", num_classes=2, in_chans=3, checkpoint=str(tmp_path))
    assert fine.pretrained_cfg["mean"] == (0.5,) and fine.pretrained_cfg["std"] == (0.25,)
    assert fine.checkpoint_report.source == str(path)
    # A plain ImageNet-style file says nothing: the architecture's own statistics apply.
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    assert checkpoint_normalization(tmp_path / "plain.pth", target) == (
        target.pretrained_cfg["mean"],
        target.pretrained_cfg["std"],
    )


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(SemimedError) as excinfo:
        create_backbone("resnet18", num_classes=2, checkpoint=str(tmp_path / "nope.pth"))
    assert (
        one_line_error(excinfo) == f"{tmp_path / 'nope.pth'}: pretrained checkpoint not found "
        f"(model.pretrained_checkpoint)"
    )


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(SemimedError) as excinfo:
        create_backbone("resnet18", num_classes=2, checkpoint=str(tmp_path))
    assert one_line_error(excinfo).startswith(f"{tmp_path}: folder has no {BACKBONE_FILE}")


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ("resnet50", "shape mismatch(es) (first: layer1.0.conv1.weight [64, 64, 1, 1] vs [64, 64, 3, 3])"),
        ("resnet34", "unexpected (first: layer1.2.conv1.weight)"),  # every resnet18 tensor fits, plus more
        ("densenet121", "no tensor name matches backbone 'resnet18' (first in file: features.conv0.weight)"),
    ],
)
def test_wrong_architecture(tmp_path: Path, saved: str, expected: str) -> None:
    torch.save(timm.create_model(saved, num_classes=2).state_dict(), tmp_path / f"{saved}.pth")
    with pytest.raises(SemimedError) as excinfo:
        create_backbone("resnet18", num_classes=2, checkpoint=str(tmp_path / f"{saved}.pth"))
    message = one_line_error(excinfo)
    assert message.startswith(str(tmp_path / f"{saved}.pth"))
    assert expected in message


def test_export_of_another_backbone_is_named(tmp_path: Path) -> None:
    save_backbone(SmallCNN(2), tmp_path / BACKBONE_FILE, {"backbone": "small_cnn"})
    with pytest.raises(
        SemimedError, match="weights of backbone 'small_cnn', but model.backbone is 'resnet18'"
    ):
        create_backbone("resnet18", num_classes=2, checkpoint=str(tmp_path))


class Pickled:
    """Any Python object in a checkpoint makes it need full unpickling."""

    def __init__(self) -> None:
        self.note = "arbitrary object"


def test_pickle_that_needs_full_unpickling_is_refused(tmp_path: Path) -> None:
    model = create_backbone("small_cnn", num_classes=2)
    torch.save({"state_dict": model.state_dict(), "args": Pickled()}, tmp_path / "unsafe.pth")
    with pytest.raises(SemimedError) as excinfo:
        create_backbone("small_cnn", num_classes=2, checkpoint=str(tmp_path / "unsafe.pth"))
    message = one_line_error(excinfo)
    assert message.startswith(f"{tmp_path / 'unsafe.pth'}: refused")
    assert "weights_only=False" in message and "torch.save(model.state_dict(), path)" in message
    torch.save(model, tmp_path / "whole_model.pth")  # a whole pickled nn.Module: same refusal
    with pytest.raises(SemimedError, match="refused"):
        create_backbone("small_cnn", num_classes=2, checkpoint=str(tmp_path / "whole_model.pth"))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not weights")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pth")
    cases = {
        "notes.pth": "not a torch checkpoint",
        "broken.safetensors": "not a readable .safetensors file",
        "list.pth": "expected a state dict, got list",
        "mixed.pth": "expected a state dict of tensors; 'lr' is not one",
    }
    for name, expected in cases.items():
        with pytest.raises(SemimedError) as excinfo:
            create_backbone("small_cnn", num_classes=2, checkpoint=str(tmp_path / name))
        assert one_line_error(excinfo).startswith(f"{tmp_path / name}: {expected}")
