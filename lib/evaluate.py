"""Evaluate a checkpoint on a labelled dataset list: Dice and surface Dice per case and class, on the original grid.

    python -m lib.evaluate --resume CKPT --backbone unet --dataset_list LIST --data_root_path ROOT \\
        --save_dir OUT [--store_result] [--space_x 1.5 --space_y 1.5 --space_z 1.5] [--roi_x 96 ...]
    python test.py ...      (the seed's spelling of the same command)

Each case is predicted with :class:`lib.inference.Predictor` and scored against its label file on the
label's own grid, for the classes its list line says the label annotates (intersected with ``--classes``).
Writes ``per_case.csv`` and ``summary.csv`` to ``--save_dir`` and, with ``--store_result``, each
prediction as ``predictions/{case}.nii.gz`` (a label map on the original grid with the original affine).
Unusable inputs (missing checkpoint, wrong backbone, bad dataset list) end with one ``error:`` line and
exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lib.classes import CLASS_NAMES, UnknownClassError, class_index, parse_class_list
from lib.datalists import CaseEntry, DatasetListError, read_dataset_list
from lib.inference import (
    DEFAULT_THRESHOLD,
    ClassSpec,
    InferenceConfig,
    Prediction,
    Predictor,
    normalise_thresholds,
    voxel_spacing,
)
from lib.metrics import per_class_scores
from lib.transforms import CTInputError, CTPipelineConfig
from lib.volumes import VolumeReadError, read_volume, write_nifti
from model.universal import canonical_backbone

PER_CASE_COLUMNS = ("case", "class", "dice", "surface_dice", "truth_voxels", "pred_voxels", "seconds")
SUMMARY_COLUMNS = ("class", "mean_dice", "mean_surface_dice", "n_cases")
MEAN_ROW = "mean"  # summary row averaging the class means
EXIT_USAGE = 2


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs, reported as one line naming what is wrong."""


# ----------------------------------------------------------------------------------------------
# Scoring (shared by the command, the demo and the tests)
# ----------------------------------------------------------------------------------------------


def scored_classes(
    annotated: Iterable[int], predicted: Iterable[int], requested: Iterable[int] | None = None
) -> tuple[int, ...]:
    """Classes a case is scored on: annotated by its label, predicted by the model and (if given) requested."""
    chosen = set(annotated) & set(predicted)
    if requested is not None:
        chosen &= set(requested)
    return tuple(sorted(chosen))


def _check_grid(
    label_path: Path, label_shape: tuple[int, ...], mask_shape: tuple[int, ...], label_affine: np.ndarray,
    affine: np.ndarray | None,
) -> None:
    """Refuse a prediction made on another grid than its label's."""
    if label_shape != mask_shape:
        raise EvaluationError(f"{label_path}: label shape {label_shape} differs from the prediction's {mask_shape}")
    if affine is not None and not np.allclose(label_affine, affine, atol=1e-3):
        difference = np.abs(label_affine - np.asarray(affine)).max()
        raise EvaluationError(f"{label_path}: label affine differs from the prediction's by {difference:.3g} mm")


def score_prediction(
    masks: np.ndarray | torch.Tensor,
    class_indices: Sequence[int],
    label_path: str | Path,
    classes: Sequence[int],
    tolerance_mm: float,
    affine: np.ndarray | None = None,
) -> dict[int, dict[str, float]]:
    """Score [K, ...] boolean masks (channel k is universal class ``class_indices[k]``) against a label file.

    Truth for class c is ``label == c + 1``; spacing comes from the label's affine. If ``affine`` is given
    it must match the label's, so a prediction on the wrong grid fails loudly instead of scoring garbage.
    Returns {class: {"dice", "surface_dice", "truth_voxels", "pred_voxels"}} for ``classes``.
    """
    label_path = Path(label_path)
    label, label_affine = read_volume(label_path)
    pred = np.asarray(masks).astype(bool, copy=False)
    _check_grid(label_path, tuple(label.shape), tuple(pred.shape[1:]), label_affine, affine)
    channel_of = {int(c): k for k, c in enumerate(class_indices)}
    unpredicted = [CLASS_NAMES[c] for c in classes if c not in channel_of]
    if unpredicted:
        raise EvaluationError(f"cannot score {unpredicted} against {label_path}: the prediction has no such channels")
    if not classes:
        return {}
    channels = [channel_of[c] for c in classes]
    truth = np.stack([label == c + 1 for c in classes])
    scores = per_class_scores(pred[channels], truth, voxel_spacing(label_affine), tolerance_mm)
    return {c: scores[i] for i, c in enumerate(classes)}


