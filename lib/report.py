"""The experiment's report: markdown tables and PNG plots, every number read from the runs' own files.

    python -m lib.report runs/demo      # (re)write report.md and the plots of a finished experiment

Sources: ``experiment.json`` (configuration, commands, stage times), each run's ``summary.json`` (wall
time, validation time, processor seconds, samples) and ``log.jsonl`` (validation Dice per epoch), and
``eval/{run}/summary.csv`` (test Dice and surface Dice per class). Nothing is recomputed here.

Targets, printed PASS/MISS whatever the outcome (NO EVIDENCE where full training itself scores below
``LEARNED_FLOOR`` on the revised classes), for continual tuning with and without the feature cache:

* speed: full round-2 training at least 16x the continual run's wall time. Measured on training wall
  time (wall minus the periodic validation both runs do for the learning curves) and, separately, on
  total wall time including that validation;
* revised classes: continual's mean test Dice over the revised classes at most 1 point (0.01) below full's;
* unrevised classes: no unrevised class's test Dice drops by more than 1 point from round 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lib.classes import CLASS_NAMES, class_index
from lib.evaluate import MEAN_ROW

RUN_LABELS = {"round1": "round 1", "continual": "continual", "continual_cached": "continual + cache",
              "full": "full (round 2)"}
CONTINUAL_RUNS = ("continual", "continual_cached")
SPEEDUP_TARGET = 16.0
DICE_MARGIN = 0.01  # one Dice point
LEARNED_FLOOR = 0.05  # below this mean Dice full training learned nothing, and "continual is as good" means nothing
LEARNING_CURVES_PNG = "learning_curves.png"
PER_CLASS_PNG = "per_class_dice.png"


# ----------------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    """What a training run cost, as its summary.json recorded it."""

    wall_seconds: float
    validation_seconds: float
    process_cpu_seconds: float
    cache_seconds: float
    samples: int
    steps: int
    epochs: int
    world_size: int

    @property
    def training_seconds(self) -> float:
        """Wall time without the periodic validation (monitoring, not training)."""
        return self.wall_seconds - self.validation_seconds

    @classmethod
    def from_summary(cls, path: Path) -> RunCost:
        data = json.loads(path.read_text())
        return cls(
            wall_seconds=float(data["wall_seconds"]), validation_seconds=float(data.get("validation_seconds", 0.0)),
            process_cpu_seconds=float(data["process_cpu_seconds"]), cache_seconds=float(data.get("cache_seconds", 0.0)),
            samples=int(data["samples"]), steps=int(data["steps"]), epochs=int(data["epochs"]),
            world_size=int(data["world_size"]),
        )


Scores = dict[str, tuple[float, float]]  # class -> (mean Dice, mean surface Dice)


def read_class_scores(summary_csv: Path) -> Scores:
    """Per-class (Dice, surface Dice) from an evaluation summary.csv, without its ``mean`` row."""
    with open(summary_csv, newline="") as handle:
        return {row["class"]: (float(row["mean_dice"]), float(row["mean_surface_dice"]))
                for row in csv.DictReader(handle) if row["class"] != MEAN_ROW}


def read_log(log_jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class ExperimentResults:
    """Everything the report shows, read from an experiment folder."""

    out: Path
    record: dict[str, Any]
    costs: dict[str, RunCost]
    scores: dict[str, Scores]
    logs: dict[str, list[dict[str, Any]]]

    @classmethod
    def load(cls, out: Path) -> ExperimentResults:
        record = json.loads((out / "experiment.json").read_text())
        runs, evaluations = record["runs"], record["evaluations"]
        return cls(
            out=out, record=record,
            costs={run: RunCost.from_summary(out / folder / "summary.json") for run, folder in runs.items()},
            scores={run: read_class_scores(out / folder / "summary.csv") for run, folder in evaluations.items()},
            logs={run: read_log(out / folder / "log.jsonl") for run, folder in runs.items()},
        )

    @property
    def runs(self) -> list[str]:
        return list(self.record["runs"])

    @property
    def revised(self) -> list[str]:
        """Revised (target) classes the test split scores, in template order."""
        return [name for name in self.record["target_classes"] if name in self.scores["round1"]]

    @property
    def unrevised(self) -> list[str]:
        targets = set(self.record["target_classes"])
        return sorted((name for name in self.scores["round1"] if name not in targets), key=class_index)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    required: str
    passed: bool
    vacuous: bool = False  # met only because there was nothing to compare

    @property
    def verdict(self) -> str:
        if self.vacuous:
            return "NO EVIDENCE"
        return "PASS" if self.passed else "MISS"


def group_mean(scores: Scores, classes: Iterable[str], metric: int = 0) -> float:
    """Mean of one metric (0 Dice, 1 surface Dice) over the classes; NaN when none is scored."""
    values = [scores[name][metric] for name in classes if name in scores]
    return fmean(values) if values else float("nan")


def speed_targets(results: ExperimentResults, run: str) -> list[Target]:
    full, tuned = results.costs["full"], results.costs[run]
    label = RUN_LABELS[run]
    targets = []
    for what, full_s, run_s in (("training wall", full.training_seconds, tuned.training_seconds),
                                ("total wall incl. validation", full.wall_seconds, tuned.wall_seconds)):
        ratio = full_s / run_s if run_s > 0 else float("inf")
        targets.append(Target(f"{label}: speed-up vs full ({what})", f"{ratio:.1f}x ({full_s:.1f} s / {run_s:.1f} s)",
                              f">= {SPEEDUP_TARGET:.0f}x", ratio >= SPEEDUP_TARGET))
    return targets


def quality_targets(results: ExperimentResults, run: str) -> list[Target]:
    label, revised, unrevised = RUN_LABELS[run], results.revised, results.unrevised
    tuned, full = group_mean(results.scores[run], revised), group_mean(results.scores["full"], revised)
    gap = 100 * (full - tuned)
    drops = {name: 100 * (results.scores["round1"][name][0] - results.scores[run][name][0]) for name in unrevised}
    worst = max(drops, key=drops.__getitem__) if drops else None
    worst_drop = drops[worst] if worst else 0.0
    mean_drop = 100 * (group_mean(results.scores["round1"], unrevised) - group_mean(results.scores[run], unrevised))
    return [
        Target(f"{label}: revised-class Dice vs full",
               f"{100 * tuned:.2f} vs {100 * full:.2f} (gap {gap:+.2f} pt)"
               + (f"; full training itself stays below {100 * LEARNED_FLOOR:.0f} pt: nothing learned to compare"
                  if full < LEARNED_FLOOR else ""),
               f"gap <= {100 * DICE_MARGIN:.0f} pt", gap <= 100 * DICE_MARGIN, vacuous=full < LEARNED_FLOOR),
        Target(f"{label}: unrevised-class Dice drop from round 1",
               f"worst {worst_drop:+.2f} pt ({worst or 'none'}); mean {mean_drop:+.2f} pt",
               f"<= {100 * DICE_MARGIN:.0f} pt per class", worst_drop <= 100 * DICE_MARGIN),
    ]


def all_targets(results: ExperimentResults) -> list[Target]:
    return [t for run in CONTINUAL_RUNS for t in (*speed_targets(results, run), *quality_targets(results, run))]


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _score(value: float) -> str:
    return "n/a" if value != value else f"{value:.4f}"


def targets_section(results: ExperimentResults) -> str:
    rows = [(t.verdict, t.name, t.measured, t.required) for t in all_targets(results)]
    return "## Targets\n\n" + markdown_table(("verdict", "target", "measured", "required"), rows)


def group_section(results: ExperimentResults) -> str:
    runs = results.runs
    rows = []
    for group, classes in (("revised", results.revised), ("unrevised", results.unrevised)):
        for metric, name in ((0, "Dice"), (1, "surface Dice")):
            rows.append((f"{group} ({len(classes)} classes)", name,
                         *(_score(group_mean(results.scores[run], classes, metric)) for run in runs)))
    header = ("classes", "metric", *(RUN_LABELS[run] for run in runs))
    return "## Test accuracy by group (mean over classes)\n\n" + markdown_table(header, rows)


def per_class_section(results: ExperimentResults) -> str:
    runs, revised = results.runs, set(results.revised)
    rows = []
    for name in [*results.revised, *results.unrevised]:
        scores = [results.scores[run].get(name, (float("nan"),) * 2) for run in runs]
        rows.append((name, "revised" if name in revised else "unrevised", *(_score(s[0]) for s in scores),
                     *(_score(s[1]) for s in scores)))
    header = ("class", "group", *(f"Dice {RUN_LABELS[r]}" for r in runs), *(f"NSD {RUN_LABELS[r]}" for r in runs))
    tolerance = results.record["config"]["tolerance_mm"]
    return (f"## Test accuracy per class\n\nNSD: surface Dice at {tolerance:g} mm tolerance, on the original grid.\n\n"
            + markdown_table(header, rows))


def cost_section(results: ExperimentResults) -> str:
    rows = []
    for run in results.runs:
        cost = results.costs[run]
        rows.append((RUN_LABELS[run], cost.world_size, cost.epochs, cost.steps, cost.samples,
                     f"{cost.wall_seconds:.2f}", f"{cost.validation_seconds:.2f}", f"{cost.training_seconds:.2f}",
                     f"{cost.cache_seconds:.2f}", f"{cost.process_cpu_seconds:.2f}"))
    header = ("run", "processes", "epochs", "steps", "samples", "wall s", "validation s", "training wall s",
              "of which feature cache s", "processor s (all ranks)")
    full = results.costs["full"]
    ratios = [
        f"- full / {RUN_LABELS[run]}: {full.training_seconds / results.costs[run].training_seconds:.1f}x training "
        f"wall, {full.wall_seconds / results.costs[run].wall_seconds:.1f}x total wall, "
        f"{full.process_cpu_seconds / results.costs[run].process_cpu_seconds:.1f}x processor seconds"
        for run in CONTINUAL_RUNS
    ]
    cached, plain = results.costs["continual_cached"], results.costs["continual"]
    ratios.append(f"- the feature cache makes continual tuning {plain.training_seconds / cached.training_seconds:.1f}x "
                  "faster (training wall)")
    return ("## Cost (from each run's summary.json)\n\n" + markdown_table(header, rows)
            + "\n\nSpeed-up ratios:\n\n" + "\n".join(ratios))


def stage_section(results: ExperimentResults) -> str:
    stages = results.record["stages"]
    rows = [(stage, f"{seconds:.1f}") for stage, seconds in stages.items()]
    rows.append(("whole experiment", f"{results.record['total_seconds']:.1f}"))
    return ("## Stage wall times (process start-up and data loading included)\n\n"
            + markdown_table(("stage", "wall s"), rows))


def header_section(results: ExperimentResults) -> str:
    record, config = results.record, results.record["config"]
    return "\n".join([
        f"# revseg experiment: continual tuning vs full training ({config['name']} configuration)",
        "",
        f"- device: {record['device']}; training and scoring: {record['launcher']}; torch {record['torch']}",
        f"- backbone {config['backbone']} at width {config['width']}, {config['spacing_mm']:g} mm, "
        f"ROI {config['roi']}^3, {config['num_samples']} crop(s) per case per step",
        f"- phantom cohort of {config['num_cases']} cases made at {config['cohort_spacing_mm']:g} mm "
        f"(seed {config['cohort_seed']}); "
        f"round 1: {config['round1_epochs']} epochs; round 2: continual {config['continual_epochs']} epochs "
        f"(lr {config['continual_lr']:g}), full {config['full_epochs']} epochs from scratch (lr {config['lr']:g})",
        f"- revised classes: {', '.join(record['target_classes'])}",
        f"- cases sent to the expert by attention priority ({config['revise_fraction']:g} of the training cases): "
        f"{', '.join(record['revised_cases'])}; replay fraction {config['replay_fraction']:g}; "
        f"feature cache: {config['cache_draws']} crop draws per case",
    ])


def revisions_section(results: ExperimentResults) -> str:
    """What the simulated expert changed: per revised case and class, voxels changed and the AI label's Dice."""
    records = json.loads((results.out / "revisions.json").read_text())
    rows = [(case, name, change["added"], change["removed"], f"{change['dice_ai_vs_expert']:.4f}")
            for case, record in records.items() for name, change in record["changes"].items()]
    return ("## Expert revisions (simulated: ground truth for the revised classes)\n\n"
            + markdown_table(("case", "class", "voxels added", "voxels removed", "Dice of the AI label"), rows))


