"""The shared CT pipeline on the real CT: orientation, resampling, windowing, cropping, and exact inversion."""

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from lib.transforms import (
    CTInputError,
    CTPipelineConfig,
    channels_to_labels,
    ct_pipeline,
    invert_to_original,
    labels_to_channels,
)


def _run(image: Path, label: Path | None, spacing: float = 3.0):
    pipeline = ct_pipeline(CTPipelineConfig.from_spacing(spacing), with_label=label is not None)
    sample = {"image": str(image)} | ({"label": str(label)} if label else {})
    return pipeline, pipeline(sample)


@pytest.mark.parametrize("spacing", [3.0, 1.5])
def test_prediction_lands_on_original_grid(example_ct, spacing):
    image, label = example_ct
    pipeline, sample = _run(image, label, spacing)
    assert sample["image"].min() >= 0 and sample["image"].max() <= 1
    assert np.allclose(np.abs(np.diag(sample["image"].affine.numpy()))[:3], spacing)
    sample["pred"] = sample["label"].clone()
    restored = invert_to_original(sample, pipeline, nearest=True)
    original = nib.load(str(label))
    assert tuple(restored.shape[1:]) == original.shape
    assert np.allclose(restored.affine.numpy(), original.affine, atol=1e-4)
    agreement = (restored[0].numpy().astype(np.uint8) == np.asarray(original.dataobj)).mean()
    assert agreement > 0.999


def test_orientation_and_crop_are_undone(example_ct, tmp_path):
    """An LPS-stored CT padded with air is cropped, and its prediction comes back onto its own grid."""
    image, _ = example_ct
    src = nib.load(str(image))
    original = np.asarray(src.dataobj)
    pad = 10
    data = np.pad(original[::-1, ::-1, :], ((pad, pad), (pad, pad), (0, 0)), constant_values=-1024)
    to_original = np.diag([-1.0, -1.0, 1.0, 1.0])  # new voxel i -> original voxel N - 1 + pad - i
    to_original[:2, 3] = [original.shape[0] - 1 + pad, original.shape[1] - 1 + pad]
    affine = src.affine @ to_original
    lps = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(lps))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")

    pipeline, sample = _run(lps, None)
    assert sample["image"].shape[1] < data.shape[0] and sample["image"].shape[2] < data.shape[1], "air is cropped"
    assert nib.aff2axcodes(sample["image"].affine.numpy()) == ("R", "A", "S")
    sample["pred"] = sample["image"].clone()
    restored = invert_to_original(sample, pipeline)
    assert tuple(restored.shape[1:]) == data.shape
    assert np.allclose(restored.affine.numpy(), affine, atol=1e-4)
    windowed = np.clip((data.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0)
    # Cropped-away voxels are air (0 after windowing) and the inverse pads with 0: equal everywhere.
    assert np.allclose(restored[0].numpy(), windowed, atol=1e-4)


def test_nrrd_reads_like_nifti(example_ct_small, tmp_path):
    image, _ = example_ct_small
    src = nib.load(str(image))
    data = np.asarray(src.dataobj)
    lps_directions = (np.diag([-1.0, -1.0, 1.0]) @ src.affine[:3, :3]).T
    header = {"space": "left-posterior-superior", "space directions": lps_directions,
              "space origin": np.diag([-1.0, -1.0, 1.0]) @ src.affine[:3, 3]}
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), data, header)
    _, from_nrrd = _run(path, None)
    _, from_nifti = _run(image, None)
    assert from_nrrd["image"].shape == from_nifti["image"].shape
    assert torch.allclose(from_nrrd["image"], from_nifti["image"], atol=1e-4)
    assert np.allclose(from_nrrd["image"].affine.numpy(), from_nifti["image"].affine.numpy(), atol=1e-3)


@pytest.mark.parametrize(
    "data,message",
    [
        (np.full((8, 8, 8), np.nan, np.float32), "NaN or Inf"),
        (np.zeros((8, 8, 8, 2), np.float32), "single 3D volume"),
        (np.zeros((8, 8), np.float32), "3D volume"),
    ],
    ids=["nan", "4d", "2d"],
)
def test_unusable_volumes_name_the_file(tmp_path, data, message):
    path = tmp_path / "broken_case.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(CTInputError, match=f"broken_case.*{message}"):
        _run(path, None)


def test_label_grid_and_values_are_checked(example_ct_small, tmp_path):
    image, label = example_ct_small
    src = nib.load(str(label))
    bad = tmp_path / "bad_values.nii.gz"
    nib.save(nib.Nifti1Image(np.full(src.shape, 77, np.uint8), src.affine), str(bad))
    with pytest.raises(CTInputError, match="bad_values.*0..32"):
        _run(image, bad)
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), src.affine @ np.diag([1, 1, 2.0, 1])), str(shifted))
    with pytest.raises(CTInputError, match="shifted.*affine differs"):
        _run(image, shifted)


def test_channels_round_trip_and_overlap_resolution():
    label = torch.tensor([[[[0, 1, 2], [3, 32, 0]]]])
    channels = labels_to_channels(label)
    assert channels.shape == (32, 1, 2, 3)
    assert torch.equal(channels_to_labels(channels), label)
    masks = torch.zeros(32, 1, 1, 1, dtype=torch.bool)
    masks[[2, 5]] = True
    probs = torch.zeros(32, 1, 1, 1)
    probs[2], probs[5] = 0.6, 0.9
    assert int(channels_to_labels(masks, probs)) == 6
