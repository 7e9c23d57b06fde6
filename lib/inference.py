"""The inference core: sliding-window probabilities, thresholds, post-processing, and the Predictor.

Shared by the evaluation command, the training engine's validation, the attention scorer and the
MONAI Label infer tasks, so it depends on torch, MONAI and scipy only (no MONAI Label, no CLI).

Channels: a model predicts one sigmoid map per class in ``model.class_names``; ``class_indices``
arguments below give the universal class (``lib.classes`` index) of each channel, which is what
thresholds, post-processing and label values (index + 1) are keyed by.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from scipy import ndimage
from torch import nn

from lib.classes import CLASS_NAMES, class_index, parse_class_list
from lib.transforms import (
    IMAGE_KEY,
    PRED_KEY,
    CheckVolumed,
    CTPipeline,
    CTPipelineConfig,
    channels_to_labels,
    ct_pipeline,
    invert_to_original,
)
from model.checkpoint import build_model_from_checkpoint
from model.universal import UniversalModel, canonical_backbone

DEFAULT_THRESHOLD = 0.5
BLEND_MODES = ("gaussian", "constant")
# Channels inverted per resampling call: bounds the resampler's temporaries on large original grids.
INVERT_CHUNK = 8

ClassSpec = str | int
Thresholds = float | Mapping[ClassSpec, float]


def _check_threshold(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold for {what} must lie in [0, 1], got {value}")
    return value


def normalise_thresholds(thresholds: Thresholds) -> float | Mapping[int, float]:
    """One float, or a read-only {universal index: threshold}; names resolve now so typos fail early."""
    if isinstance(thresholds, Mapping):
        resolved = {class_index(k): _check_threshold(v, str(k)) for k, v in thresholds.items()}
        return MappingProxyType(resolved)
    return _check_threshold(thresholds, "every class")


@dataclass(frozen=True)
class InferenceConfig:
    """How a volume is segmented; defaults are the seed's (96^3 windows, 0.5 overlap, Gaussian, 0.5).

    ``sw_batch_size`` stays 1 by default: the U-Net's BatchNorm normalises with the statistics of the
    current batch also at inference, so batching windows together changes every prediction.
    ``thresholds`` is one value for all classes or ``{class: value}`` (other classes: 0.5).
    ``largest_component`` names classes (or ``"all"``) whose mask keeps only its largest 3D component.
    Class names are resolved on construction (typos fail here): ``thresholds`` becomes a read-only
    ``{universal index: value}`` and ``largest_component`` a sorted tuple of universal indices.
    ``device``/``amp`` of ``None`` mean: CUDA if available, and mixed precision exactly when on CUDA.
    """

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    blend_mode: str = "gaussian"
    sw_batch_size: int = 1
    thresholds: Thresholds = DEFAULT_THRESHOLD
    largest_component: tuple[ClassSpec, ...] | str | None = None
    device: str | torch.device | None = None
    amp: bool | None = None

    def __post_init__(self) -> None:
        roi = tuple(int(s) for s in self.roi_size)
        if len(roi) != 3 or min(roi) < 1:
            raise ValueError(f"roi_size must be three positive integers, got {self.roi_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.blend_mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {BLEND_MODES}, got {self.blend_mode!r}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        object.__setattr__(self, "roi_size", roi)
        object.__setattr__(self, "thresholds", normalise_thresholds(self.thresholds))
        object.__setattr__(self, "largest_component", parse_class_list(self.largest_component))

    def resolved_device(self) -> torch.device:
        """The device inference runs on: the configured one, else CUDA when present."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def use_amp(self, device: torch.device) -> bool:
        """Mixed precision: as configured, else on CUDA only (CPU autocast is slower than fp32 here)."""
        return device.type == "cuda" if self.amp is None else bool(self.amp)


# ----------------------------------------------------------------------------------------------
# Pure steps
# ----------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a parameterless module)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _logits_fn(model: nn.Module, class_indices: Sequence[int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Window -> float32 logits; a channel subset runs only those classes' heads (UniversalModel.decode)."""
    if class_indices is None:
        return lambda window: model(window).float()
    if not isinstance(model, UniversalModel):
        raise TypeError("class_indices needs a UniversalModel (encode/decode)")
    indices = list(class_indices)
    return lambda window: model.decode(*model.encode(window), indices).float()


def sliding_window_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    config: InferenceConfig,
    class_indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sigmoid probabilities [B, K', D, H, W] (CPU float32) of a [B, 1, D, H, W] image.

    Logits of overlapping windows are blended, then squashed (as the seed does). ``class_indices`` are
    the model's output channels to compute (default: all). Inputs smaller than the ROI are padded by the
    inferer and the result cropped back. Leaves the model in eval mode (a training loop switches it back).
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"expected an image of shape [B, 1, D, H, W], got {tuple(image.shape)}")
    model.eval()
    device = model_device(model)
    inferer = SlidingWindowInferer(
        roi_size=config.roi_size, sw_batch_size=config.sw_batch_size, overlap=config.overlap,
        mode=config.blend_mode,
    )
    plain = image.as_tensor() if isinstance(image, MetaTensor) else image  # no meta tracking in the network
    with torch.inference_mode(), torch.autocast(device.type, enabled=config.use_amp(device)):
        logits = inferer(plain.to(device=device, dtype=torch.float32), _logits_fn(model, class_indices))
    # Outside inference mode, so callers get an ordinary tensor they may modify in place.
    return torch.sigmoid(logits.float()).to("cpu")


