"""AbdomenAtlas-8K attention maps: where should an annotator look, and which cases first?

Reimplements the published recipe (Qu et al., NeurIPS 2023, ``create_attention.py`` /
``utils.entropy_post_process`` / ``utils.std_post_process`` in MrGiovanni/AbdomenAtlas) as pure
numpy functions.  For each class ``c`` with per-model probabilities ``p_m`` (``m`` over an
ensemble, or over test-time flips of one model):

* uncertainty   ``U = mean_m(-p_m ln p_m)``, binarised at ``U > 0.05``;
* inconsistency ``S = std_m(p_m)`` (population std), binarised at ``S > 0.1``;
* overlap       ``O`` = voxels where the class's mean-probability mask (``mean_m p_m > 0.5``)
  meets another class's mask;
* the U and S maps are cleaned by a binary opening (erode twice, dilate twice) with the full
  3x3x3 structuring element (26-connectivity, ``generate_binary_structure(3, 3)``, as published),
  i.e. an opening by a 5x5x5 cube: isolated voxels and structures thinner than 5 voxels vanish;
* heatmap ``= (U*U_b + S*S_b + O_b) / max`` over the class volume (0 where the max is 0), so the
  continuous values only count where their binary map survived the opening, exactly as published;
  binary attention ``= U_b | S_b | O_b``.

A case's priority is its attention voxel count summed over target classes; classes inside a case
are ranked by heatmap sum.  Work is done one class at a time so peak memory stays a few volumes
above the caller's probability array.

The overlap map is *not* opened by default, matching the published script: overlaps between
neighbouring organs are mostly slivers a few voxels thick, which a 5x5x5 opening would erase.
Pass ``overlap_opening_iterations=2`` to open it like the other two maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

__all__ = [
    "DEFAULT_INCONSISTENCY_THRESHOLD",
    "DEFAULT_MASK_THRESHOLD",
    "DEFAULT_OPENING_ITERATIONS",
    "DEFAULT_UNCERTAINTY_THRESHOLD",
    "AttentionMaps",
    "attention_maps",
    "binary_opening_3d",
    "case_priority",
    "class_ranking",
    "inconsistency",
    "mean_mask",
    "overlap",
    "rank_cases",
    "select_top_fraction",
    "uncertainty",
]

DEFAULT_UNCERTAINTY_THRESHOLD = 0.05
DEFAULT_INCONSISTENCY_THRESHOLD = 0.1
DEFAULT_MASK_THRESHOLD = 0.5
DEFAULT_OPENING_ITERATIONS = 2


def _as_float(probs: np.ndarray) -> np.ndarray:
    """Float view of ``probs``: float32/64 as given, float16 widened to float32, others to float64."""
    p = np.asarray(probs)
    if p.dtype == np.float16:
        p = p.astype(np.float32)
    elif not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if p.ndim < 1 or p.shape[0] < 1:
        raise ValueError(f"expected a leading model axis with at least one model, got shape {p.shape}")
    return p


def uncertainty(probs: np.ndarray) -> np.ndarray:
    """Mean over models (axis 0) of ``-p ln p``; p = 0 contributes 0 (via ``xlogy``).

    This is the foreground term of the binary entropy, as published: it is 0.5 ln 2 at p = 0.5
    and peaks at p = 1/e with value 1/e.
    """
    p = _as_float(probs)
    return np.mean(-special.xlogy(p, p), axis=0)


def inconsistency(probs: np.ndarray) -> np.ndarray:
    """Population standard deviation (ddof=0) across models (axis 0).

    Computed on differences from the first model, which leaves the value unchanged but makes
    agreeing models give exactly 0 (the mean of identical floats can round off).
    """
    p = _as_float(probs)
    return np.std(p - p[:1], axis=0)


def mean_mask(probs: np.ndarray, threshold: float = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Ensemble segmentation ``mean_m p_m > threshold`` (axis 0 is the model axis)."""
    return np.mean(_as_float(probs), axis=0) > threshold


def _count_dtype(n: int) -> type[np.unsignedinteger]:
    return np.uint8 if n < 255 else np.uint16 if n < 65535 else np.uint32


