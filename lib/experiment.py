"""The revseg experiment, unattended: learn from expert revisions by continual tuning or by full training?

    make demo                                                  # = python -m lib.experiment --out runs/demo --config cpu
    python -m lib.experiment --out runs/tiny --config tiny     # the test suite's miniature (~1.5 min)
    python -m lib.experiment --out runs/paper --config paper   # paper scale, for GPUs (see below)

On a phantom cohort (:mod:`lib.phantom`: ground truth plus "AI-predicted" labels with systematic errors
in the target classes gallbladder, stomach, aorta and postcava), under ``--out``:

1. ``cohort/``: the cohort (reused when ``cohort.json`` matches the configuration);
2. ``round1/``: full training from scratch on the AI-predicted labels (``train.txt``);
3. ``attention/``: attention scoring of the training cases with the round-1 model (test-time flips);
   the ``revise_fraction`` with the highest priority go to the expert;
4. ``cohort/labels_revised/``, ``cohort/revised.txt``, ``cohort/train_revised.txt``, ``revisions.json``:
   the simulated expert redraws the target classes of those cases from the ground truth;
5. round 2 three ways: ``continual/`` (continual tuning of the target classes' heads on the revised
   cases plus ``replay_fraction`` of the others, chosen by attention priority), ``continual_cached/``
   (the same with the frozen encoder's outputs cached: ``--cache_features``) and ``full/`` (full
   training from scratch on every case with the revisions applied);
6. ``eval/{round1,continual,continual_cached,full}/``: Dice and surface Dice per case and class on the
   held-out test split against the ground truth (``test_gt.txt``);
7. ``report.md``, ``learning_curves.png``, ``per_class_dice.png`` (:mod:`lib.report`), and
   ``experiment.json``: the configuration, every command run (reproducible one by one), stage times.

Every run validates on ``val_gt.txt`` every ``val_every`` epochs for the learning curves. Commands run
in this process with ``nproc`` 1, else under torchrun (gloo on CPU, NCCL on GPUs).

Configurations (``--config``; every field is in :data:`CONFIGS`):

======  =====  ======  =======  ====  =====  ==============  =========  =================  =====================
name    cases  cohort  working  ROI   width  epochs r1/full  continual  processes          meant for
======  =====  ======  =======  ====  =====  ==============  =========  =================  =====================
tiny    6      6 mm    6 mm     32^3  0.25   2 / 2           2          1 (this process)   tests (~1.5 min)
cpu     16     3 mm    6 mm     32^3  0.25   60 / 60         30         2 gloo, 1 thread   ``make demo``, < 30 min
paper   40     1.5 mm  1.5 mm   96^3  1.0    100 / 100       50         1 NCCL per GPU     GPUs: published recipe
======  =====  ======  =======  ====  =====  ==============  =========  =================  =====================

The cohort is made (and evaluated) on its own grid; models work at the working spacing. The CPU
configuration builds its phantom at 3 mm because the phantom's label errors are sized in voxels: made
at 6 mm, a 1-2 voxel erosion erases the aorta, postcava and gallbladder outright, which would turn
"revise the AI's errors" into "draw organs the AI never saw".
On 2 shared CPU cores two single-threaded gloo processes train about twice as fast as one process with
two threads (small 3D convolutions leave OpenMP threads spinning), hence ``nproc=2, threads=1``.

Paper-scale GPU configuration (``--config paper``): the published widths (U-Net 19.08M parameters, or
``--backbone swin_unetr``: Swin UNETR, feature size 48, 62.19M), 1.5 mm spacing, 96^3 crops, 2 crops
per case per step, AdamW at 1e-4 with 10 warm-up epochs and cosine decay, 100 epochs of full training
(round 1 and round 2), sliding-window overlap 0.5, surface-Dice tolerance 2 mm, one process per visible
GPU (NCCL), mixed precision. Continual tuning gets 50 epochs (our choice, half the full budget), on the
top 20% of the training cases by attention plus 10% replay. A cached continual round holds
``cache_draws * num_samples`` crops per case of 8 x 96^3 fp16 head inputs (14 MB each) in CPU memory:
about 230 MB per case with 8 draws of 2 crops, 1.6 GB for the 7 cases of a 24-case training split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.activelearning import select_top_fraction
from lib.activelearning.priorities import read_priorities
from lib.activelearning.score import main as score_main
from lib.classes import CLASS_NAMES, parse_class_list
from lib.datalists import CaseEntry, format_entry, read_dataset_list, write_dataset_list
from lib.evaluate import main as evaluate_main
from lib.paths import REPO_ROOT
from lib.phantom import PhantomConfig, build_cohort
from lib.trainers.revisions import revision_record
from lib.trainers.train import main as train_main
from lib.volumes import read_volume, write_nifti

log = logging.getLogger(__name__)

ROUND2_RUNS = ("continual", "continual_cached", "full")
RUNS = ("round1", *ROUND2_RUNS)
STAGE_OUTPUTS = (*RUNS, "attention", "eval", "logs", "revisions.json", "report.md", "learning_curves.png",
                 "per_class_dice.png", "experiment.json")
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "lib.trainers.train": train_main,
    "lib.activelearning.score": score_main,
    "lib.evaluate": evaluate_main,
}


class ExperimentError(RuntimeError):
    """A stage of the experiment failed; the message names the stage and where its output went."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one experiment; stored in ``experiment.json``."""

    name: str
    num_cases: int
    cohort_seed: int
    cohort_spacing_mm: float  # grid the phantom (and its label errors) is made on; evaluation happens there
    spacing_mm: float  # working spacing the models train and predict at
    roi: int
    width: float
    round1_epochs: int
    full_epochs: int
    continual_epochs: int
    warmup_epochs: int
    continual_warmup_epochs: int
    lr: float
    continual_lr: float
    num_samples: int
    val_every: int
    overlap: float
    tolerance_mm: float
    cache_draws: int
    backbone: str = "unet"
    revise_fraction: float = 0.25
    replay_fraction: float = 0.1
    nproc: int = 1
    threads: int | None = 1  # torch threads per process; None: torch's default (cores / processes)
    device: str = "auto"
    seed: int = 0

    def phantom(self) -> PhantomConfig:
        spacing = (self.cohort_spacing_mm,) * 3
        return PhantomConfig(num_cases=self.num_cases, seed=self.cohort_seed, spacing=spacing)  # type: ignore[arg-type]


