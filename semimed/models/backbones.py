"""Backbones: one factory, `create_backbone`, over timm plus small from-scratch CNNs for tiny images.

Every backbone returned here is a timm-style module: `forward(x) -> logits [B, K]`, and
`forward_features(x)` / `forward_head(feats, pre_logits=True)` for methods that need the embedding
(GAN-SSL feature matching), `get_classifier()` for the head, and `pretrained_cfg["mean"/"std"]` for the input
normalization. Grayscale inputs go through timm's `in_chans` (it adapts the first conv of pretrained weights
by summing over RGB) rather than tripling channels in the data path.

The documented zoo (`semimed backbones` lists it with parameter counts; any other timm name works too):

| name                    | what it is                                                 | head (dropped on transfer) |
|-------------------------|------------------------------------------------------------|----------------------------|
| small_cnn               | LeNet/AlexNet-sized CNN, the Spanhol et al. 2016 baseline  | fc                         |
| resnet18_28             | MedMNIST v2's ResNet-18 (28): 3x3 stride-1 stem, no pool   | fc                         |
| resnet18, resnet50      | ResNet                                                     | fc                         |
| densenet121             | DenseNet-121, CheXNet's backbone                           | classifier                 |
| seresnet50              | ResNet-50 with Squeeze-and-Excitation blocks               | fc                         |
| darknet53               | YOLOv3's classifier backbone (with a multi-label logistic  | head.fc                    |
|                         | head: the seed paper's YOLOv3-style classifier)            |                            |
| vgg16_bn                | VGG-16 with BatchNorm                                      | head.fc                    |
| efficientnet_b0         | EfficientNet-B0                                            | classifier                 |
| vit_small_patch16_224   | ViT-S/16; built at the run's image size (img_size)         | head                       |

Pretrained weights: `pretrained=True` is timm's hub download (or the local Hugging Face cache when offline);
`checkpoint=PATH` loads local weights instead (`load_backbone_checkpoint`, semimed/models/checkpoints.py): a
semimed run directory, a semimed checkpoint, a `.safetensors` file or a torch state dict, always with
`weights_only=True`.
"""

from __future__ import annotations

import warnings

import timm
import torch
from torch import nn

from semimed.errors import SemimedError, SemimedWarning, UnknownNameError
from semimed.models.checkpoints import load_backbone_checkpoint
from semimed.registry import Registry

__all__ = [
    "LOCAL_BACKBONES",
    "TIMM_BACKBONES",
    "SmallCNN",
    "backbone_names",
    "count_parameters",
    "create_backbone",
]


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

        self.features = nn.Sequential(
            block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        # timm's conventions, so checkpoint loading and normalization treat it like any timm model.
        self.pretrained_cfg = {"first_conv": "features.0.0", "classifier": "fc", "mean": None, "std": None}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """timm's layer grouping (used for layer-wise LR decay): the three conv blocks are three layers."""
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)"}


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


TIMM_BACKBONES = (
    "resnet18",
    "resnet50",
    "densenet121",
    "seresnet50",
    "darknet53",
    "vgg16_bn",
    "efficientnet_b0",
    "vit_small_patch16_224",
)


def backbone_names() -> list[str]:
    """Our local backbones plus the timm names semimed documents and tests (any timm name works)."""
    return LOCAL_BACKBONES.names() + list(TIMM_BACKBONES)


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str = "",
    drop_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """Build a classifier network by name. Unknown names raise a KeyError listing the valid ones.

    `checkpoint` (a local file or run directory) takes precedence over `pretrained` (the timm hub download).
    What the checkpoint load did (tensors loaded, head dropped, stem adapted) is on `model.checkpoint_report`.
    """
    if name in LOCAL_BACKBONES:
        if pretrained and not checkpoint:
            raise SemimedError(
                f"backbone {name!r} has no published pretrained weights; set model.pretrained=false, or pass "
                f"model.pretrained_checkpoint=RUN_DIR (a semimed run of {name!r}) or a weights file"
            )
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
        report = load_backbone_checkpoint(model, checkpoint, name=name)
        model.checkpoint_report = report
        if report.dropped or report.adapted:
            warnings.warn(report.summary(), SemimedWarning, stacklevel=2)
    return model


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, object]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError:
        raise  # a bad keyword argument is a programming error, not a missing download
    except Exception as exc:  # timm/hub raise several types (OSError, LocalEntryNotFoundError, HTTP errors)
        if not pretrained:
            raise
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise SemimedError(
            f"backbone {name!r}: pretrained weights are not available ({type(exc).__name__}: {reason}); "
            f"offline, pass model.pretrained_checkpoint=PATH (a .safetensors file or torch state dict saved "
            f"where timm.create_model({name!r}, pretrained=True) works), or pre-fill the Hugging Face cache"
        ) from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
