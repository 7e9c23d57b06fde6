"""The one CT pipeline shared by training, inference and evaluation.

load (NIfTI or NRRD) -> check -> channel first -> RAS -> resample -> HU window to [0, 1] -> crop to body.
Every geometric step is a MONAI invertible transform, so a prediction made on the preprocessed grid
is mapped back onto the original grid and affine with :func:`invert_to_original`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from lib.classes import MAX_LABEL_VALUE, NUM_CLASSES

IMAGE_KEY = "image"
LABEL_KEY = "label"
PRED_KEY = "pred"


@dataclass(frozen=True)
class CTPipelineConfig:
    """Geometry and intensity settings; defaults are the seed's (1.5 mm, HU [-175, 250])."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_range: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True
    foreground_margin: int = 4  # voxels of context kept around the body
    axcodes: str = "RAS"

    @classmethod
    def from_spacing(cls, spacing: float | Sequence[float], **kwargs) -> CTPipelineConfig:
        """Accept one isotropic value or three values (the seed's --space_x/y/z)."""
        values = (float(spacing),) * 3 if isinstance(spacing, int | float) else tuple(float(s) for s in spacing)
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"spacing must be one or three positive numbers, got {spacing!r}")
        return cls(spacing=values, **kwargs)  # type: ignore[arg-type]


class CTInputError(ValueError):
    """An input volume that cannot be segmented; the message names the file and the problem."""


def _source_name(data: Mapping, key: Hashable) -> str:
    value = data[key]
    meta = getattr(value, "meta", {}) or {}
    return str(meta.get("filename_or_obj") or data.get(f"{key}_path") or key)


class CheckVolumed(MapTransform):
    """Reject what would silently give garbage: non-3D volumes and NaN/Inf voxels.

    Runs right after loading, before any resampling can smear a bad voxel across its neighbours.
    """

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = d[key]
            spatial_dims = volume.ndim - 1  # channel first
            if spatial_dims != 3 or volume.shape[0] != 1:
                raise CTInputError(
                    f"{_source_name(d, key)}: expected a single 3D volume, got shape {tuple(volume.shape[1:])} "
                    f"with {volume.shape[0]} channel(s)"
                )
            if min(volume.shape[1:]) < 2:
                raise CTInputError(f"{_source_name(d, key)}: volume {tuple(volume.shape[1:])} is too thin")
            finite = torch.isfinite(torch.as_tensor(volume))
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise CTInputError(f"{_source_name(d, key)}: {bad} voxel(s) are NaN or Inf")
        return d


class CheckLabelValuesd(MapTransform):
    """Reject label maps with values outside the universal template (0..NUM_CLASSES)."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key])
            lo, hi = float(volume.min()), float(volume.max())
            if lo < 0 or hi > MAX_LABEL_VALUE or not torch.equal(volume, volume.round()):
                raise CTInputError(
                    f"{_source_name(d, key)}: label values must be integers in 0..{MAX_LABEL_VALUE}, "
                    f"found range [{lo:g}, {hi:g}]"
                )
        return d


class MatchGeometryd(MapTransform):
    """Reject an image/label pair whose grids disagree, before resampling hides it."""

    def __init__(self, label_key: str = LABEL_KEY, image_key: str = IMAGE_KEY, atol_mm: float = 1e-3):
        super().__init__([label_key], allow_missing_keys=True)
        self.image_key, self.atol_mm = image_key, atol_mm

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image, label = d[self.image_key], d[key]
            if tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise CTInputError(
                    f"{_source_name(d, key)}: label shape {tuple(label.shape[1:])} does not match image "
                    f"{_source_name(d, self.image_key)} shape {tuple(image.shape[1:])}"
                )
            if not np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=self.atol_mm):
                raise CTInputError(
                    f"{_source_name(d, key)}: label affine differs from image {_source_name(d, self.image_key)} "
                    f"(max difference {np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max():.3g} mm)"
                )
        return d


class LoadVolumed(MapTransform):
    """MONAI's LoadImaged, with unreadable files reported as CTInputError naming the file."""

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        self.loader = LoadImaged(keys=list(keys), image_only=True)

    def __call__(self, data: Mapping) -> dict:
        try:
            return self.loader(data)
        except Exception as error:
            names = ", ".join(str(data.get(k)) for k in self.keys if k in data)
            raise CTInputError(f"{names}: not a readable NIfTI/NRRD image ({first_line(error)})") from error


