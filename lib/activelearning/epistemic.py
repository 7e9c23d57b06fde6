"""MONAI Label-style epistemic baseline: Monte Carlo dropout entropy.

MONAI Label's ``EpistemicScoring`` runs a network with its dropout layers active ``T`` times and scores a
case by the mean voxel entropy of the averaged prediction. Our backbones (the published 3D U-Net and
Swin UNETR at drop rate 0) have **no dropout layers**, so there is nothing to switch on. This module
instead applies inverted dropout (rate ``p``, default 0.2) to the 8-channel map the dynamic class heads
run on (``UniversalModel.encode``'s second output) and runs ``model.decode`` ``T`` times on independent
masks. The backbone runs once per window, so a case costs about one forward pass plus ``T`` cheap head
passes.

Read the result for what it is: a last-layer perturbation of a network never trained with dropout,
not a Bayesian posterior. Its spread reflects how sensitive the heads are to their input features, which
correlates with, but is not, model uncertainty. It exists as the baseline the attention method is
compared against (see :mod:`lib.activelearning.selection_quality`).

For sigmoid (multi-label) outputs the entropy is the binary entropy of the mean probability,
``H(p) = -p ln p - (1 - p) ln(1 - p)`` (MONAI Label's softmax version sums ``-p ln p`` over channels),
averaged over the voxels of the preprocessed volume and the target classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lib.activelearning.score import DEFAULT_TARGET_CLASSES
from lib.classes import CLASS_NAMES
from lib.inference import InferenceConfig, sliding_window_probabilities
from lib.transforms import IMAGE_KEY
from model.universal import UniversalModel

DEFAULT_DROPOUT = 0.2
DEFAULT_PASSES = 10
_EPS = 1e-6


class MCDropoutHeads(nn.Module):
    """Window -> logit of the mean sigmoid over ``passes`` dropout draws on the head input.

    A module so :func:`lib.inference.sliding_window_probabilities` can run it like a network: it
    blends the returned logits and squashes them back, which recovers the mean probability per window.
    Masks come from a private generator seeded at construction, so a case scores the same on any
    process and in any order (and the global RNG is left alone).
    """

    def __init__(
        self, model: UniversalModel, channels: Sequence[int], passes: int = DEFAULT_PASSES,
        dropout: float = DEFAULT_DROPOUT, seed: int = 0,
    ) -> None:
        super().__init__()
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.model, self.channels = model, list(channels)
        self.passes, self.dropout, self.seed = passes, dropout, seed
        self._generator: torch.Generator | None = None

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        """Inverted-dropout mask (kept units scaled by 1/(1-p)) from the private generator."""
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        keep = torch.full_like(like, 1.0 - self.dropout, dtype=torch.float32)
        return torch.bernoulli(keep, generator=self._generator).to(like.dtype) / (1.0 - self.dropout)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        task_features, head_input = self.model.encode(window)
        total = torch.zeros((), device=window.device)
        for _ in range(self.passes):
            logits = self.model.decode(task_features, head_input * self._mask(head_input), self.channels)
            total = total + torch.sigmoid(logits.float())
        return torch.logit(total / self.passes, eps=_EPS)


def mc_dropout_probabilities(
    model: UniversalModel,
    image: torch.Tensor,
    config: InferenceConfig,
    class_indices: Sequence[int] = DEFAULT_TARGET_CLASSES,
    passes: int = DEFAULT_PASSES,
    dropout: float = DEFAULT_DROPOUT,
    seed: int = 0,
) -> torch.Tensor:
    """``[B, C, ...]`` mean probabilities over MC-dropout passes of a ``[B, 1, D, H, W]`` image.

    ``class_indices`` are universal classes, looked up in the model's channel order.
    """
    channels = model.class_indices([CLASS_NAMES[c] for c in class_indices])
    heads = MCDropoutHeads(model, channels, passes, dropout, seed)
    return sliding_window_probabilities(heads, image, config)


def mean_binary_entropy(probs: torch.Tensor) -> float:
    """Mean over all elements of the binary entropy (nats); 0 for certain voxels, ln 2 at p = 0.5."""
    p = probs.double().clamp(0.0, 1.0)
    entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1.0 - p, 1.0 - p))
    return float(entropy.mean())


def epistemic_score(
    model: UniversalModel,
    sample: Mapping[str, Any],
    config: InferenceConfig,
    target_classes: Sequence[int] = DEFAULT_TARGET_CLASSES,
    passes: int = DEFAULT_PASSES,
    dropout: float = DEFAULT_DROPOUT,
    seed: int = 0,
) -> float:
    """Epistemic priority of one preprocessed sample: mean voxel entropy over the target classes."""
    probs = mc_dropout_probabilities(model, sample[IMAGE_KEY][None], config, target_classes, passes, dropout, seed)
    return mean_binary_entropy(probs)