def _channel_classes(num_channels: int, class_indices: Sequence[int] | None) -> list[int]:
    """Universal class of each channel (identity when not given), checked against the channel count."""
    classes = list(range(num_channels)) if class_indices is None else [int(c) for c in class_indices]
    if len(classes) != num_channels:
        raise ValueError(f"{len(classes)} class indices given for {num_channels} channels")
    return classes


def threshold_vector(thresholds: Thresholds, class_indices: Sequence[int]) -> torch.Tensor:
    """Threshold of each channel; a mapping falls back to 0.5 for classes it does not name."""
    resolved = normalise_thresholds(thresholds)
    if isinstance(resolved, Mapping):
        return torch.tensor([resolved.get(c, DEFAULT_THRESHOLD) for c in class_indices], dtype=torch.float32)
    return torch.full((len(class_indices),), resolved, dtype=torch.float32)


def binarise(
    probs: torch.Tensor, thresholds: Thresholds = DEFAULT_THRESHOLD, class_indices: Sequence[int] | None = None
) -> torch.Tensor:
    """[K, ...] probabilities -> [K, ...] bool masks: ``prob > threshold`` of each channel's class."""
    probs = torch.as_tensor(probs)
    classes = _channel_classes(probs.shape[0], class_indices)
    limits = threshold_vector(thresholds, classes).to(probs.device)
    return probs > limits.view(-1, *([1] * (probs.dim() - 1)))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D mask (the mask itself when empty or connected)."""
    if not mask.any():
        return mask
    components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def keep_largest_component(
    masks: torch.Tensor, which: Iterable[ClassSpec] | str | None, class_indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Drop all but the largest component in the channels of the classes ``which`` names ('all': every one).

    Removes the stray islands a sliding window leaves far from an organ; classes that are legitimately
    in pieces (e.g. tumours, colon in cross-section) should not be listed.
    """
    masks = torch.as_tensor(masks).bool()
    wanted = set(parse_class_list(which))
    channels = [k for k, c in enumerate(_channel_classes(masks.shape[0], class_indices)) if c in wanted]
    if not channels:
        return masks
    result = masks.clone()
    for k in channels:
        result[k] = torch.from_numpy(largest_component(masks[k].cpu().numpy())).to(masks.device)
    return result


def universal_label_map(masks: torch.Tensor, probabilities: torch.Tensor, class_indices: Sequence[int]) -> torch.Tensor:
    """[K, ...] masks -> [1, ...] uint8 label map with universal values (class index + 1; 0 background).

    channels_to_labels numbers channels 1..K; a lookup table renumbers them when the model predicts a
    subset of the template.
    """
    local = channels_to_labels(masks, probabilities)
    lookup = torch.tensor([0, *(int(c) + 1 for c in class_indices)], dtype=torch.uint8)
    return lookup[local]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine's 3x3 block)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return tuple(float(s) for s in sizes)  # type: ignore[return-value]


def invert_channels(
    sample: Mapping[str, Any], pipeline: CTPipeline, values: torch.Tensor, chunk: int = INVERT_CHUNK
) -> MetaTensor:
    """Map [K, ...] float values on the preprocessed grid of ``sample`` onto its original grid (linear).

    Inverts ``chunk`` channels at a time into one preallocated result, so the resampler's temporaries
    scale with the chunk rather than with K.
    """
    if values.shape[0] == 0:
        raise ValueError("no channels to invert")
    buffer, affine = None, None
    for start in range(0, values.shape[0], chunk):
        part = invert_to_original({**sample, PRED_KEY: MetaTensor(values[start : start + chunk])}, pipeline)
        if buffer is None:
            buffer = torch.empty((values.shape[0], *part.shape[1:]), dtype=torch.float32)
            affine = part.affine
        buffer[start : start + part.shape[0]] = part.as_tensor()
    return MetaTensor(buffer, affine=affine)


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prediction:
    """One segmented volume. Channels follow ``class_indices`` (universal class of each channel)."""

    probabilities: torch.Tensor  # [K, ...] float32 on the preprocessed grid (attention scoring, validation)
    masks_original: torch.Tensor  # [K, ...] bool on the original grid
    label_map_original: torch.Tensor  # [1, ...] uint8 on the original grid, universal label values
    affine: np.ndarray  # 4x4 RAS affine of the original grid
    spacing_mm: tuple[float, float, float]  # original voxel size along each array axis
    seconds: float  # wall time of predict(): load, preprocess, inference, inversion, post-processing
    class_indices: tuple[int, ...]


Source = str | Path | Mapping[str, Any]


