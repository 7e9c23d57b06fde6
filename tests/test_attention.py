"""Known-answer tests for lib.activelearning.attention (AbdomenAtlas-8K attention maps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from lib.activelearning import (
    AttentionMaps,
    attention_maps,
    binary_opening_3d,
    case_priority,
    class_ranking,
    inconsistency,
    mean_mask,
    overlap,
    rank_cases,
    select_top_fraction,
    uncertainty,
)

SHAPE = (24, 24, 24)


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _disagreement_case(boxes: list[tuple[tuple[int, int, int], tuple[int, int, int]]]) -> np.ndarray:
    """[M=2, C=1, ...] probs: confident background, models at 0.9 vs 0.1 inside each box."""
    probs = np.zeros((2, 1, *SHAPE), dtype=np.float32)
    for lo, hi in boxes:
        region = _box(SHAPE, lo, hi)
        probs[0, 0][region] = 0.9
        probs[1, 0][region] = 0.1
    return probs


# ----------------------------------------------------------------------------- uncertainty


def test_uncertainty_at_half_is_half_ln2_and_binary_map_is_full() -> None:
    probs = np.full((2, 1, 8, 8, 8), 0.5, dtype=np.float64)
    u = uncertainty(probs[:, 0])
    assert np.allclose(u, 0.5 * math.log(2.0))
    maps = attention_maps(probs)
    # Full volume survives the opening too: outside-the-array is only background for erosion
    # *and* dilation, so the border comes back.
    assert maps.uncertainty_mask.all()


def test_uncertainty_peaks_at_one_over_e() -> None:
    grid = np.linspace(0.0, 1.0, 10001)
    u = uncertainty(grid[None])
    assert grid[np.argmax(u)] == pytest.approx(1 / math.e, abs=1e-4)
    assert u.max() == pytest.approx(1 / math.e, rel=1e-6)
    assert uncertainty(np.array([[1 / math.e]]))[0] == pytest.approx(1 / math.e)


def test_uncertainty_is_zero_for_certain_probabilities() -> None:
    probs = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    u = uncertainty(probs)
    assert np.all(np.isfinite(u))
    assert np.array_equal(u, np.zeros(4))


def test_uncertainty_averages_over_models() -> None:
    probs = np.array([[0.5], [1.0]])
    assert uncertainty(probs)[0] == pytest.approx(0.25 * math.log(2.0))


# ----------------------------------------------------------------------------- inconsistency


def test_inconsistency_identical_models_is_zero() -> None:
    rng = np.random.default_rng(1)
    p = rng.random((5, 5, 5))
    assert np.array_equal(inconsistency(np.stack([p, p, p])), np.zeros_like(p))


def test_inconsistency_models_at_zero_and_one_is_half() -> None:
    probs = np.stack([np.zeros((4, 4)), np.ones((4, 4))])
    assert np.allclose(inconsistency(probs), 0.5)  # population std, not the ddof=1 value 0.707


# ----------------------------------------------------------------------------- overlap


def test_overlap_is_exactly_where_masks_meet() -> None:
    a = _box(SHAPE, (2, 2, 2), (12, 12, 12))
    b = _box(SHAPE, (8, 8, 8), (20, 20, 20))
    c = _box(SHAPE, (0, 20, 0), (4, 24, 4))  # touches nobody
    o = overlap(np.stack([a, b, c]))
    assert np.array_equal(o[0], a & b)
    assert np.array_equal(o[1], a & b)
    assert not o[2].any()


def test_overlap_partner_classes_limit_who_counts() -> None:
    a = _box(SHAPE, (0, 0, 0), (10, 10, 10))
    b = _box(SHAPE, (5, 5, 5), (15, 15, 15))
    o = overlap(np.stack([a, b]), partner_classes=[1])
    assert np.array_equal(o[0], a & b)  # a meets partner b
    assert not o[1].any()  # b's only neighbour is not a partner


def test_attention_overlap_without_opening_matches_intersection() -> None:
    probs = np.zeros((2, 2, *SHAPE), dtype=np.float32)
    a = _box(SHAPE, (2, 0, 0), (12, 24, 24))
    b = _box(SHAPE, (8, 0, 0), (18, 24, 24))
    probs[:, 0][:, a] = 1.0
    probs[:, 1][:, b] = 1.0
    maps = attention_maps(probs, opening_iterations=0, overlap_opening_iterations=0)
    assert np.array_equal(maps.overlap_mask[0], a & b)
    assert np.array_equal(maps.overlap_mask[1], a & b)
    assert np.array_equal(maps.attention[0], a & b)  # certain, consistent: overlap is all there is
    # The 4-voxel sliver does not contain a 5^3 cube, so opening the overlap map erases it.
    opened = attention_maps(probs, overlap_opening_iterations=2)
    assert not opened.overlap_mask.any()


def test_mean_mask_is_strictly_above_threshold() -> None:
    probs = np.array([[0.4, 0.6, 0.5], [0.6, 0.6, 0.5]])
    assert mean_mask(probs).tolist() == [False, True, False]


# ----------------------------------------------------------------------------- opening


def test_opening_removes_isolated_voxels_and_keeps_a_solid_cube() -> None:
    mask = _box(SHAPE, (3, 3, 3), (10, 10, 10))  # 7^3 cube
    speckle = [(20, 20, 20), (15, 2, 18), (0, 0, 0), (23, 23, 0)]
    for v in speckle:
        mask[v] = True
    opened = binary_opening_3d(mask)
    assert np.array_equal(opened, _box(SHAPE, (3, 3, 3), (10, 10, 10)))
    # The 6-connected cross also drops speckle (but rounds the cube's edges and corners).
    cross = binary_opening_3d(mask, connectivity=1)
    assert not any(cross[v] for v in speckle)
    assert cross[6, 6, 6] and cross[3, 6, 6] and not cross[3, 3, 3]


def test_opening_drops_structures_thinner_than_five_voxels() -> None:
    assert not binary_opening_3d(_box(SHAPE, (0, 0, 0), (4, 24, 24))).any()
    assert binary_opening_3d(_box(SHAPE, (0, 0, 0), (5, 24, 24))).sum() == 5 * 24 * 24


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_opening_matches_scipy_reference(connectivity: int, iterations: int) -> None:
    rng = np.random.default_rng(connectivity * 10 + iterations)
    mask = ndimage.gaussian_filter(rng.standard_normal((30, 26, 22)), 1.5) > 0.0
    structure = ndimage.generate_binary_structure(3, connectivity)
    expected = ndimage.binary_opening(mask, structure=structure, iterations=iterations)
    assert np.array_equal(binary_opening_3d(mask, iterations, connectivity), expected)


def test_opening_zero_iterations_is_identity_and_empty_stays_empty() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[5, 5, 5] = True
    assert np.array_equal(binary_opening_3d(mask, 0), mask)
    assert not binary_opening_3d(np.zeros(SHAPE, dtype=bool)).any()
    with pytest.raises(ValueError):
        binary_opening_3d(mask, -1)


# ----------------------------------------------------------------------------- heatmap


def test_heatmap_is_zero_for_confident_consistent_disjoint_case() -> None:
    probs = np.zeros((2, 3, *SHAPE), dtype=np.float32)
    probs[:, 0][:, _box(SHAPE, (0, 0, 0), (8, 8, 8))] = 1.0
    probs[:, 1][:, _box(SHAPE, (10, 10, 10), (20, 20, 20))] = 1.0
    maps = attention_maps(probs)
    assert maps.heatmap.dtype == np.float32
    assert not maps.heatmap.any()
    assert not maps.attention.any()
    assert case_priority(maps.attention) == 0.0


def test_heatmap_known_values_and_normalisation() -> None:
    probs = np.zeros((2, 1, *SHAPE), dtype=np.float64)
    flat = _box(SHAPE, (1, 1, 1), (8, 8, 8))  # both models at 0.5: U only
    split = _box(SHAPE, (12, 12, 12), (20, 20, 20))  # 0.9 vs 0.1: U and S
    probs[:, 0][:, flat] = 0.5
    probs[0, 0][split] = 0.9
    probs[1, 0][split] = 0.1
    maps = attention_maps(probs)
    u_flat = 0.5 * math.log(2.0)
    u_split = 0.5 * (-0.9 * math.log(0.9) - 0.1 * math.log(0.1))
    peak = u_split + 0.4
    h = maps.heatmap[0]
    assert h.max() == pytest.approx(1.0)
    assert np.allclose(h[split], 1.0)
    assert np.allclose(h[flat], u_flat / peak, rtol=1e-6)
    assert np.array_equal(h > 0, maps.attention[0])
    assert np.array_equal(maps.uncertainty_mask[0], flat | split)
    assert np.array_equal(maps.inconsistency_mask[0], split)


def test_heatmap_ignores_sub_threshold_noise_and_speckle() -> None:
    rng = np.random.default_rng(2)
    probs = np.zeros((2, 1, *SHAPE), dtype=np.float32)
    probs[:, 0] = rng.uniform(0.0, 0.005, size=(2, *SHAPE))  # U < 0.05 and S < 0.1 everywhere
    probs[0, 0, 5, 5, 5], probs[1, 0, 5, 5, 5] = 0.9, 0.1  # one isolated disagreeing voxel
    maps = attention_maps(probs)
    assert not maps.heatmap.any()
    assert not maps.attention.any()


def test_single_model_has_no_inconsistency() -> None:
    probs = np.full((1, 1, 8, 8, 8), 0.3, dtype=np.float32)
    maps = attention_maps(probs)
    assert not maps.inconsistency_mask.any()
    assert maps.uncertainty_mask.all()


def test_attention_maps_is_frozen_and_read_only() -> None:
    maps = attention_maps(_disagreement_case([((2, 2, 2), (8, 8, 8))]))
    assert isinstance(maps, AttentionMaps)
    assert maps.num_classes == 1
    with pytest.raises(ValueError):
        maps.heatmap[0, 0, 0, 0] = 1.0
    with pytest.raises(AttributeError):
        maps.heatmap = maps.heatmap  # type: ignore[misc]


def test_attention_maps_rejects_out_of_range_probabilities() -> None:
    with pytest.raises(ValueError):
        attention_maps(np.full((2, 1, 4, 4, 4), 1.5))
    with pytest.raises(ValueError):
        attention_maps(np.full((2, 1, 4, 4, 4), np.nan))
    with pytest.raises(ValueError):
        attention_maps(np.zeros((2, 4)))


# ----------------------------------------------------------------------------- priorities


def test_priority_grows_with_disagreement_size_and_count() -> None:
    none = attention_maps(_disagreement_case([]))
    small = attention_maps(_disagreement_case([((2, 2, 2), (8, 8, 8))]))
    large = attention_maps(_disagreement_case([((2, 2, 2), (12, 12, 12))]))
    two = attention_maps(_disagreement_case([((2, 2, 2), (8, 8, 8)), ((14, 14, 14), (20, 20, 20))]))
    scores = {
        "none": case_priority(none.attention),
        "small": case_priority(small.attention),
        "large": case_priority(large.attention),
        "two": case_priority(two.attention),
    }
    assert scores == {"none": 0.0, "small": 216.0, "large": 1000.0, "two": 432.0}
    assert rank_cases(scores) == ["large", "two", "small", "none"]


def test_priority_sums_target_classes_and_per_slice_divides() -> None:
    att = np.zeros((3, 4, 5, 10), dtype=bool)
    att[0, :2] = True  # 2*5*10 = 100
    att[1, 0, 0, :3] = True  # 3
    att[2] = True  # 200
    assert case_priority(att) == 303.0
    assert case_priority(att, target_classes=[0, 1]) == 103.0
    assert case_priority(att, target_classes=[0, 1], per_slice=True) == pytest.approx(10.3)
    assert case_priority(att, target_classes=[0, 1], per_slice=True, slice_axis=0) == pytest.approx(103 / 4)
    with pytest.raises(IndexError):
        case_priority(att, target_classes=[3])


def test_class_ranking_by_heatmap_sum() -> None:
    heat = np.zeros((4, 6, 6, 6), dtype=np.float32)
    heat[0, 0, 0, :2] = 1.0  # 2.0
    heat[1, :2, :2, :2] = 0.5  # 4.0
    heat[3, 0, 0, :4] = 0.5  # 2.0 (ties with class 0 -> lower index first)
    assert class_ranking(heat) == [1, 0, 3]
    assert class_ranking(heat, drop_zero=False) == [1, 0, 3, 2]
    assert class_ranking(heat, class_indices=[3, 2, 1]) == [1, 3]


def test_rank_cases_breaks_ties_by_id() -> None:
    assert rank_cases({"b": 1.0, "a": 1.0, "c": 2.0, "d": 0.0}) == ["c", "a", "b", "d"]
    assert rank_cases({}) == []
    with pytest.raises(ValueError):
        rank_cases({"a": float("nan")})


def test_select_top_fraction_rounding_and_min_count() -> None:
    thirty = {f"case{i:02d}": float(i) for i in range(30)}
    assert select_top_fraction(thirty, 0.1) == ["case29", "case28", "case27"]  # 3.0000000000000004 -> 3
    ten = {f"c{i}": float(i) for i in range(10)}
    assert len(select_top_fraction(ten, 0.25)) == 3  # 2.5 rounds half up
    assert len(select_top_fraction(ten, 0.05)) == 1  # 0.5 rounds half up
    assert len(select_top_fraction(ten, 0.04)) == 1  # 0.4 -> 0, raised to min_count
    assert select_top_fraction(ten, 0.04, min_count=0) == []
    assert len(select_top_fraction(ten, 0.0, min_count=3)) == 3
    assert len(select_top_fraction(ten, 0.5, min_count=50)) == 10  # capped at n
    assert select_top_fraction(ten, 1.0) == rank_cases(ten)
    assert select_top_fraction({}, 0.5) == []
    with pytest.raises(ValueError):
        select_top_fraction(ten, 1.5)


def test_attention_maps_realistic_size_runs_per_class() -> None:
    import time

    rng = np.random.default_rng(3)
    shape = (96, 96, 64)
    n_classes = 6
    probs = np.zeros((2, n_classes, *shape), dtype=np.float32)
    for c in range(n_classes):
        smooth = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4)
        base = 1.0 / (1.0 + np.exp(-smooth * 60.0))
        probs[0, c] = base
        probs[1, c] = np.clip(base + 0.3 * (np.roll(smooth, 3, axis=0) > 0.05), 0.0, 1.0)
    t0 = time.perf_counter()
    maps = attention_maps(probs)
    elapsed = time.perf_counter() - t0
    assert maps.heatmap.shape == (n_classes, *shape)
    assert maps.attention.any()
    assert np.array_equal(maps.heatmap > 0, maps.attention)
    assert float(maps.heatmap.max()) == pytest.approx(1.0)
    assert elapsed < 30.0
