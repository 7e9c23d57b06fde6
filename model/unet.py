"""3D U-Net backbone of the CLIP-Driven Universal Model, laid out so published checkpoints load.

Module and parameter names (``down_tr64.ops.0.conv1.weight`` ...) follow the published model exactly;
renaming anything here breaks ``model.checkpoint.load_published_backbone``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = 32  # first conv width of the published model; every other width is a power-of-two multiple


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that always normalises with the current batch's statistics, also in eval mode.

    The published weights were trained (and are evaluated) this way; using running statistics at
    inference would change every prediction. Running buffers are kept so checkpoints keep their keys,
    but they are only updated in train mode while ``track_running_stats`` is set, so an eval-mode or
    frozen module never mutates its state (the output never depends on them anyway).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        update = self.training and self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            True,
            self.momentum,
            self.eps,
        )


class LUConv(nn.Module):
    """Conv 3x3x3 -> ContBatchNorm -> ReLU; attribute names match the published checkpoint."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """Two LUConvs as an ``ops`` Sequential (keys ``ops.0.*``, ``ops.1.*``)."""
    return nn.Sequential(LUConv(in_channels, mid_channels), LUConv(mid_channels, out_channels))


class DownTransition(nn.Module):
    """Encoder stage: two convs, then (except at the bottom) a 2x max-pool; returns (pooled, skip)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.ops = _double_conv(in_channels, mid_channels, out_channels)
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return self.maxpool(skip), skip


class UpTransition(nn.Module):
    """Decoder stage: 2x transposed conv (channels kept), concat the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _double_conv(in_channels + skip_channels, out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


def unet_channels(width: float) -> tuple[int, int, int, int, int]:
    """Channels (32, 64, 128, 256, 512 at width 1) scaled by ``width``, kept exact powers of two apart."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    base = max(1, round(BASE_CHANNELS * width))
    return tuple(base * 2**i for i in range(5))  # type: ignore[return-value]


class UNet3D(nn.Module):
    """Published 4-level 3D U-Net (19.08M parameters at width 1).

    ``forward`` returns ``(bottleneck, decoder)``: the 1/8-resolution bottleneck (512 * width channels)
    feeding the task-feature pooling, and the full-resolution decoder map (64 * width channels) feeding
    the dynamic segmentation heads. Input sizes must be divisible by 8.
    """

    def __init__(self, width: float = 1.0, in_channels: int = 1) -> None:
        super().__init__()
        c32, c64, c128, c256, c512 = unet_channels(width)
        self.width = width
        self.down_tr64 = DownTransition(in_channels, c32, c64, pool=True)
        self.down_tr128 = DownTransition(c64, c64, c128, pool=True)
        self.down_tr256 = DownTransition(c128, c128, c256, pool=True)
        self.down_tr512 = DownTransition(c256, c256, c512, pool=False)
        self.up_tr256 = UpTransition(c512, c256, c256)
        self.up_tr128 = UpTransition(c256, c128, c128)
        self.up_tr64 = UpTransition(c128, c64, c64)
        self.bottleneck_channels = c512
        self.decoder_channels = c64

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        bottleneck, _ = self.down_tr512(out256)
        up256 = self.up_tr256(bottleneck, skip256)
        up128 = self.up_tr128(up256, skip128)
        return bottleneck, self.up_tr64(up128, skip64)
