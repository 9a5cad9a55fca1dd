"""A network's parts by name: its classification head, its first conv, the network inside a DDP wrapper.

What checkpoint loading (semimed/models/checkpoints.py) and the methods (fine-tuning's head learning rate, EMA
copies) need to know about any timm-style backbone.
"""

from __future__ import annotations

from torch import nn


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the classification head (`fc`, `head.fc`, `classifier`, …); '' when there is none."""
    get = getattr(model, "get_classifier", None)
    head = get() if get is not None else None
    if head is None:
        return ""
    return next((name for name, module in model.named_modules() if module is head and name), "")


def is_head_key(key: str, head: str) -> bool:
    return bool(head) and (key == head or key.startswith(head + "."))


def first_conv_key(model: nn.Module) -> str:
    """State-dict key of the first conv's weight (timm's pretrained_cfg["first_conv"], else the first Conv2d)."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    if first:
        return f"{first}.weight"
    conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), "")
    return f"{conv}.weight" if conv else ""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)