class Predictor:
    """Segments CT volumes with a universal model and returns masks on the original grid.

    Probabilities are inverted to the original grid *linearly*, then thresholded there (rather than
    thresholding on the preprocessed grid and inverting masks with nearest neighbour): boundaries land
    with sub-voxel accuracy when the original grid is finer than the working spacing (1.5 mm vs the
    usual 0.7-0.8 mm in-plane) instead of as 1.5 mm staircases, the coarser direction is anti-aliased
    rather than point-sampled, and the masks and the label map come from the same original-grid
    probabilities, so they agree voxel for voxel. The price is holding K float32 maps on the original
    grid for the duration of post-processing (pass ``classes`` to predict fewer on very large volumes).
    """

    def __init__(
        self,
        model: UniversalModel,
        pipeline_config: CTPipelineConfig | None = None,
        inference_config: InferenceConfig | None = None,
        classes: Iterable[ClassSpec] | str | None = None,
    ) -> None:
        """``classes`` restricts prediction to those classes (names or universal indices; default: all)."""
        self.config = inference_config or InferenceConfig()
        self.pipeline_config = pipeline_config or CTPipelineConfig()
        self.model = model.to(self.config.resolved_device()).eval()
        model_classes = [class_index(name) for name in model.class_names]
        wanted = model_classes if classes is None else list(parse_class_list(classes))
        missing = [CLASS_NAMES[c] for c in wanted if c not in model_classes]
        if missing or not wanted:
            raise ValueError(f"the model predicts {list(model.class_names)}; cannot predict {missing or 'no classes'}")
        self.channels: tuple[int, ...] = tuple(model_classes.index(c) for c in wanted)  # model output channels
        self.class_indices: tuple[int, ...] = tuple(wanted)
        self._file_pipeline = ct_pipeline(self.pipeline_config, load=True)
        self._memory_pipeline = ct_pipeline(self.pipeline_config, load=False)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        pipeline_config: CTPipelineConfig | None = None,
        inference_config: InferenceConfig | None = None,
        classes: Iterable[ClassSpec] | str | None = None,
        backbone: str | None = None,
    ) -> Predictor:
        """Build from a revseg checkpoint; ``backbone`` (if given) must be the checkpoint's, else ValueError.

        Without ``classes`` it predicts the classes the checkpoint's training supervised (all when the
        checkpoint does not record them).
        """
        model, ckpt = build_model_from_checkpoint(path, map_location="cpu")
        if classes is None and ckpt.get("supervised_classes"):
            classes = ckpt["supervised_classes"]  # heads never trained would only predict noise
        found = model.config["backbone"]
        wanted = found if backbone is None else canonical_backbone(backbone)
        if wanted != found:
            raise ValueError(f"{path} holds a {found} model, but backbone {wanted} was requested")
        return cls(model, pipeline_config, inference_config, classes)

    def preprocess(self, source: Source) -> tuple[dict, CTPipeline]:
        """Run the CT pipeline on a file path, ``{"image": path}``, or ``{"image": loaded MetaTensor}``.

        A loaded image must be channel first with its affine (as LoadImaged + EnsureChannelFirstd give).
        Returns the sample and the pipeline instance that made it (needed to invert).
        """
        sample = {IMAGE_KEY: str(source)} if isinstance(source, str | Path) else dict(source)
        if isinstance(sample.get(IMAGE_KEY), str | Path):
            sample[IMAGE_KEY] = str(sample[IMAGE_KEY])
            return self._file_pipeline(sample), self._file_pipeline
        if not isinstance(sample.get(IMAGE_KEY), MetaTensor):
            raise TypeError(f"expected a path or a sample whose {IMAGE_KEY!r} is a path or a MetaTensor")
        sample = CheckVolumed(keys=[IMAGE_KEY])(sample)  # the file pipeline checks this as it loads
        return self._memory_pipeline(sample), self._memory_pipeline

    def predict(self, source: Source) -> Prediction:
        """Segment one volume; see :meth:`preprocess` for the accepted sources."""
        start = time.perf_counter()
        sample, pipeline = self.preprocess(source)
        return self.predict_preprocessed(sample, pipeline, start)

    def predict_preprocessed(
        self, sample: Mapping[str, Any], pipeline: CTPipeline, start: float | None = None
    ) -> Prediction:
        """Segment a sample already run through ``pipeline`` (the same instance is needed to invert)."""
        start = time.perf_counter() if start is None else start
        image = sample[IMAGE_KEY]
        probabilities = sliding_window_probabilities(self.model, image[None], self.config, self.channels)[0]
        original = invert_channels(sample, pipeline, probabilities)
        masks = binarise(original.as_tensor(), self.config.thresholds, self.class_indices)
        masks = keep_largest_component(masks, self.config.largest_component, self.class_indices)
        label_map = universal_label_map(masks, original.as_tensor(), self.class_indices)
        affine = np.asarray(original.affine, dtype=float)
        return Prediction(
            probabilities=probabilities,
            masks_original=masks,
            label_map_original=label_map,
            affine=affine,
            spacing_mm=voxel_spacing(affine),
            seconds=time.perf_counter() - start,
            class_indices=self.class_indices,
        )
