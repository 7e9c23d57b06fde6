"""Multi-label organ segmentation for 3D Slicer, served from the published model of one backbone."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.app_config import AppConfig
from lib.classes import CLASS_NAMES, UNIVERSAL_CLASSES, slicer_label_names
from lib.inference import Predictor
from lib.model_store import ModelStore
from lib.volumes import write_nifti

log = logging.getLogger(__name__)


def label_info() -> dict[str, Any]:
    """What /info publishes per model: label values by name and their display names and colours."""
    return {
        "label_colors": {c.name: list(c.color) for c in UNIVERSAL_CLASSES},
        "label_display_names": {c.name: c.display_name for c in UNIVERSAL_CLASSES},
    }


def write_temp_label(label_map: np.ndarray, affine: np.ndarray, description: str) -> str:
    """A label map NIfTI in a temp file MONAI Label sends back and then deletes."""
    fd, path = tempfile.mkstemp(suffix=".nii.gz")
    os.close(fd)
    write_nifti(path, label_map.astype(np.uint8), affine, description)
    return path


class UniversalSegmentation(InferTask):
    """One infer task per backbone: a MONAI Label facade over lib.inference.Predictor, the same code
    evaluation and training validation run, so Slicer sees exactly what the benchmarks measured."""

    def __init__(self, backbone: str, store: ModelStore, config: AppConfig):
        self.backbone, self.store, self.app_config = backbone, store, config
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=slicer_label_names(),
            dimension=3,
            description=f"Universal model ({backbone}): {len(CLASS_NAMES)} abdominal classes, multi-label",
        )

    def info(self) -> dict[str, Any]:
        return super().info() | label_info() | {"published": self.store.info(self.backbone)}

    def is_valid(self) -> bool:
        return True  # listed even before the first model is published; a request then gets a clear 409

    def predictor(self) -> tuple[dict[str, Any], Predictor]:
        """The published record and a Predictor for the same round."""
        return self.store.loaded(
            self.backbone, "predictor",
            lambda path: Predictor.from_checkpoint(
                path, self.app_config.pipeline(), self.app_config.inference(), backbone=self.backbone
            ),
        )

    def predict_label_file(self, image_path: str) -> str:
        """Predict and write the label map to a temp file (used to diff a revision on demand)."""
        return self._predict(image_path)[0]

    def _predict(self, image_path: str) -> tuple[str, np.ndarray, float, dict[str, Any]]:
        published, predictor = self.predictor()
        prediction = predictor.predict(image_path)
        label_map = prediction.label_map_original[0].numpy()
        path = write_temp_label(label_map, prediction.affine, f"revseg {self.backbone}")
        return path, label_map, prediction.seconds, published

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        path, label_map, seconds, published = self._predict(request["image"])
        present = sorted(int(v) for v in np.unique(label_map) if v)
        return path, {
            "label_names": self.labels,
            "model": self.backbone,
            "published": published,
            "classes_present": [CLASS_NAMES[v - 1] for v in present],
            "latencies": {"total": round(time.perf_counter() - start, 3), "predict": round(seconds, 3)},
        }
