"""Selection quality: do the cases a selector sends to experts hold the model's worst errors?

On a held-out phantom cohort with ground truth, a case's true error is ``1 - mean Dice`` over the target
classes of the first model's thresholded prediction (on the working grid). Each selector ranks the cases:

* attention: the AbdomenAtlas-8K priority (:mod:`lib.activelearning.score`; two models, or one under flips),
  once per ``--opening_iterations`` value (published: 2 voxels, calibrated for 1.5 mm; at the coarse spacing
  of a CPU run it erases most uncertainty, so smaller openings are scored from the same predictions too);
* random: the mean over many seeded random rankings (its expected capture is the selected share);
* epistemic: MC-dropout entropy of the first model (:mod:`lib.activelearning.epistemic`);
* oracle: the true error itself, the ceiling for the capture columns.

For each, the table gives the Spearman correlation of priority with true error and the share of the
cohort's total error held by its top 5 % and top 10 % of cases (by count, at least one case).

Without ``--checkpoints`` it builds a training and a separate held-out phantom cohort and trains a tiny
U-Net and Swin UNETR with the training CLI. The default run took 13.5 minutes on 2 shared CPU cores with
``OMP_NUM_THREADS=1`` (one thread is much faster than two when the cores are shared; on a loaded machine it
took 18.5); ``--unet_epochs``/``--swin_epochs``/``--eval_cases`` trade time for model quality::

    python -m lib.activelearning.selection_quality --out_dir runs/selection_quality
    python -m lib.activelearning.selection_quality --out_dir runs/sq --checkpoints unet.pt swin.pt \\
        --eval_list data/phantom/test_gt.txt --data_root_path data/phantom

Writes ``selection_quality.md`` (the table and the set-up) and ``cases.csv`` (per-case values).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from lib.activelearning.attention import DEFAULT_OPENING_ITERATIONS, select_top_fraction
from lib.activelearning.epistemic import DEFAULT_DROPOUT, DEFAULT_PASSES, epistemic_score
from lib.activelearning.score import (
    ensemble_probabilities,
    load_models,
    model_inference_configs,
    parse_context,
    score_probabilities,
    scored_classes,
    trained_spacing,
)
from lib.classes import CLASS_NAMES, SEED_REVISED_CLASSES, parse_class_list
from lib.datalists import CaseEntry, read_dataset_list
from lib.inference import InferenceConfig, binarise
from lib.metrics import dice
from lib.phantom import SPLITS, PhantomConfig, build_cohort
from lib.trainers.train import main as train_main
from lib.transforms import IMAGE_KEY, LABEL_KEY, CTPipelineConfig, ct_pipeline
from model.universal import UniversalModel

FRACTIONS = (0.05, 0.10)
# Tiny CPU models: Swin UNETR needs windows of at least 64 and a feature size that is a multiple of 12.
TRAIN_PLAN = (("unet", 32), ("swin_unetr", 64))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def captured_error(priorities: Mapping[str, float], errors: Mapping[str, float], fraction: float) -> float:
    """Share of the total error in the top ``fraction`` of cases by priority (at least one case)."""
    total = sum(errors.values())
    chosen = select_top_fraction(priorities, fraction, min_count=1)
    return sum(errors[c] for c in chosen) / total if total > 0 else math.nan


def spearman(priorities: Mapping[str, float], errors: Mapping[str, float]) -> tuple[float, float]:
    """(rho, p-value) of priority vs error; NaN when either is constant (no ranking to correlate)."""
    ids = sorted(errors)
    x, y = [priorities[c] for c in ids], [errors[c] for c in ids]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class SelectorResult:
    name: str
    rho: float
    p_value: float
    captured: tuple[float, ...]  # one per FRACTIONS entry


def evaluate_selector(
    name: str, priorities: Mapping[str, float], errors: Mapping[str, float], fractions: Sequence[float] = FRACTIONS
) -> SelectorResult:
    rho, p_value = spearman(priorities, errors)
    return SelectorResult(name, rho, p_value, tuple(captured_error(priorities, errors, f) for f in fractions))


def random_selector(
    errors: Mapping[str, float], draws: int, seed: int, fractions: Sequence[float] = FRACTIONS
) -> SelectorResult:
    """Mean over ``draws`` seeded random rankings: the expectation a single random draw scatters around."""
    rng = np.random.default_rng(seed)
    results = [
        evaluate_selector("random", dict(zip(errors, rng.random(len(errors)).tolist(), strict=True)), errors, fractions)
        for _ in range(draws)
    ]
    return SelectorResult(
        name=f"random (mean of {draws})",
        rho=float(np.nanmean([r.rho for r in results])),
        p_value=math.nan,
        captured=tuple(float(np.mean([r.captured[i] for r in results])) for i in range(len(fractions))),
    )


def selected_count(n: int, fraction: float) -> int:
    return len(select_top_fraction({str(i): 0.0 for i in range(n)}, fraction, min_count=1))


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(results: Sequence[SelectorResult], n_cases: int, fractions: Sequence[float] = FRACTIONS) -> str:
    heads = [f"top {100 * f:g}% ({selected_count(n_cases, f)} of {n_cases}) error captured" for f in fractions]
    lines = ["| selector | Spearman ρ vs error | p-value | " + " | ".join(heads) + " |",
             "|---|---:|---:|" + "---:|" * len(fractions)]
    for r in results:
        cells = [r.name, _fmt(r.rho), _fmt(r.p_value, 3), *(_fmt(c) for c in r.captured)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Per-case evaluation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    error: float
    attention: dict[int, float]  # opening iterations -> priority
    epistemic: float
    dice: dict[str, float]


@dataclass(frozen=True)
class Evaluator:
    """Models and settings for scoring held-out cases with every selector."""

    models: Sequence[UniversalModel]
    configs: Sequence[InferenceConfig]
    pipeline_config: CTPipelineConfig
    target_classes: tuple[int, ...]
    context_classes: tuple[int, ...] | None
    openings: tuple[int, ...]
    passes: int
    dropout: float
    seed: int

    def true_dice(
        self, probs: torch.Tensor, classes: Sequence[int], label: torch.Tensor, annotated: Sequence[int]
    ) -> dict[str, float]:
        """Dice of the first model's thresholded prediction per annotated target class."""
        targets = [c for c in self.target_classes if c in annotated]
        if not targets:
            raise ValueError("the ground truth annotates none of the target classes")
        masks = binarise(probs[0, [classes.index(c) for c in targets]], self.configs[0].thresholds, targets)
        return {CLASS_NAMES[c]: dice(m.numpy(), (label == c + 1).numpy()) for c, m in zip(targets, masks, strict=True)}

    def __call__(self, entry: CaseEntry) -> CaseResult:
        pipeline = ct_pipeline(self.pipeline_config, with_label=True)
        sample = pipeline({IMAGE_KEY: str(entry.image), LABEL_KEY: str(entry.label)})
        classes = scored_classes(self.target_classes, self.context_classes)
        probs = ensemble_probabilities(self.models, sample[IMAGE_KEY][None], self.configs, classes)
        dices = self.true_dice(probs, classes, torch.as_tensor(sample[LABEL_KEY])[0], entry.classes)
        attention = {
            k: score_probabilities(probs, classes, self.target_classes, opening_iterations=k).priority
            for k in self.openings
        }
        epistemic = epistemic_score(self.models[0], sample, self.configs[0], self.target_classes, self.passes,
                                    self.dropout, self.seed)
        return CaseResult(entry.case_id, 1.0 - float(np.mean(list(dices.values()))), attention, epistemic, dices)


