"""CLIP-Driven Universal Model: shared backbone + one text-conditioned dynamic head per class.

Each class ``k`` has a controller that turns (image task features, class embedding ``k``) into the
weights of a tiny 3-layer 1x1x1 conv head run on an 8-channel decoder map. Continual tuning trains only
the controllers of revised classes, so the forward pass is split into a cacheable ``encode`` and a
cheap ``decode``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.swin_unetr import SwinUNETRBackbone
from model.unet import ContBatchNorm3d, UNet3D

BACKBONES = ("unet", "swin_unetr")
_ALIASES = {"swinunetr": "swin_unetr"}

TASK_DIM = 256  # GAP output width (task features)
HEAD_CHANNELS = 8  # channels of the map the dynamic heads run on
CONTROLLER_HIDDEN = 128
LEARNED_EMBEDDING_DIM = 256
# Dynamic head: weights of conv 8->8, 8->8, 8->1, then their biases (the published split order).
HEAD_WEIGHT_SIZES = (HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS)
HEAD_BIAS_SIZES = (HEAD_CHANNELS, HEAD_CHANNELS, 1)
NUM_HEAD_PARAMS = sum(HEAD_WEIGHT_SIZES) + sum(HEAD_BIAS_SIZES)  # 153


def canonical_backbone(name: str) -> str:
    """Map a backbone name (including the seed's ``swinunetr`` spelling) to its canonical form."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BACKBONES:
        valid = ", ".join(BACKBONES + tuple(_ALIASES))
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {valid}")
    return key


def group_count(channels: int, max_groups: int = 16) -> int:
    """Largest GroupNorm group count <= ``max_groups`` dividing ``channels`` (16 at published widths)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def swin_feature_size(width: float) -> int:
    """Swin UNETR feature_size for a width multiplier (48 at width 1); must be a multiple of 12."""
    size = 48 * width
    if size <= 0 or abs(size - round(size)) > 1e-6 or round(size) % 12:
        raise ValueError(f"swin_unetr width must make 48*width a positive multiple of 12, got width={width}")
    return round(size)


def build_backbone(backbone: str, roi_size: Sequence[int], width: float) -> UNet3D | SwinUNETRBackbone:
    """Construct the named backbone, validating the ROI it will be run on."""
    name = canonical_backbone(backbone)
    if name == "unet":
        if any(s % 8 for s in roi_size):
            raise ValueError(f"unet needs every ROI dimension divisible by 8, got {tuple(roi_size)}")
        return UNet3D(width=width)
    return SwinUNETRBackbone(img_size=tuple(roi_size), feature_size=swin_feature_size(width))


def load_embedding_file(path: str | Path, class_names: Sequence[str]) -> torch.Tensor:
    """Read a fixed class embedding (e.g. the seed's CLIP ``txt_encoding.pth``) as a float (K, E) tensor.

    The file holds either a (K, E) tensor whose row ``k`` is ``class_names[k]``, or a mapping
    ``{class name: (E,) tensor}`` from which rows are picked by name (so a subset can be used).
    """
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(data, Mapping):
        missing = [n for n in class_names if n not in data]
        if missing:
            raise ValueError(f"embedding file {path} has no vectors for classes {missing}")
        data = torch.stack([torch.as_tensor(data[n]).flatten() for n in class_names])
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise ValueError(f"embedding file {path} must hold a 2-D (classes, dim) tensor or a name->vector map")
    if data.shape[0] != len(class_names):
        raise ValueError(
            f"embedding file {path} has {data.shape[0]} rows but the model has {len(class_names)} classes",
        )
    return data.detach().float().clone()


def _gap_head(in_channels: int) -> nn.Sequential:
    """Bottleneck -> (B, 256, 1, 1, 1) task features (published key layout ``GAP.0`` / ``GAP.3``)."""
    return nn.Sequential(
        nn.GroupNorm(group_count(in_channels), in_channels),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool3d(1),
        nn.Conv3d(in_channels, TASK_DIM, kernel_size=1),
    )


def _precls_head(in_channels: int) -> nn.Sequential:
    """Decoder map -> 8-channel map for the dynamic heads (``precls_conv.0`` / ``precls_conv.2``)."""
    return nn.Sequential(
        nn.GroupNorm(group_count(in_channels), in_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(in_channels, HEAD_CHANNELS, kernel_size=1),
    )


def _controller(embedding_dim: int) -> nn.Sequential:
    """(task features ++ class embedding) -> the 153 parameters of one class's dynamic head."""
    return nn.Sequential(
        nn.Conv3d(TASK_DIM + embedding_dim, CONTROLLER_HIDDEN, kernel_size=1),
        nn.ReLU(),
        nn.Conv3d(CONTROLLER_HIDDEN, NUM_HEAD_PARAMS, kernel_size=1),
    )


def split_head_params(params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split (..., 153) head parameters into (out, in) weight matrices and bias vectors.

    Weights: (..., 8, 8), (..., 8, 8), (..., 1, 8); biases: (..., 8), (..., 8), (..., 1).
    """
    parts = torch.split_with_sizes(params, [*HEAD_WEIGHT_SIZES, *HEAD_BIAS_SIZES], dim=-1)
    n = len(HEAD_WEIGHT_SIZES)
    lead = params.shape[:-1]
    weights = [w.reshape(*lead, -1, HEAD_CHANNELS) for w in parts[:n]]
    return weights, list(parts[n:])


def dynamic_heads(head_input: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Run every sample's per-class 1x1x1 conv heads at once.

    head_input: (B, 8, D, H, W); params: (B, K, 153). Returns logits (B, K, D, H, W). Equivalent to the
    seed's grouped-conv loop over samples, but batched as einsums.
    """
    (w1, w2, w3), (b1, b2, b3) = split_head_params(params)
    hidden = torch.relu(torch.einsum("bkoi,bidhw->bkodhw", w1, head_input) + b1[..., None, None, None])
    hidden = torch.relu(torch.einsum("bkoi,bkidhw->bkodhw", w2, hidden) + b2[..., None, None, None])
    return torch.einsum("bki,bkidhw->bkdhw", w3.squeeze(-2), hidden) + b3[..., None, None]


class UniversalModel(nn.Module):
    """Backbone + GAP/precls heads + per-class controllers; outputs one logit map per class (sigmoid later).

    ``embedding`` selects the class embedding: ``None`` for a learned ``nn.Embedding(K, 256)``, or a
    file (or a (K, E) tensor) for a fixed buffer such as the seed's 512-d CLIP text encoding.
    """

    def __init__(
        self,
        backbone: str,
        class_names: Sequence[str],
        roi_size: Sequence[int] = (96, 96, 96),
        width: float = 1.0,
        embedding: str | Path | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        names = [str(n) for n in class_names]
        if not names:
            raise ValueError("class_names must not be empty")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate class names: {duplicates}")
        roi = tuple(int(s) for s in roi_size)
        if len(roi) != 3:
            raise ValueError(f"roi_size must have 3 dimensions, got {roi_size}")
        name = canonical_backbone(backbone)
        self.class_names: tuple[str, ...] = tuple(names)
        self.backbone = build_backbone(name, roi, width)
        self.precls_conv = _precls_head(self.backbone.decoder_channels)
        self.GAP = _gap_head(self.backbone.bottleneck_channels)
        if embedding is None:
            self.organ_embedding: nn.Embedding | torch.Tensor = nn.Embedding(
                len(names),
                LEARNED_EMBEDDING_DIM,
            )
            embedding_dim, fixed = LEARNED_EMBEDDING_DIM, False
        else:
            is_tensor = isinstance(embedding, torch.Tensor)
            table = embedding if is_tensor else load_embedding_file(embedding, names)
            if table.dim() != 2 or table.shape[0] != len(names):
                raise ValueError(f"embedding must be ({len(names)}, E), got {tuple(table.shape)}")
            self.register_buffer("organ_embedding", table.detach().float().clone())
            embedding_dim, fixed = int(table.shape[1]), True
        self.controllers = nn.ModuleList(_controller(embedding_dim) for _ in names)
        self.config: dict[str, Any] = {
            "backbone": name,
            "class_names": list(names),
            "roi_size": list(roi),
            "width": float(width),
            "embedding_dim": embedding_dim,
            "fixed_embedding": fixed,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UniversalModel:
        """Rebuild an (untrained) model with the architecture described by ``config``; load weights after."""
        fixed = bool(config.get("fixed_embedding", False))
        names = list(config["class_names"])
        embedding = torch.zeros(len(names), int(config["embedding_dim"])) if fixed else None
        return cls(
            backbone=config["backbone"],
            class_names=names,
            roi_size=config.get("roi_size", (96, 96, 96)),
            width=float(config.get("width", 1.0)),
            embedding=embedding,
        )

    def class_indices(self, names: Iterable[str]) -> list[int]:
        """Channel indices of ``names``; unknown names raise with the valid list so typos surface early."""
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.class_names]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; valid names: {list(self.class_names)}")
        return [self.class_names.index(n) for n in wanted]

    def class_embedding(self) -> torch.Tensor:
        """(K, E) embedding table, learned or fixed."""
        if isinstance(self.organ_embedding, nn.Embedding):
            return self.organ_embedding.weight
        return self.organ_embedding

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 1, D, H, W) -> (task features (B, 256), head input (B, 8, D, H, W)): the frozen part."""
        bottleneck, decoder = self.backbone(x)
        return self.GAP(bottleneck).flatten(1), self.precls_conv(decoder)

    def decode(
        self,
        task_features: torch.Tensor,
        head_input: torch.Tensor,
        class_indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (B, K', D, H, W) for ``class_indices`` (all classes when None), in the order given."""
        indices = range(len(self.class_names)) if class_indices is None else list(class_indices)
        bad = [i for i in indices if not 0 <= i < len(self.class_names)]
        if bad or not indices:
            last = len(self.class_names) - 1
            raise ValueError(f"class indices must be a non-empty subset of 0..{last}, got {bad}")
        table = self.class_embedding()
        batch = task_features.shape[0]
        params = []
        for k in indices:
            cond = torch.cat([task_features, table[k].expand(batch, -1)], dim=1)
            params.append(self.controllers[k](cond[..., None, None, None]).flatten(1))
        return dynamic_heads(head_input, torch.stack(params, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 1, D, H, W) -> logits (B, K, D, H, W) for all classes."""
        return self.decode(*self.encode(x))


def freeze_except_heads(model: UniversalModel, class_names: Sequence[str]) -> list[str]:
    """Make everything but the named classes' controllers untrainable; returns the trainable parameter names.

    Frozen also means stateless: ContBatchNorm layers stop updating their running buffers, so after any
    number of training steps the whole state_dict outside ``controllers.{k}`` stays bit-identical
    (their outputs never used those buffers, so predictions are unaffected).
    """
    prefixes = tuple(f"controllers.{k}." for k in model.class_indices(class_names))
    trainable = []
    for name, param in model.named_parameters():
        keep = name.startswith(prefixes)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    for module in model.modules():
        if isinstance(module, ContBatchNorm3d):
            module.track_running_stats = False
    return trainable
