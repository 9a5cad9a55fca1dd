"""Grad-CAM heat maps (Selvaraju et al. 2017) for a trained run: which pixels drove a class score.

The computation is the maintained `grad-cam` package (pytorch-grad-cam): the target layer's activations
A [B, C, h, w] are weighted by the spatial mean of d(logit)/dA per channel, summed over channels, ReLU'd,
scaled to [0, 1] per image and resized to the input. This module picks the layer, preprocesses images the way
the run's evaluation did, and writes overlays.

Target layer per backbone (the last spatial feature map before global pooling; later is more class-specific,
coarser):

| backbone                             | layer            | map side at 224 px input (at 64 px) |
|--------------------------------------|------------------|-------------------------------------|
| small_cnn                            | features.2.5     | 56 (16): last ReLU before the last pool |
| resnet18_28                          | layer4           | 28 (8): stride-1 stem, no max-pool  |
| resnet18, resnet50, seresnet50       | layer4           | 7 (2)                               |
| densenet121                          | features.norm5   | 7 (2): CheXNet's heat-map layer     |
| darknet53                            | stages.4         | 7 (2)                               |
| vgg16_bn                             | features.42      | 14 (4): last ReLU before the last pool |
| efficientnet_b0                      | bn2              | 7 (2): after conv_head              |
| vit_small_patch16_224 (tokens → grid) | blocks.11.norm1 | 14 (4): patch grid                  |

Any other timm model uses its last `feature_info` module. At 64 px the deep CNNs give 2x2 maps: Grad-CAM
then localizes to a quadrant at best; explain at a larger image size or use a shallower layer (`layer=`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from semimed.errors import SemimedError
from semimed.files import publish, staging_path
from semimed.optional import require

GRADCAM_LAYERS: dict[str, str] = {
    "small_cnn": "features.2.5",
    "resnet18_28": "layer4",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "seresnet50": "layer4",
    "densenet121": "features.norm5",
    "darknet53": "stages.4",
    "vgg16_bn": "features.42",
    "efficientnet_b0": "bn2",
    "vit_small_patch16_224": "blocks.11.norm1",
}
TB_IMAGES = 8  # overlays logged to TensorBoard per call: a glance, not an archive (the PNGs are that)


def target_layer_name(model: nn.Module, backbone: str | None = None) -> str:
    """The documented layer for `backbone`, else timm's last feature module, else the last Conv2d."""
    if backbone in GRADCAM_LAYERS:
        return GRADCAM_LAYERS[backbone]
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1]
        return last["module"] if isinstance(last, dict) else info.module_name()[-1]
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise SemimedError(f"Grad-CAM: {type(model).__name__} has no convolution; pass a layer name")
    return convs[-1]


