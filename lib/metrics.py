"""Segmentation evaluation metrics: volumetric Dice and normalised surface Dice.

Pure functions over numpy masks so the evaluation command and the demo report the same numbers.
Masks are interpreted as ``mask != 0`` (booleans, 0/1 integers or 0/1 floats all work); pass
thresholded masks, not probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["dice", "per_class_scores", "surface_dice", "surface_voxels"]


def _as_mask(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(bool, copy=False)


def _check_same_shape(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary masks.

    Both empty scores 1.0 (nothing to find, nothing found) so that absent organs do not drag a
    class mean down; exactly one empty scores 0.0.
    """
    p, t = _as_mask(pred), _as_mask(truth)
    _check_same_shape(p, t)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & t)) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its face-connected erosion.

    Outside the array counts as background, so a mask touching the volume edge has its edge
    voxels on the surface (the organ is cut there, and that cut is part of what was drawn).
    """
    m = _as_mask(mask)
    if not m.any():
        return np.zeros_like(m)
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def _union_bbox(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of ``a | b``; both are assumed non-empty."""
    union = a | b
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other))
        slices.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(slices)


def surface_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at ``tolerance_mm``.

    The fraction of both boundaries lying within the tolerance of the other boundary; it rewards
    contours a reviewer would not need to redraw, which volumetric Dice does not.  Boundaries are
    counted in voxels (not surfel areas as in DeepMind's reference code), distances are Euclidean
    in millimetres with per-axis ``spacing_mm``, and "within" means ``distance <= tolerance_mm``.
    Both empty -> 1.0; exactly one empty -> 0.0.

    Work is confined to the bounding box of ``pred | truth``: every boundary voxel of either mask
    lies inside it, so the nearest-boundary distances computed there are exact and no margin is
    needed; everything outside is background, which the erosion's border value already assumes.
    """
    p, t = _as_mask(pred), _as_mask(truth)
    _check_same_shape(p, t)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing_mm has {len(spacing)} entries for a {p.ndim}-D mask")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive and finite, got {spacing}")
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")

    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 1.0
    if not p_any or not t_any:
        return 0.0

    box = _union_bbox(p, t)
    p_surf, t_surf = surface_voxels(p[box]), surface_voxels(t[box])
    # Distance from every voxel to the nearest boundary voxel of the *other* mask.
    dist_to_t = ndimage.distance_transform_edt(~t_surf, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~p_surf, sampling=spacing)
    p_close = int(np.count_nonzero(dist_to_t[p_surf] <= tolerance_mm))
    t_close = int(np.count_nonzero(dist_to_p[t_surf] <= tolerance_mm))
    return (p_close + t_close) / (int(np.count_nonzero(p_surf)) + int(np.count_nonzero(t_surf)))


def per_class_scores(
    pred_multi: np.ndarray,
    truth_multi: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    classes: Sequence[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice and surface Dice for each channel of ``[K, ...]`` one-hot masks.

    Voxel counts are returned alongside the scores so a reader can tell a 1.0 from "both empty"
    apart from a genuine hit.  ``classes`` selects channel indices (default: all ``K``).
    """
    pred = np.asarray(pred_multi)
    truth = np.asarray(truth_multi)
    _check_same_shape(pred, truth)
    if pred.ndim < 2:
        raise ValueError(f"expected [K, ...] masks, got shape {pred.shape}")
    selected = range(pred.shape[0]) if classes is None else classes
    scores: dict[int, dict[str, float]] = {}
    for c in selected:
        k = int(c)
        if not 0 <= k < pred.shape[0]:
            raise IndexError(f"class {k} out of range for {pred.shape[0]} channels")
        p, t = _as_mask(pred[k]), _as_mask(truth[k])
        scores[k] = {
            "dice": dice(p, t),
            "surface_dice": surface_dice(p, t, spacing_mm, tolerance_mm),
            "truth_voxels": int(np.count_nonzero(t)),
            "pred_voxels": int(np.count_nonzero(p)),
        }
    return scores
