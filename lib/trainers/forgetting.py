"""Forgetting guard: a round may not replace the published model if classes nobody revised got worse.

Every round that would replace a published model is checked: the classes nobody revised are scored
(per-class Dice, as in evaluation) on the experts' final labels, with the published model and with the
candidate. In continual tuning those classes' heads are frozen, so their masks are bit-identical by
construction and the guard passes with drops of exactly 0; it is the safety net for everything else: a
full retraining, a changed recipe, a class the new model no longer predicts (scored as Dice 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib.datalists import CaseEntry
from lib.evaluate import evaluate_cases, summarise
from lib.inference import InferenceConfig, Predictor
from lib.transforms import CTPipelineConfig


def class_dice(predictor: Predictor, entries: Sequence[CaseEntry], classes: Sequence[int]) -> dict[str, float]:
    rows = evaluate_cases(predictor, entries, tolerance_mm=2.0, classes=list(classes))
    return {row["class"]: float(row["mean_dice"]) for row in summarise(rows) if row["class"] != "mean"}


def dice_drops(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Dice lost per class scored before (positive = worse); a class no longer predicted falls to 0."""
    return {name: before[name] - after.get(name, 0.0) for name in before}


def forgetting_guard(
    previous: Path, candidate: Path, entries: Sequence[CaseEntry], guarded: Sequence[int], margin: float,
    pipeline: CTPipelineConfig, inference: InferenceConfig,
) -> dict[str, Any]:
    """Compare the guarded classes' Dice of two checkpoints on ``entries``; ``passed`` is False on a drop."""
    if not entries or not guarded:
        return {"passed": True, "checked": False, "reason": "no validation cases or no guarded classes"}
    before = class_dice(Predictor.from_checkpoint(previous, pipeline, inference), entries, guarded)
    after = class_dice(Predictor.from_checkpoint(candidate, pipeline, inference), entries, guarded)
    drops = dice_drops(before, after)
    worst = max(drops, key=drops.get) if drops else None  # type: ignore[arg-type]
    failed = {name: round(drop, 4) for name, drop in drops.items() if drop > margin}
    return {
        "passed": not failed, "checked": True, "margin": margin, "cases": len(entries),
        "dice_before": before, "dice_after": after, "worst_class": worst,
        "worst_drop": round(drops[worst], 4) if worst else 0.0, "failed_classes": failed,
    }
