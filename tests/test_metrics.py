"""Known-answer tests for lib.metrics (Dice and normalised surface Dice)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.metrics import dice, per_class_scores, surface_dice, surface_voxels


def _cube(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def _reference_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing, tol: float) -> float:
    """Brute force on the whole volume with a k-d tree: independent of the bbox/EDT shortcut."""
    struct = ndimage.generate_binary_structure(pred.ndim, 1)
    ps = np.argwhere(pred & ~ndimage.binary_erosion(pred, struct)) * np.asarray(spacing)
    ts = np.argwhere(truth & ~ndimage.binary_erosion(truth, struct)) * np.asarray(spacing)
    d_pt, _ = cKDTree(ts).query(ps)
    d_tp, _ = cKDTree(ps).query(ts)
    return (np.sum(d_pt <= tol) + np.sum(d_tp <= tol)) / (len(ps) + len(ts))


# ----------------------------------------------------------------------------- dice


def test_dice_identical_is_one() -> None:
    m = _cube((10, 10, 10), (2, 2, 2), 4)
    assert dice(m, m) == 1.0


def test_dice_disjoint_is_zero() -> None:
    assert dice(_cube((10, 10, 10), (0, 0, 0), 3), _cube((10, 10, 10), (5, 5, 5), 3)) == 0.0


def test_dice_empty_conventions() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = _cube((5, 5, 5), (1, 1, 1), 2)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_half_overlap_known_value() -> None:
    # pred: 4x4x4 = 64 voxels, truth shifted by 2 along axis 0 -> 32 shared voxels.
    pred = _cube((10, 10, 10), (0, 0, 0), 4)
    truth = _cube((10, 10, 10), (2, 0, 0), 4)
    assert dice(pred, truth) == pytest.approx(2 * 32 / (64 + 64))
    # Unequal sizes: 8 voxels inside 64 -> 2*8/72.
    assert dice(_cube((10, 10, 10), (0, 0, 0), 2), pred) == pytest.approx(16 / 72)


def test_dice_accepts_integer_masks_and_rejects_shape_mismatch() -> None:
    m = _cube((6, 6, 6), (1, 1, 1), 3)
    assert dice(m.astype(np.uint8), m.astype(np.int64)) == 1.0
    with pytest.raises(ValueError):
        dice(m, m[:-1])


# ----------------------------------------------------------------------------- surface dice


def test_surface_voxels_of_cube_is_its_shell() -> None:
    m = _cube((9, 9, 9), (2, 2, 2), 5)
    assert int(surface_voxels(m).sum()) == 5**3 - 3**3


def test_surface_dice_identical_is_one() -> None:
    m = _cube((20, 20, 20), (5, 5, 5), 6)
    assert surface_dice(m, m, (1.0, 1.0, 1.0), 0.0) == 1.0


def test_surface_dice_empty_conventions() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    m = _cube((8, 8, 8), (2, 2, 2), 3)
    assert surface_dice(empty, empty, (1, 1, 1), 1.0) == 1.0
    assert surface_dice(m, empty, (1, 1, 1), 1.0) == 0.0
    assert surface_dice(empty, m, (1, 1, 1), 1.0) == 0.0


def test_surface_dice_one_voxel_shift_within_tolerance_is_one() -> None:
    pred = _cube((20, 20, 20), (5, 5, 5), 6)
    truth = _cube((20, 20, 20), (6, 5, 5), 6)
    assert surface_dice(pred, truth, (1.0, 1.0, 1.0), 1.0) == 1.0


def test_surface_dice_shift_beyond_tolerance_is_below_one() -> None:
    pred = _cube((20, 20, 20), (5, 5, 5), 6)
    truth = _cube((20, 20, 20), (8, 5, 5), 6)
    score = surface_dice(pred, truth, (1.0, 1.0, 1.0), 1.0)
    assert 0.0 < score < 1.0
    assert score == pytest.approx(_reference_surface_dice(pred, truth, (1, 1, 1), 1.0))


def test_surface_dice_known_value_on_lines() -> None:
    # Two 3-voxel lines offset by one voxel along their length: the end voxel of each is 1 mm
    # from the other line, the rest lie on it.  With 0.5 mm tolerance: (2 + 2) / (3 + 3).
    pred = np.zeros((1, 1, 6), dtype=bool)
    truth = np.zeros((1, 1, 6), dtype=bool)
    pred[0, 0, 0:3] = True
    truth[0, 0, 1:4] = True
    assert surface_dice(pred, truth, (1, 1, 1), 0.5) == pytest.approx(4 / 6)
    assert surface_dice(pred, truth, (1, 1, 1), 1.0) == 1.0


def test_surface_dice_honours_anisotropic_spacing() -> None:
    shape = (20, 20, 20)
    pred = _cube(shape, (5, 5, 5), 6)
    shifted_axis0 = _cube(shape, (6, 5, 5), 6)
    shifted_axis2 = _cube(shape, (5, 5, 6), 6)
    # A one-voxel shift is 3 mm along axis 0 but 1 mm along axis 2 with this spacing.
    spacing = (3.0, 1.0, 1.0)
    assert surface_dice(pred, shifted_axis2, spacing, 2.0) == 1.0
    aniso = surface_dice(pred, shifted_axis0, spacing, 2.0)
    assert aniso < 1.0
    assert aniso == pytest.approx(_reference_surface_dice(pred, shifted_axis0, spacing, 2.0))
    assert surface_dice(pred, shifted_axis0, (1.0, 1.0, 1.0), 2.0) == 1.0
    # Swapping which axis is coarse swaps which shift is tolerated.
    assert surface_dice(pred, shifted_axis0, (1.0, 1.0, 3.0), 2.0) == 1.0
    assert surface_dice(pred, shifted_axis2, (1.0, 1.0, 3.0), 2.0) == pytest.approx(aniso)


def test_surface_dice_single_voxels_distance_in_mm() -> None:
    a = np.zeros((3, 3, 3), dtype=bool)
    b = np.zeros((3, 3, 3), dtype=bool)
    a[0, 0, 0] = True
    b[1, 0, 0] = True
    assert surface_dice(a, b, (2.0, 1.0, 1.0), 1.5) == 0.0
    assert surface_dice(a, b, (2.0, 1.0, 1.0), 2.0) == 1.0
    assert surface_dice(a, b, (1.0, 1.0, 1.0), 1.5) == 1.0


def test_surface_dice_matches_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(0)
    shape = (40, 36, 30)
    for seed_shift in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
        pred = noise > 0.05
        truth = ndimage.shift(noise, (seed_shift, 1, 0), order=0) > 0.02
        # Blobs touching the volume edge exercise the border handling of the crop.
        assert pred[0].any() or pred[-1].any()
        spacing = (2.5, 0.8, 1.1)
        for tol in (0.0, 1.0, 2.5):
            assert surface_dice(pred, truth, spacing, tol) == pytest.approx(
                _reference_surface_dice(pred, truth, spacing, tol)
            )


def test_surface_dice_rejects_bad_arguments() -> None:
    m = _cube((5, 5, 5), (1, 1, 1), 2)
    with pytest.raises(ValueError):
        surface_dice(m, m, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError):
        surface_dice(m, m, (1.0, 0.0, 1.0), 1.0)
    with pytest.raises(ValueError):
        surface_dice(m, m, (1.0, 1.0, 1.0), -1.0)


def test_surface_dice_large_volume_is_fast() -> None:
    import time

    shape = (150, 150, 150)
    pred = _cube(shape, (40, 40, 40), 50)
    truth = _cube(shape, (43, 41, 40), 50)  # shifted 2.4 mm and 0.8 mm: partly beyond 2 mm
    t0 = time.perf_counter()
    score = surface_dice(pred, truth, (0.8, 0.8, 2.5), 2.0)
    elapsed = time.perf_counter() - t0
    assert 0.0 < score < 1.0
    assert elapsed < 5.0


# ----------------------------------------------------------------------------- per class


def test_per_class_scores_keys_and_values() -> None:
    shape = (3, 12, 12, 12)
    pred = np.zeros(shape, dtype=bool)
    truth = np.zeros(shape, dtype=bool)
    pred[0, 2:6, 2:6, 2:6] = truth[0, 2:6, 2:6, 2:6] = True  # perfect
    truth[1, 2:6, 2:6, 2:6] = True  # missed
    # class 2 empty in both
    scores = per_class_scores(pred, truth, (1.0, 1.0, 1.0), 1.0)
    assert set(scores) == {0, 1, 2}
    assert scores[0] == {"dice": 1.0, "surface_dice": 1.0, "truth_voxels": 64, "pred_voxels": 64}
    assert scores[1]["dice"] == 0.0 and scores[1]["surface_dice"] == 0.0
    assert scores[1]["truth_voxels"] == 64 and scores[1]["pred_voxels"] == 0
    assert scores[2]["dice"] == 1.0 and scores[2]["truth_voxels"] == 0
    assert set(per_class_scores(pred, truth, (1, 1, 1), 1.0, classes=[1])) == {1}
    with pytest.raises(IndexError):
        per_class_scores(pred, truth, (1, 1, 1), 1.0, classes=[3])