CONFIGS: dict[str, ExperimentConfig] = {
    "tiny": ExperimentConfig(
        name="tiny", num_cases=6, cohort_seed=7, cohort_spacing_mm=6.0, spacing_mm=6.0, roi=32, width=0.25,
        round1_epochs=2, full_epochs=2, continual_epochs=2, warmup_epochs=1, continual_warmup_epochs=1, lr=1e-3,
        continual_lr=1e-3, num_samples=1, val_every=2, overlap=0.0, tolerance_mm=6.0, cache_draws=2,
        revise_fraction=0.25, replay_fraction=0.5,
    ),
    "cpu": ExperimentConfig(
        name="cpu", num_cases=16, cohort_seed=0, cohort_spacing_mm=3.0, spacing_mm=6.0, roi=32, width=0.25,
        round1_epochs=60, full_epochs=60, continual_epochs=30, warmup_epochs=2, continual_warmup_epochs=1, lr=2e-3,
        continual_lr=2e-3, num_samples=2, val_every=10, overlap=0.25, tolerance_mm=6.0, cache_draws=4,
        revise_fraction=0.25, replay_fraction=0.1, nproc=2,
    ),
    "paper": ExperimentConfig(
        name="paper", num_cases=40, cohort_seed=0, cohort_spacing_mm=1.5, spacing_mm=1.5, roi=96, width=1.0,
        round1_epochs=100, full_epochs=100, continual_epochs=50, warmup_epochs=10, continual_warmup_epochs=5,
        lr=1e-4, continual_lr=1e-4, num_samples=2, val_every=10, overlap=0.5, tolerance_mm=2.0, cache_draws=8,
        revise_fraction=0.2, replay_fraction=0.1, nproc=0, threads=None,  # 0: one process per visible GPU
    ),
}


def resolve_nproc(requested: int) -> int:
    """0 means one process per visible GPU (one on a CPU-only machine)."""
    return requested if requested > 0 else max(1, torch.cuda.device_count())


def uses_cuda(device: str) -> bool:
    return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")


