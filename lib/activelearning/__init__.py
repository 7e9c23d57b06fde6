"""Active-learning maths: which voxels, classes and cases an annotator should review first."""

from lib.activelearning.attention import (
    DEFAULT_INCONSISTENCY_THRESHOLD,
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_OPENING_ITERATIONS,
    DEFAULT_UNCERTAINTY_THRESHOLD,
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