def store_prediction(prediction: Prediction, path: Path) -> Path:
    """Write the label map (universal values) on the original grid with the original affine."""
    return write_nifti(path, prediction.label_map_original[0].numpy(), prediction.affine, "revseg prediction")


def require_labels(entries: Iterable[CaseEntry]) -> None:
    """Refuse image-only entries before any time is spent predicting."""
    for entry in entries:
        if entry.label is None:
            raise EvaluationError(f"{entry.where}: {entry.image} has no label to evaluate against")


def evaluate_case(
    predictor: Predictor,
    entry: CaseEntry,
    tolerance_mm: float,
    requested: Iterable[int] | None = None,
    store_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Predict one case, optionally store it, and return one row per scored class."""
    require_labels([entry])
    prediction = predictor.predict(entry.image)
    if store_dir is not None:
        store_prediction(prediction, Path(store_dir) / f"{entry.case_id}.nii.gz")
    classes = scored_classes(entry.classes, prediction.class_indices, requested)
    scores = score_prediction(
        prediction.masks_original, prediction.class_indices, entry.label, classes, tolerance_mm, prediction.affine
    )
    return [
        {"case": entry.case_id, "class": CLASS_NAMES[c], **score, "seconds": prediction.seconds}
        for c, score in scores.items()
    ]


def evaluate_cases(
    predictor: Predictor,
    entries: Sequence[CaseEntry],
    tolerance_mm: float,
    classes: Iterable[ClassSpec] | str | None = None,
    store_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every entry (with a progress bar and ETA); rows have the columns of ``per_case.csv``.

    ``classes`` (names or universal indices) narrows the classes scored; ``store_dir`` receives
    ``{case_id}.nii.gz`` label maps.
    """
    require_labels(entries)
    requested = None if classes is None else parse_class_list(classes)
    store = None if store_dir is None else Path(store_dir)
    rows: list[dict[str, Any]] = []
    progress = tqdm(entries, desc="evaluate", unit="case")
    for entry in progress:
        case_rows = evaluate_case(predictor, entry, tolerance_mm, requested, store)
        rows += case_rows
        if case_rows:
            progress.set_postfix_str(f"{entry.case_id} dice {fmean(r['dice'] for r in case_rows):.3f}")
    return rows


def summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-class means in template order, then a ``mean`` row averaging the class means.

    The ``mean`` row's ``n_cases`` counts distinct cases. Empty input gives an empty summary.
    """
    rows = list(rows)
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(str(row["class"]), []).append(row)
    summary = [
        {
            "class": name,
            "mean_dice": fmean(float(r["dice"]) for r in group),
            "mean_surface_dice": fmean(float(r["surface_dice"]) for r in group),
            "n_cases": len(group),
        }
        for name, group in sorted(by_class.items(), key=lambda item: class_index(item[0]))
    ]
    if summary:
        summary.append({
            "class": MEAN_ROW,
            "mean_dice": fmean(s["mean_dice"] for s in summary),
            "mean_surface_dice": fmean(s["mean_surface_dice"] for s in summary),
            "n_cases": len({r["case"] for r in rows}),
        })
    return summary


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write rows (extra keys are an error, so a renamed column cannot slip through) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of a summary for the terminal (and the seed's ``>> logs/...txt`` habit)."""
    width = max([len("class"), *(len(str(s["class"])) for s in summary)])
    lines = [f"{'class':<{width}}  {'dice':>6}  {'surface dice':>12}  {'cases':>5}"]
    for s in summary:
        if s["class"] == MEAN_ROW:
            lines.append("-" * len(lines[0]))
        lines.append(
            f"{s['class']:<{width}}  {s['mean_dice']:6.4f}  {s['mean_surface_dice']:12.4f}  {s['n_cases']:5d}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _argument(convert, text: str):
    """Run a converter, turning its ValueError into argparse's one-line usage error."""
    try:
        return convert(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _backbone(text: str) -> str:
    return _argument(canonical_backbone, text)


def _class_list(text: str) -> tuple[int, ...]:
    return _argument(parse_class_list, text)


def parse_thresholds(text: str) -> dict[str, float]:
    """'aorta=0.4,postcava=0.6' -> {'aorta': 0.4, 'postcava': 0.6}; names and values are checked."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"expected class=value[,class=value...], got {text!r}")
    thresholds = {name.strip(): float(value) for name, value in pairs}
    normalise_thresholds(thresholds)
    return thresholds


def _thresholds(text: str) -> dict[str, float]:
    return _argument(parse_thresholds, text)


def build_parser() -> argparse.ArgumentParser:
    """The seed's test.py flags (--resume, --backbone, --dataset_list, --data_root_path, --save_dir, ...)."""
    parser = argparse.ArgumentParser(
        prog="python -m lib.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resume", type=Path, required=True, help="revseg checkpoint to evaluate")
    parser.add_argument("--backbone", type=_backbone, required=True, help="unet or swinunetr; as in the checkpoint")
    parser.add_argument("--dataset_list", type=Path, required=True, help="dataset list (image<TAB>label[<TAB>classes])")
    parser.add_argument("--data_root_path", type=Path, default=None, help="list paths' root (default: its folder)")
    parser.add_argument("--save_dir", type=Path, required=True, help="where the CSVs (and predictions) go")
    parser.add_argument("--store_result", action="store_true", help="also write predictions/{case}.nii.gz")
    for axis in "xyz":
        parser.add_argument(f"--space_{axis}", type=float, default=1.5, help=f"working spacing along {axis} (mm)")
    parser.add_argument("--a_min", type=float, default=-175.0, help="HU mapped to 0")
    parser.add_argument("--a_max", type=float, default=250.0, help="HU mapped to 1")
    for axis in "xyz":
        parser.add_argument(f"--roi_{axis}", type=int, default=96, help=f"sliding-window size along {axis}")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--sw_batch_size", type=int, default=1,
                        help="windows per forward pass; >1 changes results (BatchNorm uses batch statistics)")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, default=None, help="one threshold for every class (0.5)")
    threshold.add_argument("--thresholds", type=_thresholds, default=None,
                           help="per-class thresholds, e.g. aorta=0.4,postcava=0.6 (others 0.5)")
    parser.add_argument("--largest_component", type=_class_list, default=None,
                        help="classes (comma-separated, or 'all') that keep only their largest component")
    parser.add_argument("--tolerance_mm", type=float, default=2.0, help="surface Dice tolerance")
    parser.add_argument("--classes", type=_class_list, default=None,
                        help="score only these classes (comma-separated); default: those each label annotates")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on for CUDA)")
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[CTPipelineConfig, InferenceConfig]:
    """The pipeline and inference settings the flags describe."""
    spacing = (args.space_x, args.space_y, args.space_z)
    pipeline = CTPipelineConfig.from_spacing(spacing, hu_range=(args.a_min, args.a_max))
    thresholds = args.thresholds if args.thresholds is not None else args.threshold
    inference = InferenceConfig(
        roi_size=(args.roi_x, args.roi_y, args.roi_z),
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        thresholds=DEFAULT_THRESHOLD if thresholds is None else thresholds,
        largest_component=args.largest_component,
        device=args.device,
        amp=args.amp,
    )
    return pipeline, inference


