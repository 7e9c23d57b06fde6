"""The attention map of an image, for display over the CT in 3D Slicer: where an expert should look."""

from __future__ import annotations

import time
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.activelearning.score import attention_on_original, score_case
from lib.app_config import AppConfig
from lib.classes import CLASS_NAMES, slicer_label_names
from lib.infers.segmentation import label_info, write_temp_label
from lib.model_store import ModelNotReady, ModelStore
from lib.transforms import ct_pipeline


class AttentionInfer(InferTask):
    """Labels = each target class's attention region (uncertain, inconsistent or overlapping voxels)."""

    def __init__(self, backbones: tuple[str, ...], store: ModelStore, config: AppConfig):
        self.backbones, self.store, self.app_config = backbones, store, config
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=slicer_label_names(), dimension=3,
            description="Attention map: where the models are uncertain, disagree, or organs overlap",
        )

    def info(self) -> dict[str, Any]:
        return super().info() | label_info()

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        models = self.store.published_models(self.backbones, self.app_config.torch_device)
        if not models:
            raise ModelNotReady(f"no model is published yet for {', '.join(self.backbones)}: train one first")
        pipeline = ct_pipeline(self.app_config.pipeline())
        sample = pipeline({"image": request["image"]})
        score = score_case(models, sample, self.app_config.inference(), self.app_config.attention_classes)
        attention = attention_on_original(score, sample, pipeline)
        path = write_temp_label(attention[0].numpy(), attention.affine.numpy(), "revseg attention")
        return path, {
            "label_names": self.labels, "priority": score.priority,
            "ranked_classes": [CLASS_NAMES[c] for c in score.ranked_classes],
            "ensemble_size": score.ensemble_size, "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
