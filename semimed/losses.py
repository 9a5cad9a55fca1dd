"""Pure, mask-aware losses. Targets follow the dataset convention: int [B] (single-label) or float [B, K]
with NaN = unknown (multi-label)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supervised_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy (single-label) or BCE-with-logits averaged over KNOWN entries (multi-label)."""
    if not multilabel:
        return F.cross_entropy(logits, targets.long())
    return masked_bce(logits, targets)


def masked_bce(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE-with-logits over entries whose target is not NaN (and whose `weight` is > 0).

    logits, targets, weight: [B, K]. Returns the mean over the used entries (0 when none is used, with a
    gradient path kept so the caller's backward still works).
    """
    known = ~torch.isnan(targets)
    mask = known.float() if weight is None else known.float() * weight
    per_entry = F.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets.float()), reduction="none"
    )
    return (per_entry * mask).sum() / mask.sum().clamp(min=1.0)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return torch.sigmoid(logits.float()) if multilabel else torch.softmax(logits.float(), dim=1)
