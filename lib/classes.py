"""The one class template: the seed's 32 universal classes and maps from source label sets into it.

Everything in revseg (training, inference, Slicer colours, evaluation, revision diffs) speaks in these
classes. A label map on disk stores class ``k`` (0-based channel index) as the integer ``k + 1``;
0 is background. Source label sets (BTCV, TotalSegmentator) are mapped here, never elsewhere.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OrganClass:
    """One universal class: its model channel, label-map value, names and display colour."""

    index: int  # 0-based channel of the model output
    name: str  # snake_case identifier used in configs, CLIs and checkpoints
    display_name: str  # the seed's human-readable name
    color: tuple[int, int, int]  # RGB 0..255 for 3D Slicer

    @property
    def label_value(self) -> int:
        """Integer value of this class in a label map (0 is background)."""
        return self.index + 1


# Order, names and ids follow the seed (CLIP-Driven Universal Model ORGAN_NAME); do not reorder:
# checkpoints store controllers by this index.
_TEMPLATE: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("spleen", "Spleen", (157, 108, 162)),
    ("kidney_right", "Right Kidney", (185, 102, 83)),
    ("kidney_left", "Left Kidney", (205, 122, 103)),
    ("gallbladder", "Gall Bladder", (139, 150, 98)),
    ("esophagus", "Esophagus", (211, 171, 143)),
    ("liver", "Liver", (221, 130, 101)),
    ("stomach", "Stomach", (216, 132, 105)),
    ("aorta", "Aorta", (224, 97, 76)),
    ("postcava", "Postcava", (0, 151, 206)),
    ("portal_vein_and_splenic_vein", "Portal Vein and Splenic Vein", (0, 112, 165)),
    ("pancreas", "Pancreas", (249, 180, 111)),
    ("adrenal_gland_right", "Right Adrenal Gland", (244, 214, 49)),
    ("adrenal_gland_left", "Left Adrenal Gland", (214, 184, 19)),
    ("duodenum", "Duodenum", (255, 253, 229)),
    ("hepatic_vessel", "Hepatic Vessel", (0, 130, 200)),
    ("lung_right", "Right Lung", (197, 165, 145)),
    ("lung_left", "Left Lung", (172, 138, 115)),
    ("colon", "Colon", (204, 168, 143)),
    ("intestine", "Intestine", (255, 200, 170)),
    ("rectum", "Rectum", (190, 140, 120)),
    ("bladder", "Bladder", (222, 154, 132)),
    ("prostate", "Prostate", (230, 158, 140)),
    ("femur_left", "Left Head of Femur", (241, 214, 145)),
    ("femur_right", "Right Head of Femur", (221, 194, 125)),
    ("celiac_trunk", "Celiac Trunk", (255, 60, 60)),
    ("kidney_tumor", "Kidney Tumor", (255, 0, 120)),
    ("liver_tumor", "Liver Tumor", (200, 0, 200)),
    ("pancreas_tumor", "Pancreas Tumor", (150, 0, 255)),
    ("hepatic_vessel_tumor", "Hepatic Vessel Tumor", (90, 0, 200)),
    ("lung_tumor", "Lung Tumor", (255, 120, 0)),
    ("colon_tumor", "Colon Tumor", (120, 60, 0)),
    ("kidney_cyst", "Kidney Cyst", (120, 220, 255)),
)

UNIVERSAL_CLASSES: tuple[OrganClass, ...] = tuple(
    OrganClass(index=i, name=name, display_name=display, color=color)
    for i, (name, display, color) in enumerate(_TEMPLATE)
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in UNIVERSAL_CLASSES)
NUM_CLASSES = len(UNIVERSAL_CLASSES)
MAX_LABEL_VALUE = NUM_CLASSES

# The seed's revised classes (0-based 3, 6, 7, 8) and its default round-2 targets.
SEED_REVISED_CLASSES: tuple[str, ...] = ("gallbladder", "stomach", "aorta", "postcava")

# Spellings users bring from the seed, BTCV and TotalSegmentator.
_ALIASES: dict[str, str] = {
    "gall_bladder": "gallbladder",
    "arota": "aorta",
    "inferior_vena_cava": "postcava",
    "ivc": "postcava",
    "celiac_truck": "celiac_trunk",
    "urinary_bladder": "bladder",
    "small_bowel": "intestine",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


_LOOKUP: dict[str, int] = {}
for _cls in UNIVERSAL_CLASSES:
    _LOOKUP[_normalise(_cls.name)] = _cls.index
    _LOOKUP[_normalise(_cls.display_name)] = _cls.index
for _alias, _target in _ALIASES.items():
    _LOOKUP[_alias] = CLASS_NAMES.index(_target)


class UnknownClassError(ValueError):
    """A class name that is not in the universal template."""


def class_index(name: str | int) -> int:
    """0-based channel of a class given by name (any common spelling) or by index."""
    if isinstance(name, int | np.integer):
        if 0 <= int(name) < NUM_CLASSES:
            return int(name)
        raise UnknownClassError(f"class index {name} is outside 0..{NUM_CLASSES - 1}")
    key = _normalise(name)
    if key not in _LOOKUP:
        raise UnknownClassError(f"unknown class {name!r}; valid names: {', '.join(CLASS_NAMES)}")
    return _LOOKUP[key]


def class_indices(names: Iterable[str | int]) -> tuple[int, ...]:
    """Sorted, de-duplicated channels for class names; 'all' selects every class."""
    names = list(names)
    if any(isinstance(n, str) and _normalise(n) == "all" for n in names):
        return tuple(range(NUM_CLASSES))
    return tuple(sorted({class_index(n) for n in names}))


def parse_class_list(spec: str | Iterable[str] | None) -> tuple[int, ...]:
    """Classes from a comma-separated CLI/conf string ('aorta,postcava'), a list, or None (none)."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return class_indices(item for item in items if str(item).strip())