def commands_section(results: ExperimentResults) -> str:
    lines = [f"# {c['stage']}\n{c['command']}" for c in results.record["commands"]]
    return "## Commands run\n\n```bash\n" + "\n".join(lines) + "\n```"


def notes_section() -> str:
    return "\n".join([
        "## Notes",
        "",
        "- Ground truth is the phantom's source labels (TotalSegmentator predictions on one real CT, deformed per",
        "  case); AI labels carry synthetic errors in the revised classes only. Numbers describe this phantom set-up.",
        "- Continual tuning freezes every head but the revised classes', so unrevised classes' probability maps",
        "  (and hence their per-class masks and Dice) cannot change; the unrevised target checks that on real files.",
        "- Wall times are measured inside the training loop (summary.json); the stage table adds start-up costs.",
        "- A class absent from a test case scores Dice 1 when it is also predicted absent, 0 when it is predicted",
        "  (lib.metrics); such classes show the same value for every run.",
    ])


def build_markdown(results: ExperimentResults) -> str:
    sections = [
        header_section(results), targets_section(results), group_section(results), per_class_section(results),
        cost_section(results), stage_section(results), revisions_section(results),
        f"## Plots\n\n![learning curves]({LEARNING_CURVES_PNG})\n\n![per-class Dice]({PER_CLASS_PNG})",
        commands_section(results), notes_section(),
    ]
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def curve_points(records: Sequence[Mapping[str, Any]], classes: Sequence[str], epoch_offset: float,
                 seconds_offset: float) -> tuple[list[float], list[float], list[float]]:
    """(epochs, cumulative training seconds, mean validation Dice over ``classes``) of the validated epochs."""
    epochs, seconds, dice = [], [], []
    elapsed = seconds_offset
    for record in records:
        elapsed += float(record["epoch_seconds"]) - float(record.get("val_seconds", 0.0))
        values = [record[f"val_dice.{name}"] for name in classes if f"val_dice.{name}" in record]
        if values:
            epochs.append(epoch_offset + record["epoch"])
            seconds.append(elapsed)
            dice.append(fmean(values))
    return epochs, seconds, dice