def overlap(masks: np.ndarray, partner_classes: Sequence[int] | None = None) -> np.ndarray:
    """Per class, the voxels of its mask that also belong to at least one *other* partner class.

    ``masks`` is ``[C, ...]`` boolean.  ``partner_classes`` limits which classes count as
    "another class" (the paper uses a fixed organ list; default: all).  Do not include a
    background channel: it would overlap nothing by construction, or everything if soft.
    """
    m = np.asarray(masks).astype(bool, copy=False)
    if m.ndim < 2:
        raise ValueError(f"expected [C, ...] masks, got shape {m.shape}")
    partners = _check_classes(partner_classes, m.shape[0])
    count = np.zeros(m.shape[1:], dtype=_count_dtype(len(partners)))
    for k in partners:
        count += m[k]
    partner_set = set(partners)
    out = np.empty_like(m)
    for c in range(m.shape[0]):
        # A partner's own mask is in the count, so it needs a second class to overlap.
        out[c] = m[c] & (count >= (2 if c in partner_set else 1))
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a mask, or None when it is empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            return None
        slices.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(slices)


def binary_opening_3d(
    mask: np.ndarray,
    iterations: int = DEFAULT_OPENING_ITERATIONS,
    connectivity: int | None = None,
) -> np.ndarray:
    """Binary opening: ``iterations`` erosions then as many dilations, to drop speckle.

    The structuring element is ``generate_binary_structure(ndim, connectivity)`` applied
    iteratively; the default ``connectivity=ndim`` is the full 3x3x3 cube (26-connected) used by
    AbdomenAtlas, which iterated ``k`` times equals one ``(2k+1)``-cube, so it is computed with
    separable min/max filters.  ``connectivity=1`` gives the 6-connected cross.  Outside the array
    counts as background (scipy's ``border_value=0``).  The opening never grows a mask, so only
    its bounding box is processed; the result is identical to processing the whole volume.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    conn = m.ndim if connectivity is None else int(connectivity)
    if not 1 <= conn <= max(m.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{m.ndim}, got {connectivity}")
    if iterations == 0:
        return m.copy()
    out = np.zeros(m.shape, dtype=bool)
    box = _bbox(m)
    if box is None:
        return out
    crop = m[box]
    if conn == m.ndim:
        size = 2 * iterations + 1
        eroded = ndimage.minimum_filter(crop, size=size, mode="constant", cval=0)
        out[box] = ndimage.maximum_filter(eroded, size=size, mode="constant", cval=0)
    else:
        structure = ndimage.generate_binary_structure(m.ndim, conn)
        out[box] = ndimage.binary_opening(crop, structure=structure, iterations=iterations, border_value=0)
    return out


@dataclass(frozen=True, eq=False)
class AttentionMaps:
    """Per-class attention for one case; all arrays are ``[C, ...]`` and read-only.

    ``heatmap`` is float32 in [0, 1] and positive exactly where ``attention`` is true; the three
    ``*_mask`` fields are the opened component maps, kept so a viewer can say *why* a voxel is hot.
    """

    heatmap: np.ndarray
    attention: np.ndarray
    uncertainty_mask: np.ndarray
    inconsistency_mask: np.ndarray
    overlap_mask: np.ndarray

    def __post_init__(self) -> None:
        shape = self.heatmap.shape
        for name in ("attention", "uncertainty_mask", "inconsistency_mask", "overlap_mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != heatmap shape {shape}")
        for name in ("heatmap", "attention", "uncertainty_mask", "inconsistency_mask", "overlap_mask"):
            getattr(self, name).flags.writeable = False

    @property
    def num_classes(self) -> int:
        return int(self.heatmap.shape[0])


def _check_probability_range(p: np.ndarray, c: int) -> None:
    lo, hi = float(np.min(p)), float(np.max(p))
    if not (lo >= 0.0 and hi <= 1.0):  # also rejects NaN
        raise ValueError(f"class {c}: probabilities must lie in [0, 1], got range [{lo}, {hi}]")


def attention_maps(
    probs: np.ndarray,
    *,
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD,
    inconsistency_threshold: float = DEFAULT_INCONSISTENCY_THRESHOLD,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    opening_iterations: int = DEFAULT_OPENING_ITERATIONS,
    overlap_opening_iterations: int = 0,
    connectivity: int | None = None,
    overlap_classes: Sequence[int] | None = None,
) -> AttentionMaps:
    """Attention maps for all classes from ``probs`` of shape ``[M, C, *spatial]``.

    ``M`` is the ensemble (models, or test-time flips of one model; with ``M == 1`` the
    inconsistency term is identically 0).  ``opening_iterations`` applies to the U and S maps;
    ``overlap_opening_iterations`` (default 0, as published) to the overlap map.
    ``overlap_classes`` restricts which classes can overlap (see :func:`overlap`).
    """
    p_all = np.asarray(probs)
    if p_all.ndim < 3:
        raise ValueError(f"expected probs of shape [M, C, *spatial], got {p_all.shape}")
    n_models, n_classes = p_all.shape[:2]
    if n_models < 1 or n_classes < 1:
        raise ValueError(f"need at least one model and one class, got shape {p_all.shape}")
    spatial = p_all.shape[2:]

    masks = np.empty((n_classes, *spatial), dtype=bool)
    for c in range(n_classes):
        pc = _as_float(p_all[:, c])
        _check_probability_range(pc, c)
        masks[c] = mean_mask(pc, mask_threshold)
    overlap_raw = overlap(masks, overlap_classes)
    del masks

    heatmap = np.zeros((n_classes, *spatial), dtype=np.float32)
    u_masks = np.empty((n_classes, *spatial), dtype=bool)
    s_masks = np.empty_like(u_masks)
    o_masks = np.empty_like(u_masks)
    for c in range(n_classes):
        pc = _as_float(p_all[:, c])
        u = uncertainty(pc)
        u_masks[c] = binary_opening_3d(u > uncertainty_threshold, opening_iterations, connectivity)
        s = inconsistency(pc)
        s_masks[c] = binary_opening_3d(s > inconsistency_threshold, opening_iterations, connectivity)
        o_masks[c] = binary_opening_3d(overlap_raw[c], overlap_opening_iterations, connectivity)
        heat = np.where(u_masks[c], u, 0).astype(np.float32)
        heat += np.where(s_masks[c], s, 0).astype(np.float32)
        heat += o_masks[c]
        peak = float(heat.max())
        if peak > 0:
            heat /= peak
        heatmap[c] = heat
    return AttentionMaps(
        heatmap=heatmap,
        attention=u_masks | s_masks | o_masks,
        uncertainty_mask=u_masks,
        inconsistency_mask=s_masks,
        overlap_mask=o_masks,
    )


def _check_classes(classes: Sequence[int] | None, n_classes: int) -> list[int]:
    if classes is None:
        return list(range(n_classes))
    out = [int(c) for c in classes]
    for c in out:
        if not 0 <= c < n_classes:
            raise IndexError(f"class {c} out of range for {n_classes} classes")
    return out


def case_priority(
    attention: np.ndarray,
    target_classes: Sequence[int] | None = None,
    per_slice: bool = False,
    slice_axis: int = -1,
) -> float:
    """Annotation priority of one case: attention summed over ``target_classes`` of ``[C, ...]``.

    With the binary ``attention`` this is the published ``create_attention.py`` score (voxels
    counted once per class); passing the ``heatmap`` instead gives the ``calculate_attention.py``
    variant.  ``per_slice`` divides by the number of slices along ``slice_axis`` (an axis of the
    *spatial* dims, default the last, axial in RAS) so long scans are not favoured for length.
    """
    a = np.asarray(attention)
    if a.ndim < 2:
        raise ValueError(f"expected [C, ...] attention, got shape {a.shape}")
    total = 0.0
    for c in _check_classes(target_classes, a.shape[0]):
        total += float(np.sum(a[c], dtype=np.float64))
    if per_slice:
        total /= a.shape[1:][slice_axis]
    return total


def class_ranking(
    heatmap: np.ndarray,
    class_indices: Sequence[int] | None = None,
    drop_zero: bool = True,
) -> list[int]:
    """Classes of one case ordered by heatmap sum, hottest first (ties: lower index first).

    Classes with no attention are dropped by default, as in the published priority list: there
    is nothing to review in them.
    """
    h = np.asarray(heatmap)
    if h.ndim < 2:
        raise ValueError(f"expected [C, ...] heatmap, got shape {h.shape}")
    sums = {c: float(np.sum(h[c], dtype=np.float64)) for c in _check_classes(class_indices, h.shape[0])}
    ranked = sorted(sums, key=lambda c: (-sums[c], c))
    return [c for c in ranked if sums[c] > 0] if drop_zero else ranked


def rank_cases(priorities: Mapping[str, float]) -> list[str]:
    """Case ids by descending priority; equal priorities fall back to id order for determinism."""
    for case_id, value in priorities.items():
        if not math.isfinite(value):
            raise ValueError(f"priority of {case_id!r} is not finite: {value}")
    return sorted(priorities, key=lambda k: (-float(priorities[k]), k))


def select_top_fraction(priorities: Mapping[str, float], fraction: float, min_count: int = 1) -> list[str]:
    """The highest-priority ``fraction`` of cases (for replay), at least ``min_count`` of them.

    The count is ``fraction * n`` rounded half up (``floor(x + 0.5)``, not banker's rounding and
    not ``ceil``, which turns 0.1 * 30 = 3.0000000000000004 into 4), then raised to ``min_count``
    and capped at ``n``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    ranked = rank_cases(priorities)
    count = min(len(ranked), max(min_count, math.floor(fraction * len(ranked) + 0.5)))
    return ranked[:count]
