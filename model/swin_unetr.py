"""Swin UNETR backbone returning the two feature maps the Universal Model heads need.

It subclasses MONAI's ``SwinUNETR`` rather than re-implementing it so that state_dict keys stay MONAI's
(``swinViT.*``, ``encoder1.*`` ... ``decoder1.*``, ``out.*``), which is the layout of the published
``swinunetr.pth``. The ``out`` 1x1 conv is kept only for key compatibility; ``forward`` never uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR

PATCH_DIVISOR = 32  # 2 (patch embedding) * 2**4 (four merging stages)


def check_swin_roi(roi_size: Sequence[int]) -> None:
    """Fail early with a readable message instead of deep inside MONAI.

    Sizes must be divisible by 32, and at least 64: at 32 the bottleneck is 1x1x1 and instance norm fails.
    """
    bad = [s for s in roi_size if s % PATCH_DIVISOR or s < 2 * PATCH_DIVISOR]
    if bad:
        raise ValueError(
            f"swin_unetr needs every ROI dimension to be a multiple of {PATCH_DIVISOR} and at least "
            f"{2 * PATCH_DIVISOR}, got {tuple(roi_size)}",
        )


class SwinUNETRBackbone(SwinUNETR):
    """MONAI Swin UNETR (62.19M parameters at feature_size 48) exposing bottleneck and decoder features.

    ``forward`` returns ``(bottleneck, decoder)``: ``encoder10`` applied to the deepest Swin stage
    (16 * feature_size channels, 1/32 resolution) and the output of ``decoder1`` (feature_size channels,
    full resolution), i.e. everything MONAI computes except the final ``out`` conv.
    """

    def __init__(
        self,
        img_size: Sequence[int] | int,
        feature_size: int = 48,
        in_channels: int = 1,
        out_channels: int = 1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        if feature_size <= 0 or feature_size % 12:
            raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size}")
        check_swin_roi((img_size,) * 3 if isinstance(img_size, int) else img_size)
        with warnings.catch_warnings():
            # MONAI 1.4 deprecates img_size (only used for a size check); silence the noise, keep the check.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            super().__init__(
                img_size=img_size,
                in_channels=in_channels,
                out_channels=out_channels,
                feature_size=feature_size,
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                dropout_path_rate=dropout_path_rate,
                use_checkpoint=use_checkpoint,
            )
        self.feature_size = feature_size
        self.bottleneck_channels = 16 * feature_size
        self.decoder_channels = feature_size

    def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        bottleneck = self.encoder10(hidden[4])
        dec3 = self.decoder5(bottleneck, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return bottleneck, self.decoder1(dec0, enc0)