def logged_training_seconds(records: Sequence[Mapping[str, Any]]) -> float:
    """Seconds of the logged epochs without their validation: where a continuation starts on the time axis."""
    return sum(float(r["epoch_seconds"]) - float(r.get("val_seconds", 0.0)) for r in records)


def validated_classes(logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    found = {key.removeprefix("val_dice.") for records in logs.values() for r in records for key in r
             if key.startswith("val_dice.")}
    return [name for name in CLASS_NAMES if name in found]


def plot_learning_curves(results: ExperimentResults, path: Path) -> Path:
    """Validation Dice of revised and unrevised classes against epochs and training wall time, both rounds.

    Continual runs continue round 1's curve; full round-2 training starts again from zero.
    """
    targets = set(results.record["target_classes"])
    classes = validated_classes(results.logs)
    groups = {"revised classes": [c for c in classes if c in targets],
              "unrevised classes": [c for c in classes if c not in targets]}
    round1 = results.logs["round1"]
    offsets = {"round1": (0.0, 0.0), "full": (0.0, 0.0)}
    continued = (float(round1[-1]["epoch"]) if round1 else 0.0, logged_training_seconds(round1))
    offsets |= {run: continued for run in CONTINUAL_RUNS}
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for row, (group, names) in enumerate(groups.items()):
        start = curve_points(round1, names, 0.0, 0.0)
        for run in results.runs:
            epochs, seconds, dice = curve_points(results.logs[run], names, *offsets[run])
            if run in CONTINUAL_RUNS and start[0]:  # continual tuning starts where round 1 ended
                epochs, seconds, dice = ([start[i][-1], *values] for i, values in enumerate((epochs, seconds, dice)))
            style = {"marker": "o", "markersize": 3, "label": RUN_LABELS[run]}
            axes[row][0].plot(epochs, dice, **style)
            axes[row][1].plot(seconds, dice, **style)
        for col, xlabel in enumerate(("epoch (continual runs continue round 1)", "training wall seconds (cumulative)")):
            axes[row][col].set(title=f"validation Dice, {group} ({len(names)})", xlabel=xlabel, ylabel="mean Dice")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_per_class(results: ExperimentResults, path: Path) -> Path:
    """Test Dice per class for every run; revised classes are starred and listed first."""
    names = [*results.revised, *results.unrevised]
    runs = results.runs
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(max(8.0, 0.5 * len(names)), 5))
    for k, run in enumerate(runs):
        positions = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
        axis.bar(positions, [results.scores[run].get(n, (0.0, 0.0))[0] for n in names], width, label=RUN_LABELS[run])
    revised = set(results.revised)
    axis.set_xticks(range(len(names)), [f"* {n}" if n in revised else n for n in names], rotation=60, ha="right",
                    fontsize=8)
    axis.set(ylabel="test Dice", ylim=(0, 1), title="test Dice per class (* revised classes)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(out: str | Path) -> Path:
    """Write report.md and both plots into ``out``; returns report.md's path."""
    out = Path(out)
    results = ExperimentResults.load(out)
    plot_learning_curves(results, out / LEARNING_CURVES_PNG)
    plot_per_class(results, out / PER_CLASS_PNG)
    path = out / "report.md"
    path.write_text(build_markdown(results))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a finished experiment folder (with experiment.json)")
    args = parser.parse_args(argv)
    if not (args.out / "experiment.json").is_file():
        print(f"error: {args.out}/experiment.json does not exist: run python -m lib.experiment first", file=sys.stderr)
        return 2
    print(write_report(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