# ----------------------------------------------------------------------------------------------
# Building what is not given
# ----------------------------------------------------------------------------------------------


def cohort_lists(root: Path, suffix: str = "_gt") -> list[Path]:
    """Every split's ground-truth list of a phantom cohort."""
    return [root / f"{split}{suffix}.txt" for split in SPLITS if (root / f"{split}{suffix}.txt").is_file()]


def build_phantom(out: Path, cases: int, seed: int, spacing: float) -> Path:
    build_cohort(out, PhantomConfig(num_cases=cases, seed=seed, spacing=(spacing,) * 3))
    return out


def train_flags(args: argparse.Namespace, backbone: str, roi: int, root: Path, run_dir: Path) -> list[str]:
    epochs = args.unet_epochs if backbone == "unet" else args.swin_epochs
    roi_flags = [flag for axis in "xyz" for flag in (f"--roi_{axis}", str(roi))]
    space_flags = [flag for axis in "xyz" for flag in (f"--space_{axis}", str(args.spacing))]
    return ["--backbone", backbone, "--data_root_path", str(root),
            "--dataset_list", *[str(p) for p in cohort_lists(root)], "--run_dir", str(run_dir),
            "--width", str(args.width), *roi_flags, *space_flags, "--num_samples", "1", "--warmup_epoch", "1",
            "--lr", str(args.lr), "--max_epoch", str(epochs), "--store_num", str(epochs), "--seed", str(args.seed),
            "--device", args.device]


