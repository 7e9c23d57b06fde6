"""Inference core: sliding-window probabilities, thresholds, post-processing and the Predictor's grid handling.

Real (tiny) UniversalModels, real CTs at a coarse 6 mm working spacing and 32^3 windows keep this fast on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from lib.classes import CLASS_NAMES, NUM_CLASSES, UnknownClassError
from lib.inference import (
    InferenceConfig,
    Predictor,
    binarise,
    keep_largest_component,
    sliding_window_probabilities,
)
from lib.transforms import CTInputError, CTPipelineConfig
from model.universal import UniversalModel

ROI = (32, 32, 32)
FAST = InferenceConfig(roi_size=ROI, overlap=0.0, device="cpu")  # blending is covered on a small tensor below
PIPELINE = CTPipelineConfig.from_spacing(6.0)
COARSE = CTPipelineConfig.from_spacing(12.0)  # one 32^3 window per case: for tests where spacing is beside the point


def tiny_model(classes: Sequence[str] = CLASS_NAMES) -> UniversalModel:
    torch.manual_seed(0)
    return UniversalModel("unet", classes, roi_size=ROI, width=0.25)


def constant_logit_model(logits: float | Mapping[str, float], classes: Sequence[str] = CLASS_NAMES) -> UniversalModel:
    """A real UniversalModel whose dynamic heads output one constant logit per class, everywhere.

    Each controller's last layer is zeroed except the bias that becomes the final head bias (the last of the
    153 generated head parameters), so every head weight is 0 and its output is exactly that bias.
    """
    model = tiny_model(classes)
    with torch.no_grad():
        for name, controller in zip(classes, model.controllers, strict=True):
            last = controller[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[-1] = logits[name] if isinstance(logits, Mapping) else logits
    return model


def test_prediction_lands_on_original_grid(example_ct):
    """3 mm CT, 6 mm working grid: masks and label map come back on the file's own shape and affine."""
    image, _ = example_ct
    prediction = Predictor(tiny_model(), PIPELINE, FAST).predict(image)
    original = nib.load(str(image))

    assert prediction.probabilities.shape[0] == NUM_CLASSES
    assert prediction.probabilities.shape[1:] != original.shape  # really predicted on another grid
    assert float(prediction.probabilities.min()) >= 0.0 and float(prediction.probabilities.max()) <= 1.0
    assert prediction.masks_original.dtype == torch.bool
    assert tuple(prediction.masks_original.shape) == (NUM_CLASSES, *original.shape)
    assert tuple(prediction.label_map_original.shape) == (1, *original.shape)
    assert np.allclose(prediction.affine, original.affine, atol=1e-4)
    assert prediction.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert prediction.seconds > 0

    labels = prediction.label_map_original[0].long()
    assert int(labels.min()) >= 0 and int(labels.max()) <= NUM_CLASSES
    assert torch.equal(labels > 0, prediction.masks_original.any(dim=0)), "label map and masks agree on foreground"
    for value in labels.unique().tolist():
        if value:
            assert bool(prediction.masks_original[value - 1][labels == value].all())


def test_loaded_image_predicts_like_its_file(example_ct_small):
    """MONAI Label hands over loaded images; the small CT (8 slices at 12 mm) is also smaller than the ROI."""
    image, _ = example_ct_small
    predictor = Predictor(tiny_model(), COARSE, FAST, classes=["liver", "aorta"])
    from_file = predictor.predict(image)
    from_memory = predictor.predict({"image": LoadImage(image_only=True, ensure_channel_first=True)(str(image))})
    assert from_file.class_indices == (5, 7)
    assert tuple(from_file.masks_original.shape) == (2, *nib.load(str(image)).shape)
    assert torch.equal(from_file.masks_original, from_memory.masks_original)
    assert np.allclose(from_file.affine, from_memory.affine)


def test_subset_model_writes_universal_label_values(example_ct_small):
    """A spleen+aorta model: overlaps go to the more probable class, thresholds are per class, values are 1 and 8."""
    image, _ = example_ct_small
    model = constant_logit_model({"spleen": 5.0, "aorta": 10.0}, classes=("spleen", "aorta"))
    both = Predictor(model, COARSE, FAST).predict(image)
    assert both.class_indices == (0, 7)
    assert both.masks_original[1].any() and torch.equal(both.masks_original[0], both.masks_original[1])
    values = set(both.label_map_original.unique().tolist())
    assert 8 in values and values <= {0, 8}  # aorta (p=0.99995) beats spleen (p=0.993) where both are predicted

    strict = replace(FAST, thresholds={"aorta": 0.99999})
    spleen_only = Predictor(model, COARSE, strict).predict(image)
    assert not spleen_only.masks_original[1].any()
    values = set(spleen_only.label_map_original.unique().tolist())
    assert 1 in values and values <= {0, 1}