def slicer_label_names() -> dict[str, int]:
    """{display name: label value}, the form MONAI Label's infer tasks publish to 3D Slicer."""
    return {c.name: c.label_value for c in UNIVERSAL_CLASSES}


# ----------------------------------------------------------------------------------------------
# Source label sets
# ----------------------------------------------------------------------------------------------

# BTCV (Multi-Atlas Labeling Beyond the Cranial Vault): 13 organs, ids 1..13 in template order.
BTCV_TO_UNIVERSAL: dict[int, int] = {v: v for v in range(1, 14)}

# TotalSegmentator structure name -> universal class name. Structures not listed (bones, muscles,
# heart, ...) become background. Lobes merge into lungs; both kidney cysts into kidney_cyst.
# femur_* is TotalSegmentator's whole proximal femur, the template's "head of femur".
TOTALSEG_NAME_TO_UNIVERSAL: dict[str, str] = {
    "spleen": "spleen",
    "kidney_right": "kidney_right",
    "kidney_left": "kidney_left",
    "gallbladder": "gallbladder",
    "esophagus": "esophagus",
    "liver": "liver",
    "stomach": "stomach",
    "aorta": "aorta",
    "inferior_vena_cava": "postcava",
    "portal_vein_and_splenic_vein": "portal_vein_and_splenic_vein",
    "pancreas": "pancreas",
    "adrenal_gland_right": "adrenal_gland_right",
    "adrenal_gland_left": "adrenal_gland_left",
    "duodenum": "duodenum",
    "lung_upper_lobe_right": "lung_right",
    "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
    "lung_upper_lobe_left": "lung_left",
    "lung_lower_lobe_left": "lung_left",
    "colon": "colon",
    "small_bowel": "intestine",
    "urinary_bladder": "bladder",
    "prostate": "prostate",
    "femur_left": "femur_left",
    "femur_right": "femur_right",
    "kidney_cyst_left": "kidney_cyst",
    "kidney_cyst_right": "kidney_cyst",
}


def read_totalseg_class_map(map_to_binary_py: str | Path, task: str = "total") -> dict[int, str]:
    """TotalSegmentator's own ``class_map[task]`` read from its map_to_binary.py without importing it.

    Importing the package would pull in its heavy dependencies; the dict is a literal, so parse it.
    """
    source = Path(map_to_binary_py).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets
        ):
            class_map = ast.literal_eval(node.value)
            if task not in class_map:
                raise KeyError(f"{map_to_binary_py}: class_map has no task {task!r}")
            return {int(k): str(v) for k, v in class_map[task].items()}
    raise ValueError(f"{map_to_binary_py}: no literal 'class_map = {{...}}' assignment found")


def totalseg_to_universal(ts_class_map: Mapping[int, str]) -> dict[int, int]:
    """Source id -> universal label value (0 = background) for every TotalSegmentator id."""
    return {
        ts_id: (class_index(TOTALSEG_NAME_TO_UNIVERSAL[name]) + 1 if name in TOTALSEG_NAME_TO_UNIVERSAL else 0)
        for ts_id, name in ts_class_map.items()
    }


def covered_classes(source_to_universal: Mapping[int, int]) -> tuple[int, ...]:
    """Universal channels a source label set annotates: the partial-label mask of its cases."""
    return tuple(sorted({v - 1 for v in source_to_universal.values() if v > 0}))


class LabelValueError(ValueError):
    """A label map holds values its label set does not define."""


def map_label_values(label: np.ndarray, source_to_universal: Mapping[int, int], source: str = "label") -> np.ndarray:
    """Relabel a source label map into universal label values through a lookup table.

    Values absent from the source map are an error (they mean the wrong label set), not background.
    """
    values = np.unique(label)
    if values.size and (values.min() < 0 or not np.allclose(values, np.round(values))):
        raise LabelValueError(f"{source}: label values must be non-negative integers, got {values[:8]}")
    unknown = sorted(int(v) for v in values if int(v) != 0 and int(v) not in source_to_universal)
    if unknown:
        raise LabelValueError(f"{source}: label values {unknown[:10]} are not in the source label map")
    lut = np.zeros(int(max(values.max(initial=0), max(source_to_universal, default=0))) + 1, dtype=np.uint8)
    for src, dst in source_to_universal.items():
        lut[src] = dst
    return lut[label.astype(np.int64)]


def check_universal_label_values(label: np.ndarray, source: str = "label") -> None:
    """Raise LabelValueError naming ``source`` if values fall outside 0..NUM_CLASSES."""
    if not np.isfinite(label).all():
        raise LabelValueError(f"{source}: label holds NaN or Inf values")
    values = np.unique(label)
    bad = [v for v in values.tolist() if v < 0 or v > MAX_LABEL_VALUE or float(v) != int(v)]
    if bad:
        raise LabelValueError(
            f"{source}: label values {bad[:10]} are outside the class template (0..{MAX_LABEL_VALUE})"
        )