def load_predictor(args: argparse.Namespace) -> Predictor:
    """Predictor for ``--resume``, refusing a missing file, a non-revseg file or another backbone."""
    if not args.resume.is_file():
        raise EvaluationError(f"checkpoint {args.resume} does not exist")
    try:
        pipeline, inference = configs_from_args(args)
        return Predictor.from_checkpoint(args.resume, pipeline, inference, classes=args.classes, backbone=args.backbone)
    except ValueError as error:  # bad settings, not a revseg checkpoint, other backbone, classes it lacks
        raise EvaluationError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the CSVs (and predictions), print the summary; returns the exit code."""
    predictor = load_predictor(args)
    entries = read_dataset_list(args.dataset_list, args.data_root_path, require_labels=True)
    print(f"evaluating {args.resume} ({args.backbone}) on {len(entries)} case(s) from {args.dataset_list}")
    store_dir = args.save_dir / "predictions" if args.store_result else None
    rows = evaluate_cases(predictor, entries, args.tolerance_mm, args.classes, store_dir)
    summary = summarise(rows)
    write_csv(args.save_dir / "per_case.csv", rows, PER_CASE_COLUMNS)
    write_csv(args.save_dir / "summary.csv", summary, SUMMARY_COLUMNS)
    print(format_summary(summary) if summary else "no class was scored (check --classes against the labels)")
    print(f"results in {args.save_dir}")
    return 0


USER_ERRORS = (EvaluationError, DatasetListError, CTInputError, UnknownClassError, VolumeReadError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; input problems print one ``error:`` line and return 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