def train_models(args: argparse.Namespace, root: Path) -> tuple[list[Path], list[str]]:
    """Train the tiny models on the training cohort; (checkpoints, one description line each)."""
    checkpoints, notes = [], []
    for backbone, roi in TRAIN_PLAN:
        run_dir = args.out_dir / f"train_{backbone}"
        flags = train_flags(args, backbone, roi, root, run_dir)
        print(f"training {backbone}: python -m lib.trainers.train {' '.join(flags)}", flush=True)
        if train_main(flags) != 0:
            raise RuntimeError(f"training {backbone} failed; see the messages above")
        summary = json.loads((run_dir / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
        notes.append(f"{backbone}: width {args.width}, ROI {roi}^3, {args.spacing:g} mm, {summary['epochs']} epochs "
                     f"({summary['steps']} steps), lr {args.lr:g}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                     f"{summary['wall_seconds']:.0f} s")
        checkpoints.append(run_dir / "checkpoints" / "last.pt")
    return checkpoints, notes


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--checkpoints", nargs="+", default=None, help="trained models (default: train tiny ones)")
    p.add_argument("--eval_list", nargs="+", default=None, help="held-out ground-truth lists (default: a new cohort)")
    p.add_argument("--data_root_path", type=Path, default=None, help="root of --eval_list paths")
    p.add_argument("--eval_cases", type=int, default=24, help="size of the generated held-out cohort")
    p.add_argument("--train_cases", type=int, default=8, help="size of the generated training cohort")
    p.add_argument("--spacing", type=float, default=6.0, help="mm, generated cohorts and training")
    p.add_argument("--width", type=float, default=0.25, help="backbone width of trained models (Swin: 48*w % 12 == 0)")
    p.add_argument("--unet_epochs", type=int, default=30)
    p.add_argument("--swin_epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classes", default=",".join(SEED_REVISED_CLASSES), help="target classes")
    p.add_argument("--context_classes", default="all", help="see lib.activelearning.score")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap for scoring")
    p.add_argument("--opening_iterations", type=int, nargs="+", default=[DEFAULT_OPENING_ITERATIONS, 1, 0],
                   help="attention opening sizes to compare (voxels; published 2)")
    p.add_argument("--passes", type=int, default=DEFAULT_PASSES, help="MC-dropout passes")
    p.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT, help="MC-dropout rate on the head input")
    p.add_argument("--random_draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def _device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def build_evaluator(args: argparse.Namespace, checkpoints: Sequence[Path]) -> Evaluator:
    device = _device(args.device)
    models, ckpts = load_models(checkpoints, device)
    return Evaluator(
        models=models,
        configs=model_inference_configs(models, (None,) * 3, args.overlap, device),
        pipeline_config=CTPipelineConfig(spacing=trained_spacing(ckpts)),
        target_classes=parse_class_list(args.classes),
        context_classes=parse_context(args.context_classes),
        openings=tuple(args.opening_iterations),
        passes=args.passes,
        dropout=args.dropout,
        seed=args.seed,
    )


def eval_entries(args: argparse.Namespace) -> list[CaseEntry]:
    if args.eval_list:
        lists, root = [Path(p) for p in args.eval_list], args.data_root_path
    else:
        root = build_phantom(args.out_dir / "cohort_eval", args.eval_cases, args.seed + 1, args.spacing)
        lists = cohort_lists(root)
    return [e for path in lists for e in read_dataset_list(path, root, require_labels=True)]


def write_cases(path: Path, results: Sequence[CaseResult]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = sorted({n for r in results for n in r.dice})
        openings = sorted({k for r in results for k in r.attention}, reverse=True)
        writer.writerow(["case_id", "error", *(f"attention_opening{k}" for k in openings), "epistemic",
                         *(f"dice_{n}" for n in names)])
        for r in results:
            writer.writerow([r.case_id, r.error, *(r.attention[k] for k in openings), r.epistemic,
                             *(r.dice.get(n, "") for n in names)])


def _attention_name(opening: int) -> str:
    return f"attention (opening {opening}{', published' if opening == DEFAULT_OPENING_ITERATIONS else ''})"


def report(results: Sequence[CaseResult], args: argparse.Namespace, setup_lines: Sequence[str]) -> str:
    errors = {r.case_id: r.error for r in results}
    selectors = [
        *(evaluate_selector(_attention_name(k), {r.case_id: r.attention[k] for r in results}, errors)
          for k in args.opening_iterations),
        random_selector(errors, args.random_draws, args.seed),
        evaluate_selector("epistemic (MC dropout)", {r.case_id: r.epistemic for r in results}, errors),
        evaluate_selector("oracle (true error)", errors, errors),
    ]
    values = np.array(list(errors.values()))
    lines = ["# Selection quality", "", *[f"- {line}" for line in setup_lines],
             f"- {len(results)} held-out cases; true error = 1 - mean Dice over {args.classes}: mean "
             f"{values.mean():.3f}, min {values.min():.3f}, max {values.max():.3f}", "",
             markdown_table(selectors, len(results)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup_lines = [f"command: python -m lib.activelearning.selection_quality {' '.join(argv or sys.argv[1:])}"]
    if args.checkpoints:
        checkpoints = [Path(p) for p in args.checkpoints]
    else:
        train_root = build_phantom(args.out_dir / "cohort_train", args.train_cases, args.seed, args.spacing)
        checkpoints, notes = train_models(args, train_root)
        setup_lines += [f"trained on {args.train_cases} phantom cases (seed {args.seed}), ground-truth labels", *notes]
    evaluator = build_evaluator(args, checkpoints)
    setup_lines += [f"checkpoints: {', '.join(str(c) for c in checkpoints)}",
                    f"scoring: overlap {args.overlap}, {evaluator.pipeline_config.spacing} mm, MC dropout "
                    f"p={args.dropout} x {args.passes} passes on the first model"]
    entries = eval_entries(args)
    results = [evaluator(e) for e in tqdm(entries, desc="held-out cases", unit="case")]
    write_cases(args.out_dir / "cases.csv", results)
    setup_lines.append(f"total wall time {time.perf_counter() - started:.0f} s")
    text = report(results, args, setup_lines)
    (args.out_dir / "selection_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
