"""Backbones: one factory, `create_backbone`, over timm plus small from-scratch CNNs for tiny images.

Every backbone returned here is a timm-style module: `forward(x) -> logits [B, K]`, and
`forward_features(x)` / `forward_head(feats, pre_logits=True)` for methods that need the embedding
(GAN-SSL feature matching). Grayscale inputs go through timm's `in_chans` (it adapts the first conv of
pretrained weights by summing over RGB) rather than tripling channels in the data path.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from semimed.errors import SemimedError, UnknownNameError
from semimed.registry import Registry

# Our own small networks; any other name is looked up in timm.
LOCAL_BACKBONES: Registry[nn.Module] = Registry("backbone")


class SmallCNN(nn.Module):
    """A LeNet/AlexNet-sized CNN (the from-scratch baseline of Spanhol et al. 2016), for 28–96 px images.

    Shapes: x [B, C, H, W] -> features [B, 128, H/8, W/8] -> pooled [B, 128] -> logits [B, K].
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


@LOCAL_BACKBONES.register("small_cnn")
def _small_cnn(num_classes: int, in_chans: int, drop_rate: float = 0.0, **_: object) -> nn.Module:
    return SmallCNN(num_classes, in_chans, drop_rate=drop_rate)


@LOCAL_BACKBONES.register("resnet18_28")
def _resnet18_small_stem(num_classes: int, in_chans: int, drop_rate: float = 0.0, **_: object) -> nn.Module:
    """MedMNIST v2's ResNet-18 (28): a 3x3 stride-1 stem and no max-pool, instead of upsampling to 224 px."""
    model = timm.create_model("resnet18", num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def backbone_names() -> list[str]:
    """Our local backbones plus the timm names semimed documents and tests (any timm name works)."""
    return LOCAL_BACKBONES.names() + list(TIMM_BACKBONES)


TIMM_BACKBONES = ("resnet18", "resnet50", "densenet121", "seresnet50", "darknet53", "vgg16_bn",
                  "efficientnet_b0", "vit_small_patch16_224")


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str = "",
    drop_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """Build a classifier network by name. Unknown names raise a KeyError listing the valid ones."""
    if name in LOCAL_BACKBONES:
        if pretrained:
            raise SemimedError(f"backbone {name!r} has no pretrained weights; use pretrained_checkpoint")
        model = LOCAL_BACKBONES.get(name)(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    elif timm.is_model(name):
        kwargs: dict[str, object] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
        if image_size is not None and "vit" in name:
            kwargs["img_size"] = image_size  # ViTs take the input size at construction (position embeddings)
        model = _create_timm(name, pretrained and not checkpoint, kwargs)
    else:
        raise UnknownNameError(
            f"unknown backbone {name!r}; valid: {', '.join(backbone_names())} (or any timm.list_models() name)"
        )
    if checkpoint:
        load_backbone_checkpoint(model, checkpoint)
    return model


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, object]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # timm raises several types (OSError, LocalEntryNotFoundError, HTTP errors)
        if not pretrained:
            raise
        raise SemimedError(
            f"backbone {name!r}: pretrained weights could not be downloaded ({type(exc).__name__}); offline, "
            f"pass model.pretrained_checkpoint=PATH (a .safetensors file or a torch state dict)"
        ) from None


def load_backbone_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load trunk weights from a local file into `model`; heads whose shape differs are dropped and reported.

    Accepts `.safetensors`, a plain state dict, or a semimed run checkpoint (its `model` entry). Loaded with
    `weights_only=True`: a file that needs arbitrary unpickling is refused, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise SemimedError(f"{path}: pretrained checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SemimedError(
                f"{path}: not loadable with weights_only=True ({type(exc).__name__}); save a plain state dict"
            ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SemimedError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not usable:
        raise SemimedError(f"{path}: no tensor matches the architecture (wrong backbone?)")
    missing, unexpected = model.load_state_dict(usable, strict=False)
    return {"dropped": mismatched, "missing": list(missing), "unexpected": [k for k in state if k not in own]}
