"""Partial-label Dice + BCE: each case only supervises the classes its label annotates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_dice_bce(
    logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Mean of (soft Dice loss + BCE) over the (sample, class) pairs where ``class_mask`` is true.

    logits, target: [B, K, ...]; class_mask: [B, K] bool. A class the case does not annotate
    contributes nothing, so an unlabelled organ is never taught as background. Returns 0 (with a
    graph) when nothing is supervised, so every DDP rank still runs backward.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if class_mask.shape != logits.shape[:2]:
        raise ValueError(f"class_mask {tuple(class_mask.shape)} must be [B, K] = {tuple(logits.shape[:2])}")
    logits, target = logits.float(), target.float()
    spatial = tuple(range(2, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=spatial)
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum(dim=spatial)
    denominator = probs.sum(dim=spatial) + target.sum(dim=spatial)
    dice_loss = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    mask = class_mask.to(logits.dtype)
    return ((bce + dice_loss) * mask).sum() / mask.sum().clamp_min(1.0)