def test_sliding_window_probabilities_for_a_class_subset():
    model = tiny_model(("spleen", "liver", "aorta"))
    image = torch.rand(1, 1, 20, 40, 24)  # smaller than the ROI along two axes: padded, then cropped back
    blended = replace(FAST, overlap=0.5)  # two Gaussian-blended windows along the 40-voxel axis
    subset = sliding_window_probabilities(model, image, blended, class_indices=[2, 0])
    full = sliding_window_probabilities(model, image, blended)
    assert subset.shape == (1, 2, 20, 40, 24) and full.shape == (1, 3, 20, 40, 24)
    assert subset.dtype == torch.float32 and subset.device.type == "cpu"
    assert torch.allclose(subset, full[:, [2, 0]], atol=1e-5)
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0
    assert not model.training and not subset.is_inference()
    subset.mul_(2)  # callers may work in place


def test_binarise_uses_each_channels_threshold():
    probs = torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    assert binarise(probs).flatten(1).all(dim=1).tolist() == [False, False, True]  # strictly above 0.5
    assert binarise(probs, 0.2).all()
    per_class = binarise(probs, {"Arota": 0.6, "liver": 0.1}, class_indices=[5, 7, 0])
    assert per_class.flatten(1).all(dim=1).tolist() == [True, False, True]  # liver 0.1, aorta 0.6, spleen 0.5
    with pytest.raises(UnknownClassError):
        binarise(probs, {"livr": 0.5})
    with pytest.raises(ValueError, match="3 channels"):
        binarise(probs, 0.5, class_indices=[0, 1])


def test_keep_largest_component_only_in_named_classes():
    masks = torch.zeros(2, 10, 10, 10, dtype=torch.bool)
    masks[:, 0:4, 0:4, 0:4] = True  # 64 voxels
    masks[:, 4, 4, 4] = True  # touches the big blob by a corner only: 26-connected
    masks[:, 8:10, 8:10, 8:10] = True  # separate 8-voxel island
    kept = keep_largest_component(masks, ["liver"], class_indices=[5, 7])
    assert int(kept[0].sum()) == 65 and not kept[0, 9, 9, 9]
    assert torch.equal(kept[1], masks[1])
    everything = keep_largest_component(masks, "all", class_indices=[5, 7])
    assert [int(m.sum()) for m in everything] == [65, 65]
    assert torch.equal(keep_largest_component(masks, None), masks)


def test_inference_config_defaults_and_validation(monkeypatch):
    config = InferenceConfig()
    assert (config.roi_size, config.overlap, config.blend_mode, config.sw_batch_size) == ((96, 96, 96), 0.5,
                                                                                          "gaussian", 1)
    assert config.thresholds == 0.5 and config.largest_component == ()
    named = InferenceConfig(thresholds={"Arota": 0.4}, largest_component=("liver", 1))
    assert dict(named.thresholds) == {7: 0.4} and named.largest_component == (1, 5)
    assert InferenceConfig(largest_component="all").largest_component == tuple(range(NUM_CLASSES))
    for bad in ({"overlap": 1.0}, {"thresholds": 1.5}, {"blend_mode": "mean"}, {"roi_size": (96, 96)},
                {"sw_batch_size": 0}):
        with pytest.raises(ValueError):
            InferenceConfig(**bad)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.resolved_device() == torch.device("cpu")
    assert not config.use_amp(torch.device("cpu")) and config.use_amp(torch.device("cuda"))
    assert not InferenceConfig(amp=False).use_amp(torch.device("cuda"))


def test_predictor_refuses_what_it_cannot_segment():
    with pytest.raises(ValueError, match="kidney_tumor"):
        Predictor(tiny_model(("spleen", "aorta")), PIPELINE, FAST, classes=["aorta", "kidney_tumor"])
    predictor = Predictor(tiny_model(("spleen", "aorta")), PIPELINE, FAST)
    with pytest.raises(CTInputError, match="single 3D volume"):
        predictor.predict({"image": MetaTensor(torch.zeros(8, 8, 8))})  # loaded without a channel dimension
