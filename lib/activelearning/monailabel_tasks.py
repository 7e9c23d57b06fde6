"""MONAI Label adapters for attention-based active learning: a ScoringMethod and a Strategy.

The maths lives in lib.activelearning.attention/score; these classes only read and write the
datastore. Scores are stored in each image's info under ``attention`` together with the published
model versions and the image's file stamp, so unchanged images are never rescored.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.attention import rank_cases
from lib.activelearning.score import file_stamp, score_case
from lib.app_config import AppConfig
from lib.classes import CLASS_NAMES
from lib.model_store import ModelStore
from lib.transforms import CTInputError, ct_pipeline

log = logging.getLogger(__name__)

INFO_KEY = "attention"


class AttentionScoring(ScoringMethod):
    """Priority of every image without a final label, from the published models' attention maps."""

    def __init__(self, backbones: tuple[str, ...], store: ModelStore, config: AppConfig):
        super().__init__("Attention priority (uncertainty + inconsistency + overlap) of unrevised images")
        self.backbones, self.store, self.app_config = backbones, store, config

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        models = self.store.published_models(self.backbones, self.app_config.torch_device)
        if not models:
            return {"scored": 0, "skipped": 0, "failed": {}, "reason": "no published model yet"}
        stamp = self.store.stamp(self.backbones)
        pipeline = ct_pipeline(self.app_config.pipeline())
        scored, skipped, failed = 0, 0, {}
        for image_id in datastore.get_unlabeled_images():
            path = datastore.get_image_uri(image_id)
            previous = datastore.get_image_info(image_id).get(INFO_KEY) or {}
            image_stamp = file_stamp(path)
            if previous.get("models") == stamp and previous.get("image") == image_stamp:
                skipped += 1
                continue
            try:
                score = score_case(models, pipeline({"image": path}), self.app_config.inference(),
                                   self.app_config.attention_classes, case_id=image_id)
            except CTInputError as error:
                failed[image_id] = str(error)
                log.warning("attention scoring skipped %s: %s", image_id, error)
                continue
            datastore.update_image_info(image_id, {INFO_KEY: {
                "priority": score.priority, "ranked_classes": [CLASS_NAMES[c] for c in score.ranked_classes],
                "models": stamp, "image": image_stamp}})
            scored += 1
        log.info("attention scoring: %d scored, %d unchanged, %d failed", scored, skipped, len(failed))
        return {"scored": scored, "skipped": skipped, "failed": failed}


class AttentionStrategy(Strategy):
    """Next image for revision: the unrevised image with the highest attention priority.

    Scores come from the ``attention`` scoring method, which MONAI Label runs in the background at
    start-up and after every request for a sample; the strategy itself only reads them, so asking
    for the next case stays instant however many studies there are.
    """

    def __init__(self):
        super().__init__("Highest attention priority among images without an expert (final) label")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        candidates = datastore.get_unlabeled_images()
        if not candidates:
            return {}
        infos = {i: datastore.get_image_info(i).get(INFO_KEY) or {} for i in candidates}
        priorities = {i: float(info["priority"]) for i, info in infos.items() if "priority" in info}
        if not priorities:
            log.warning("no attention scores yet (scoring still running, or no model); offering the first image")
            return {"id": sorted(candidates)[0], "strategy": "attention (no scores yet: first)"}
        best = rank_cases(priorities)[0]
        return {"id": best, "priority": priorities[best], "ranked_classes": infos[best].get("ranked_classes", [])}
