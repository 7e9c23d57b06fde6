"""The MONAI Label app's settings, parsed once from ``--conf key value`` strings.

CPU defaults are coarse (3 mm, 64^3 windows, 0.25 overlap) so a CT segments in seconds on a laptop;
the paper's settings (1.5 mm, 96^3, 0.5) are one ``--conf`` away for GPU servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.classes import SEED_REVISED_CLASSES, class_indices, parse_class_list
from lib.inference import InferenceConfig
from lib.paths import runs_dir
from lib.transforms import CTPipelineConfig
from model.universal import canonical_backbone


def _floats(text: str, count: int = 3) -> tuple[float, ...]:
    values = tuple(float(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    return values * count if len(values) == 1 else values


def _bool(text: str) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AppConfig:
    models: tuple[str, ...] = ("unet",)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.25
    device: str = "auto"
    model_dir: Path = field(default_factory=lambda: runs_dir() / "models")
    runs: Path = field(default_factory=lambda: runs_dir() / "app")
    width: float = 1.0  # backbone width for full training from scratch in the app
    train_epochs: int = 20
    train_processes: int = 2  # torchrun processes on CPU (GPUs: one per visible device)
    replay_fraction: float = 0.1
    revision_min_voxels: int = 1
    max_upload_mb: float = 512.0
    forgetting_margin: float = 0.01
    attention_classes: tuple[int, ...] = class_indices(SEED_REVISED_CLASSES)

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> AppConfig:
        """Read MONAI Label's string conf; unknown keys are ignored (MONAI Label adds its own)."""
        d = cls()
        get = conf.get
        models = tuple(canonical_backbone(m) for m in str(get("models", ",".join(d.models))).split(",") if m.strip())
        if not models:
            raise ValueError("conf 'models' must name unet, swin_unetr or both")
        return cls(
            models=models,
            spacing=_floats(get("spacing", d.spacing[0])),  # type: ignore[arg-type]
            roi_size=tuple(int(v) for v in _floats(get("roi_size", d.roi_size[0]))),  # type: ignore[arg-type]
            overlap=float(get("overlap", d.overlap)),
            device=str(get("device", d.device)),
            model_dir=Path(get("model_dir", d.model_dir)),
            runs=Path(get("runs_dir", d.runs)),
            width=float(get("width", d.width)),
            train_epochs=int(get("train_epochs", d.train_epochs)),
            train_processes=int(get("train_processes", d.train_processes)),
            replay_fraction=float(get("replay_fraction", d.replay_fraction)),
            revision_min_voxels=int(get("revision_min_voxels", d.revision_min_voxels)),
            max_upload_mb=float(get("max_upload_mb", d.max_upload_mb)),
            forgetting_margin=float(get("forgetting_margin", d.forgetting_margin)),
            attention_classes=parse_class_list(get("attention_classes", ",".join(SEED_REVISED_CLASSES))),
        )

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def pipeline(self) -> CTPipelineConfig:
        return CTPipelineConfig(spacing=self.spacing)

    def inference(self) -> InferenceConfig:
        return InferenceConfig(roi_size=self.roi_size, overlap=self.overlap, device=self.torch_device)