def device_description(device: str) -> str:
    """The machine in words, for the report: GPU model or CPU core count."""
    if uses_cuda(device):
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU ({os.cpu_count()} cores)"


def launcher_description(nproc: int, device: str, threads: int | None) -> str:
    per_process = f"{threads} torch thread(s) each" if threads else "torch's default threads"
    if nproc == 1:
        return f"one process, {per_process}"
    return f"torchrun, {nproc} processes ({'NCCL' if uses_cuda(device) else 'gloo'}), {per_process}"


# ----------------------------------------------------------------------------------------------
# The simulated expert (pure functions)
# ----------------------------------------------------------------------------------------------


def expert_revision(ai: np.ndarray, truth: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """The AI label with the ``classes`` redrawn from the truth: what an expert's revision leaves behind.

    Voxels the AI gave a revised class lose it; the revised classes' true voxels get it. Other classes are
    untouched, as an expert who only reviews the revised classes would leave them.
    """
    values = np.asarray([c + 1 for c in classes], dtype=ai.dtype)
    revised = ai.copy()
    revised[np.isin(ai, values)] = 0
    truly = np.isin(truth, values)
    revised[truly] = truth[truly]
    return revised


def choose_cases_to_revise(priorities_csv: Path, fraction: float) -> list[str]:
    """The top ``fraction`` of scored cases by attention priority (at least one), highest first."""
    return select_top_fraction(read_priorities(priorities_csv), fraction)


# ----------------------------------------------------------------------------------------------
# Running commands
# ----------------------------------------------------------------------------------------------


def torchrun_command(module: str, argv: Sequence[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]


def run_command(module: str, argv: list[str], nproc: int, log_path: Path, threads: int | None = None) -> None:
    """Run a revseg command: its ``main`` in this process (nproc 1) or under torchrun (output to ``log_path``)."""
    if nproc == 1:
        code = COMMANDS[module](argv)
        if code:
            raise ExperimentError(f"python -m {module} exited with {code}")
        return
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as handle:
        result = subprocess.run(torchrun_command(module, argv, nproc), env=env, cwd=REPO_ROOT, stdout=handle,
                                stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise ExperimentError(f"torchrun -m {module} exited with {result.returncode}; see {log_path}:\n{tail}")


def _flag_values(name: str, values: Sequence[Any]) -> list[str]:
    return [item for axis, value in zip("xyz", values, strict=True) for item in (f"--{name}_{axis}", str(value))]


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


class Experiment:
    """One experiment under ``out``: runs the stages in order and records what it ran and how long it took."""

    def __init__(self, config: ExperimentConfig, out: Path):
        self.config, self.out = config, Path(out).resolve()  # torchrun runs from the repository root
        self.cohort = self.out / "cohort"
        self.nproc = resolve_nproc(config.nproc)
        self.targets = parse_class_list(config.phantom().error_classes)
        self.commands: list[dict[str, Any]] = []
        self.stages: dict[str, float] = {}
        self.record: dict[str, Any] = {}

    # -- bookkeeping -----------------------------------------------------------------------------

    def _run(self, stage: str, module: str, argv: list[str], nproc: int | None = None) -> None:
        """Run one command, recording it (as a shell line) and its wall time including start-up."""
        nproc = self.nproc if nproc is None else nproc
        line = torchrun_command(module, argv, nproc)[1:] if nproc > 1 else ["-m", module, *argv]
        self.commands.append({"stage": stage, "command": shlex.join(["python", *line]), "processes": nproc})
        log.info("[%s] %s", stage, self.commands[-1]["command"])
        started = time.perf_counter()
        run_command(module, argv, nproc, self.out / "logs" / f"{stage}.log", self.config.threads)
        self.stages[stage] = time.perf_counter() - started

    def clean(self) -> None:
        """Remove a previous experiment's outputs (not a matching cohort): training logs append otherwise."""
        for name in STAGE_OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # -- stages ----------------------------------------------------------------------------------

    def prepare_cohort(self) -> None:
        """Build the phantom cohort, or reuse it when its recorded configuration is this one."""
        wanted = asdict(self.config.phantom())
        manifest = self.cohort / "cohort.json"
        if manifest.is_file() and json.loads(manifest.read_text())["config"] == json.loads(json.dumps(wanted)):
            log.info("reusing the phantom cohort in %s", self.cohort)
            self.stages["cohort"] = 0.0
            return
        if self.cohort.exists():
            shutil.rmtree(self.cohort)
        started = time.perf_counter()
        build_cohort(self.cohort, self.config.phantom())
        self.stages["cohort"] = time.perf_counter() - started

    def _list(self, name: str) -> str:
        return str(self.cohort / name)

    def _train_args(self, run: str, lists: Sequence[str], epochs: int, warmup: int, lr: float) -> list[str]:
        c = self.config
        return [
            "--backbone", c.backbone, "--data_root_path", str(self.cohort), "--dataset_list", *lists,
            "--val_list", self._list("val_gt.txt"), "--run_dir", str(self.out / run),
            "--width", str(c.width), *_flag_values("roi", (c.roi,) * 3), *_flag_values("space", (c.spacing_mm,) * 3),
            "--num_samples", str(c.num_samples), "--max_epoch", str(epochs), "--warmup_epoch", str(warmup),
            "--lr", str(lr), "--val_every", str(c.val_every), "--val_overlap", str(c.overlap),
            "--store_num", str(epochs), "--seed", str(c.seed),
            "--device", c.device,
        ]

    def checkpoint(self, run: str) -> Path:
        return self.out / run / "checkpoints" / "last.pt"

    def train_round1(self) -> None:
        c = self.config
        self._run("round1", "lib.trainers.train",
                  self._train_args("round1", [self._list("train.txt")], c.round1_epochs, c.warmup_epochs, c.lr))

    def score_training_cases(self) -> Path:
        """Attention-score the training cases with the round-1 model; returns the priority table."""
        c = self.config
        out = self.out / "attention"
        self._run("attention", "lib.activelearning.score", [
            "--checkpoints", str(self.checkpoint("round1")), "--dataset_list", self._list("train.txt"),
            "--data_root_path", str(self.cohort), "--out_dir", str(out),
            "--classes", ",".join(CLASS_NAMES[k] for k in self.targets), "--overlap", str(c.overlap),
            "--device", c.device,
        ])
        return out / "priorities.csv"

    def simulate_expert(self, case_ids: Sequence[str]) -> None:
        """Write revised labels and two lists: the revised cases (target classes) and all cases, revised."""
        started = time.perf_counter()
        labels_dir = self.cohort / "labels_revised"
        if labels_dir.exists():
            shutil.rmtree(labels_dir)
        truth = {e.case_id: e for e in read_dataset_list(self._list("train_gt.txt"), self.cohort, validate=False)}
        revised_lines, all_lines, records = [], [], {}
        for entry in read_dataset_list(self._list("train.txt"), self.cohort, validate=False):
            if entry.case_id not in case_ids:
                all_lines.append(format_entry(entry.image, entry.label, self.cohort, entry.classes))
                continue
            label, record = self._revise_case(entry, truth[entry.case_id], labels_dir)
            records[entry.case_id] = record
            classes = [k for k in self.targets if k in entry.classes]
            revised_lines.append(format_entry(entry.image, label, self.cohort, classes))
            all_lines.append(format_entry(entry.image, label, self.cohort, entry.classes))
        header = "simulated expert revisions of " + ",".join(CLASS_NAMES[k] for k in self.targets)
        write_dataset_list(self.cohort / "revised.txt", revised_lines, header=header)
        write_dataset_list(self.cohort / "train_revised.txt", all_lines, header=f"all training cases; {header}")
        (self.out / "revisions.json").write_text(json.dumps(records, indent=1))
        self.stages["revisions"] = time.perf_counter() - started

    def _revise_case(self, entry: CaseEntry, truth: CaseEntry, labels_dir: Path) -> tuple[Path, dict]:
        assert entry.label is not None and truth.label is not None
        ai, affine = read_volume(entry.label)
        revised = expert_revision(ai, read_volume(truth.label)[0], self.targets)
        path = write_nifti(labels_dir / f"{entry.case_id}.nii.gz", revised, affine, "simulated expert revision")
        return path, revision_record(ai, revised)

    def _continual_args(self, run: str) -> list[str]:
        """Continual tuning of the target classes: revised cases plus attention-ranked replay of the others."""
        c = self.config
        return [
            *self._train_args(run, [self._list("revised.txt")], c.continual_epochs, c.continual_warmup_epochs,
                              c.continual_lr),
            "--continual_tuning", "--pretrain", str(self.checkpoint("round1")),
            "--revised_classes", ",".join(CLASS_NAMES[k] for k in self.targets),
            "--replay_list", self._list("train.txt"), "--replay_fraction", str(c.replay_fraction),
            "--priorities", str(self.out / "attention" / "priorities.csv"),
        ]

    def train_round2(self) -> None:
        """Continual tuning (plain and with the feature cache) and full training from scratch."""
        c = self.config
        self._run("continual", "lib.trainers.train", self._continual_args("continual"))
        self._run("continual_cached", "lib.trainers.train",
                  [*self._continual_args("continual_cached"), "--cache_features", "--cache_draws", str(c.cache_draws)])
        self._run("full", "lib.trainers.train", self._train_args(
            "full", [self._list("train_revised.txt")], c.full_epochs, c.warmup_epochs, c.lr))

    def evaluate(self, run: str) -> None:
        """Dice and surface Dice of a run's last checkpoint on the test split against the ground truth."""
        c = self.config
        argv = [
            "--resume", str(self.checkpoint(run)), "--backbone", c.backbone, "--dataset_list",
            self._list("test_gt.txt"), "--data_root_path", str(self.cohort), "--save_dir", str(self.out / "eval" / run),
            *_flag_values("space", (c.spacing_mm,) * 3), *_flag_values("roi", (c.roi,) * 3),
            "--overlap", str(c.overlap), "--tolerance_mm", str(c.tolerance_mm),
        ]
        if c.device != "auto":
            argv += ["--device", c.device]
        self._run(f"eval_{run}", "lib.evaluate", argv, nproc=1)

    # -- the whole loop --------------------------------------------------------------------------

    def write_record(self, total_seconds: float, revised_cases: Sequence[str]) -> Path:
        self.record = {
            "config": asdict(self.config), "processes": self.nproc, "device": device_description(self.config.device),
            "launcher": launcher_description(self.nproc, self.config.device, self.config.threads),
            "torch": torch.__version__, "target_classes": [CLASS_NAMES[k] for k in self.targets],
            "revised_cases": list(revised_cases), "runs": {run: run for run in RUNS},
            "evaluations": {run: f"eval/{run}" for run in RUNS}, "commands": self.commands, "stages": self.stages,
            "total_seconds": total_seconds,
        }
        path = self.out / "experiment.json"
        path.write_text(json.dumps(self.record, indent=1))
        return path

    def run(self) -> Path:
        """All stages, then the report; returns the report's path."""
        from lib.report import write_report  # matplotlib only when a report is written

        previous_threads = torch.get_num_threads()
        if self.config.threads:
            # Small 3D convolutions on a few shared cores run faster single-threaded (no idle OpenMP spinning).
            torch.set_num_threads(self.config.threads)
        try:
            started = time.perf_counter()
            self.out.mkdir(parents=True, exist_ok=True)
            self.clean()
            self.prepare_cohort()
            self.train_round1()
            chosen = choose_cases_to_revise(self.score_training_cases(), self.config.revise_fraction)
            log.info("cases sent to the expert (highest attention first): %s", chosen)
            self.simulate_expert(chosen)
            self.train_round2()
            for run in RUNS:
                self.evaluate(run)
            self.write_record(time.perf_counter() - started, chosen)
            return write_report(self.out)
        finally:
            torch.set_num_threads(previous_threads)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="experiment folder (its outputs are replaced)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="size of the experiment")
    p.add_argument("--backbone", default=None, help="unet (default) or swin_unetr")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per training/scoring run: 1 = in this process, >1 = torchrun, 0 = one per GPU")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--revise_fraction", type=float, default=None, help="share of training cases sent to the expert")
    p.add_argument("--replay_fraction", type=float, default=None, help="share of the other cases replayed")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = {name: getattr(args, name) for name in ("backbone", "nproc", "device", "revise_fraction",
                                                        "replay_fraction", "seed") if getattr(args, name) is not None}
    return replace(CONFIGS[args.config], **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = Experiment(config_from_args(args), args.out).run()
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