def first_line(error: BaseException) -> str:
    """The innermost cause's message: MONAI wraps errors in layers of 'applying transform ...'."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class CTPipeline(Compose):
    """Compose that surfaces input problems as CTInputError instead of MONAI's wrapped RuntimeError."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, CTInputError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


def load_transforms(keys: Sequence[str]) -> list:
    """Read NIfTI/NRRD into channel-first MetaTensors and check they are usable 3D volumes."""
    return [LoadVolumed(keys), EnsureChannelFirstd(keys=list(keys)), CheckVolumed(keys=list(keys))]


def geometry_transforms(config: CTPipelineConfig, keys: Sequence[str]) -> list:
    """RAS orientation, resampling, HU windowing and body crop for an already loaded sample."""
    keys = list(keys)
    modes = ["bilinear" if k == IMAGE_KEY else "nearest" for k in keys]
    transforms: list = [
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
        Orientationd(keys=keys, axcodes=config.axcodes),
        Spacingd(keys=keys, pixdim=config.spacing, mode=modes),
        ScaleIntensityRanged(
            keys=[IMAGE_KEY], a_min=config.hu_range[0], a_max=config.hu_range[1], b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    if config.crop_foreground:
        transforms.append(
            CropForegroundd(
                keys=keys, source_key=IMAGE_KEY, select_fn=_body_voxels, margin=config.foreground_margin,
                allow_smaller=True,
            )
        )
    return transforms


def _body_voxels(image: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than the lower HU bound: the body, not the air around it."""
    return image > 0


def ct_pipeline(config: CTPipelineConfig | None = None, with_label: bool = False, load: bool = True) -> CTPipeline:
    """The shared preprocessing. ``load=False`` starts from in-memory MetaTensors (e.g. MONAI Label)."""
    config = config or CTPipelineConfig()
    keys = [IMAGE_KEY, LABEL_KEY] if with_label else [IMAGE_KEY]
    steps: list = load_transforms(keys) if load else []
    if with_label:
        steps += [MatchGeometryd(), CheckLabelValuesd(keys=[LABEL_KEY])]
    steps += geometry_transforms(config, keys)
    return CTPipeline(steps, log_stats=False)


def invert_to_original(
    sample: dict, pipeline: Compose, key: str = PRED_KEY, nearest: bool = False, orig_key: str = IMAGE_KEY
) -> MetaTensor:
    """Map ``sample[key]`` (on the preprocessed grid of ``sample[orig_key]``) back onto the original grid.

    The result carries the original affine; ``nearest`` for label maps, linear for probabilities.
    """
    inverter = Invertd(
        keys=key, transform=pipeline, orig_keys=orig_key, nearest_interp=nearest, to_tensor=True,
        allow_missing_keys=False,
    )
    return inverter(sample)[key]


def labels_to_channels(label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[1, ...] integer label map -> [K, ...] float binary masks (value k+1 -> channel k)."""
    values = torch.as_tensor(label).long().squeeze(0)
    channels = torch.stack([values == (k + 1) for k in range(num_classes)])
    return channels.float()


def channels_to_labels(masks: torch.Tensor, probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """[K, ...] binary masks -> [1, ...] label map. Where classes overlap, the most probable one wins.

    3D Slicer's label maps hold one class per voxel; this is the only place overlap is flattened.
    """
    masks = torch.as_tensor(masks).bool()
    score = probabilities.float() if probabilities is not None else masks.float()
    score = torch.where(masks, score, torch.full_like(score, -1.0))
    best = score.argmax(dim=0)
    return torch.where(masks.any(dim=0), best + 1, torch.zeros_like(best)).unsqueeze(0)
