"""What a training run sees: which cases, which classes each one supervises, and the crops drawn from them."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset, list_data_collate
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandRotate90d,
    RandShiftIntensityd,
    SpatialPadd,
)

from lib.activelearning import select_top_fraction
from lib.activelearning.priorities import read_priorities
from lib.classes import NUM_CLASSES
from lib.datalists import CaseEntry
from lib.transforms import IMAGE_KEY, LABEL_KEY, CTPipelineConfig, ct_pipeline
from lib.volumes import read_header

log = logging.getLogger(__name__)

CLASS_MASK_KEY = "class_mask"


@dataclass(frozen=True)
class TrainingCase:
    """A case and the channels its label supervises in this run."""

    entry: CaseEntry
    supervised: tuple[int, ...]
    role: str  # "train" (full), "revised" or "replay" (continual)

    def as_sample(self) -> dict:
        mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        mask[list(self.supervised)] = True
        return {IMAGE_KEY: str(self.entry.image), LABEL_KEY: str(self.entry.label), CLASS_MASK_KEY: mask,
                "case_id": self.entry.case_id}


def full_training_cases(entries: Sequence[CaseEntry]) -> list[TrainingCase]:
    """Full training: every case supervises every class its label annotates."""
    return [TrainingCase(e, e.classes, "train") for e in entries]


def continual_training_cases(
    revised: Sequence[CaseEntry],
    replay_pool: Sequence[CaseEntry],
    trained_classes: Sequence[int],
    replay_fraction: float,
    priorities_path: str | None,
    seed: int,
) -> list[TrainingCase]:
    """Hybrid continual tuning: the revised cases plus the most important ``replay_fraction`` of old ones.

    Revised cases supervise the trained (revised) classes their expert label covers; replay cases
    supervise the same classes with their existing labels. Revised cases are never replayed twice.
    """
    trained = set(trained_classes)
    cases = [TrainingCase(e, tuple(sorted(trained & set(e.classes))), "revised") for e in revised]
    revised_ids = {e.case_id for e in revised}
    pool = {e.case_id: e for e in replay_pool if e.case_id not in revised_ids}
    if replay_fraction > 0 and pool:
        chosen = choose_replay(list(pool), replay_fraction, priorities_path, seed)
        cases += [TrainingCase(pool[c], tuple(sorted(trained & set(pool[c].classes))), "replay") for c in chosen]
    unsupervised = [c.entry.case_id for c in cases if not c.supervised]
    if unsupervised:
        log.warning("cases whose labels cover none of the trained classes (skipped): %s", unsupervised)
    return [c for c in cases if c.supervised]


def choose_replay(case_ids: Sequence[str], fraction: float, priorities_path: str | None, seed: int) -> list[str]:
    """Top ``fraction`` by attention priority; random (seeded) with a warning when no table is given."""
    if priorities_path:
        priorities = read_priorities(priorities_path)
        known = {c: priorities[c] for c in case_ids if c in priorities}
        missing = len(case_ids) - len(known)
        if missing:
            log.warning("%d replay candidates have no priority in %s; they rank last", missing, priorities_path)
        ranked = {c: known.get(c, float("-inf")) for c in case_ids}
        return select_top_fraction(ranked, fraction)
    log.warning("no priority table given: choosing %.0f%% of old cases at random for replay", 100 * fraction)
    count = min(len(case_ids), max(1, int(np.floor(fraction * len(case_ids) + 0.5))))
    return sorted(random.Random(seed).sample(sorted(case_ids), count))


def training_transforms(pipeline: CTPipelineConfig, roi_size: Sequence[int], num_samples: int) -> Compose:
    """The shared CT pipeline, then the seed's positive/negative crops and light augmentation.

    Flat (not nested) so CacheDataset can cache everything before the first random transform.
    """
    deterministic = ct_pipeline(pipeline, with_label=True).flatten().transforms
    keys = [IMAGE_KEY, LABEL_KEY]
    random_steps = [
        SpatialPadd(keys=keys, spatial_size=list(roi_size)),
        RandCropByPosNegLabeld(
            keys=keys, label_key=LABEL_KEY, image_key=IMAGE_KEY, image_threshold=0, spatial_size=list(roi_size),
            pos=1, neg=1, num_samples=num_samples, allow_smaller=False,
        ),
        RandRotate90d(keys=keys, prob=0.10, max_k=3),
        RandShiftIntensityd(keys=[IMAGE_KEY], offsets=0.10, prob=0.20),
    ]
    return Compose([*deterministic, *random_steps])


def estimated_case_bytes(entry: CaseEntry, spacing: Sequence[float]) -> int:
    """Rough size of one preprocessed case (float image + label) from its header, for the cache budget."""
    shape, affine = read_header(entry.image)
    source_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxels = float(np.prod([n * s / t for n, s, t in zip(shape, source_spacing, spacing, strict=True)]))
    return int(voxels * 8)


def cached_dataset(
    cases: Sequence[TrainingCase], transforms: Compose, spacing: Sequence[float], cache_gb: float
) -> CacheDataset:
    """Cache preprocessed volumes up to ``cache_gb`` (cache datasets are a classic out-of-memory cause)."""
    per_case = max(1, estimated_case_bytes(cases[0].entry, spacing)) if cases else 1
    rate = min(1.0, cache_gb * 1e9 / (per_case * max(1, len(cases))))
    if rate < 1.0:
        log.info("caching %.0f%% of %d cases (budget %.1f GB)", 100 * rate, len(cases), cache_gb)
    return CacheDataset(
        [c.as_sample() for c in cases], transform=transforms, cache_rate=rate, num_workers=0, progress=False,
        copy_cache=True,
    )


def draw_crops(dataset: CacheDataset, transforms: Compose, index: int, seed: int) -> dict:
    """One seeded draw of case ``index``'s random crops, collated into a batch as the training loader does.

    Seeding the transforms per draw makes the draw the same on every rank and after a resume.
    """
    transforms.set_random_state(seed=seed)
    item = dataset[index]
    return list_data_collate([item])