def _vit_reshape(model: nn.Module):
    """Tokens [B, prefix + h*w, C] -> a feature map [B, C, h, w], so Grad-CAM treats a ViT like a CNN."""
    grid = tuple(model.patch_embed.grid_size)
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        return patches.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int] | None = None,
    layer: str | None = None,
    backbone: str | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Grad-CAM maps for normalized `images` [B, C, H, W].

    Returns (cams float32 [B, H, W] in [0, 1], target class per image int [B], logits [B, K]). `targets`
    defaults to each image's top-scoring class. The model is put in eval mode (BatchNorm running statistics).
    """
    require("pytorch_grad_cam", "gradcam", "Grad-CAM (semimed explain)", "grad-cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name = layer or target_layer_name(model, backbone)
    modules = dict(model.named_modules())
    if name not in modules:
        raise SemimedError(
            f"Grad-CAM layer {name!r} is not in {type(model).__name__} (see semimed/explain.py)"
        )
    model.eval()
    with torch.no_grad():
        logits = model(images)
    chosen = logits.argmax(dim=1).tolist() if targets is None else [int(t) for t in targets]
    if any(not 0 <= t < logits.shape[1] for t in chosen):
        raise SemimedError(f"Grad-CAM target class out of range 0..{logits.shape[1] - 1}: {chosen}")
    reshape = _vit_reshape(model) if hasattr(model, "patch_embed") else None
    # An input that requires grad puts the target layer in the graph even when the weights are frozen
    # (requires_grad=False after a linear probe), so the layer's gradient hook still fires.
    inputs = images.detach().clone().requires_grad_(True)
    with GradCAM(model, [modules[name]], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in chosen])
    return maps.astype(np.float32), np.asarray(chosen, dtype=np.int64), logits


def overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """uint8 image [C, H, W] (C = 1 or 3) + cam [H, W] in [0, 1] -> uint8 RGB [H, W, 3] (jet colormap)."""
    require("pytorch_grad_cam", "gradcam", "Grad-CAM (semimed explain)", "grad-cam")
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    return show_cam_on_image(base, cam, use_rgb=True, image_weight=weight)


@dataclass
class Explanation:
    image: str  # the input file
    output: Path  # the overlay PNG
    target: str  # the class the map explains
    score: float  # its probability
    prediction: str  # the top class


def explain_run(
    run_dir: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path | None = None,
    target: str | None = None,
    layer: str | None = None,
    tensorboard: bool = True,
) -> list[Explanation]:
    """Grad-CAM overlays for `images` under the network a finished run reported its metrics for.

    That network is the run's `backbone.safetensors` (the val-selected checkpoint, Mean Teacher's teacher, …,
    exactly what `metrics.json` evaluated). Images are preprocessed as the run's evaluation did (shorter side to
    data.image_size, centre crop, the run's normalization). Writes `<out_dir or run_dir/gradcam>/<stem>_<class>
    _gradcam.png` (image | overlay, side by side; `<stem>-2`, `<stem>-3`, … when inputs share a file name) and
    logs up to TB_IMAGES overlays to TensorBoard (tag gradcam) under `tensorboard_dir(run_dir, out_dir)`: with
    an `out_dir`, nothing is written into the run folder.
    """
    from semimed.data.augment import build_transform
    from semimed.data.base import read_image_file
    from semimed.data.cache import resize_center_crop
    from semimed.losses import probabilities
    from semimed.predict import load_run_model

    run_dir = Path(run_dir)
    if not images:
        raise SemimedError("explain: no images given (--images PATH ...)")
    out = _output_dir(Path(out_dir) if out_dir else run_dir / "gradcam")
    model, classes, multilabel, normalize, cfg, channels = load_run_model(
        run_dir, torch.device("cpu"), "explain"
    )
    size = cfg.data.image_size
    transform = build_transform("none", size)
    tb_step = int(json.loads(_metadata(run_dir).get("step", "0")))

    pixels = torch.stack(
        [
            transform(torch.from_numpy(resize_center_crop(read_image_file(Path(p), channels), size)))
            for p in images
        ]
    )
    target_index = None
    if target is not None:
        if target not in classes:
            raise SemimedError(
                f"explain: --target {target!r} is not a class of this run; valid: {', '.join(classes)}"
            )
        target_index = [classes.index(target)] * len(images)
    cams, chosen, logits = gradcam(model, normalize(pixels), target_index, layer, cfg.model.backbone)
    probs = probabilities(logits, multilabel).numpy()

    out.mkdir(parents=True, exist_ok=True)
    results, panels = [], []
    for i, (path, stem) in enumerate(zip(images, unique_stems(images), strict=True)):
        picture = pixels[i].numpy()
        rgb = np.repeat(picture, 3, axis=0) if picture.shape[0] == 1 else picture
        panel = np.concatenate([rgb.transpose(1, 2, 0), overlay(picture, cams[i])], axis=1)
        panels.append(panel)
        scale = max(1, 256 // size)  # tiny inputs (28-64 px) are unreadable at their own size
        image = Image.fromarray(panel).resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST)
        target_name = classes[int(chosen[i])]
        file = out / f"{stem}_{target_name}_gradcam.png"
        staging = staging_path(file)
        image.save(staging, format="PNG")
        publish(staging, file)
        results.append(
            Explanation(
                str(path), file, target_name, float(probs[i, chosen[i]]), classes[int(probs[i].argmax())]
            )
        )
    if tensorboard and panels:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tensorboard_dir(run_dir, out_dir))) as writer:
            grid = torch.from_numpy(np.stack(panels[:TB_IMAGES])).permute(0, 3, 1, 2)
            writer.add_images("gradcam", grid, tb_step, dataformats="NCHW")
    return results


def _output_dir(out: Path) -> Path:
    """`out` if explain may write its overlays there: a writable folder, not inside a run's own files
    (checkpoints/, tb/, …: `semimed.runs.RUN_OWNED`)."""
    from semimed.files import check_output_dir
    from semimed.runs import run_owning

    owner = run_owning(out)
    if owner is not None:
        raise SemimedError(
            f"explain: --out {out}: inside the files of the run {owner}, left as they are; give another folder "
            "(default: RUN_DIR/gradcam)"
        )
    return check_output_dir(out, "explain: --out")


def tensorboard_dir(run_dir: str | Path, out_dir: str | Path | None) -> Path:
    """Where explain logs its overlays: `<out_dir>/tb` when an output folder was given (a run folder may be
    read-only or shared, and the user asked for the output there), else the run's own `<run_dir>/tb`."""
    return Path(out_dir) / "tb" if out_dir else Path(run_dir) / "tb"


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """File stems, with `-2`, `-3`, … added to repeats, so that inputs of the same name (a/x.png, b/x.png) get
    an overlay each instead of overwriting one."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, candidate, count = Path(path).stem, Path(path).stem, 1
        while candidate in used:
            count += 1
            candidate = f"{stem}-{count}"
        used.add(candidate)
        stems.append(candidate)
    return stems


def _metadata(run_dir: Path) -> dict[str, str]:
    from semimed.models.checkpoints import BACKBONE_FILE, read_backbone_metadata

    return read_backbone_metadata(run_dir / BACKBONE_FILE)
