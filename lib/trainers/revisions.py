"""Revision diffs: which classes an expert changed, comparing their final label with the AI's prediction.

Pure functions over label maps; the MONAI Label datastore records the result in the label's info and
the train task tunes the union of revised classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from lib.classes import CLASS_NAMES, NUM_CLASSES


@dataclass(frozen=True)
class ClassChange:
    """How one class differs between the AI prediction and the expert's label (in voxels)."""

    ai_voxels: int
    expert_voxels: int
    added: int  # voxels the expert added to the class
    removed: int  # voxels the expert removed from it

    @property
    def changed(self) -> int:
        return self.added + self.removed

    @property
    def dice_ai_vs_expert(self) -> float:
        total = self.ai_voxels + self.expert_voxels
        return 1.0 if total == 0 else 2.0 * (self.ai_voxels - self.removed) / total


def class_changes(ai_label: np.ndarray, expert_label: np.ndarray) -> dict[str, ClassChange]:
    """Per-class change for every class present in either label map (values = class index + 1)."""
    if ai_label.shape != expert_label.shape:
        raise ValueError(f"label shapes differ: AI {ai_label.shape} vs expert {expert_label.shape}")
    ai, expert = ai_label.astype(np.int64).ravel(), expert_label.astype(np.int64).ravel()
    size = NUM_CLASSES + 1
    joint = np.bincount(ai * size + expert, minlength=size * size).reshape(size, size)  # [ai value, expert value]
    changes = {}
    for value in range(1, size):
        ai_voxels, expert_voxels, kept = int(joint[value].sum()), int(joint[:, value].sum()), int(joint[value, value])
        if ai_voxels or expert_voxels:
            changes[CLASS_NAMES[value - 1]] = ClassChange(
                ai_voxels=ai_voxels, expert_voxels=expert_voxels, added=expert_voxels - kept, removed=ai_voxels - kept
            )
    return changes


def revised_classes(changes: Mapping[str, ClassChange], min_changed_voxels: int = 1) -> list[str]:
    """Classes the expert changed by at least ``min_changed_voxels``, in template order."""
    return [name for name in CLASS_NAMES if name in changes and changes[name].changed >= min_changed_voxels]


def revision_record(ai_label: np.ndarray, expert_label: np.ndarray, min_changed_voxels: int = 1) -> dict:
    """JSON-ready summary stored with the expert's label: revised classes and each class's change."""
    changes = class_changes(ai_label, expert_label)
    return {
        "revised_classes": revised_classes(changes, min_changed_voxels),
        "changes": {
            name: asdict(change) | {"dice_ai_vs_expert": round(change.dice_ai_vs_expert, 4)}
            for name, change in changes.items()
            if change.changed
        },
        "min_changed_voxels": min_changed_voxels,
    }


def union_of_revised(records: Iterable[Mapping]) -> list[str]:
    """The classes any record revised, in template order."""
    seen = {name for record in records for name in record.get("revised_classes", [])}
    return [name for name in CLASS_NAMES if name in seen]
