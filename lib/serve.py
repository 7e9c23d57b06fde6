"""`make serve`: prepare everything a first-time user needs, then start the MONAI Label server.

1. the real example CT (checksummed) and a phantom cohort built from it;
2. a demo studies folder: the phantom CTs, with their simulated AI predictions as ``original`` labels
   (the replay pool for continual tuning), plus the real CT;
3. a published model: from ``pretrained_checkpoints/`` when present, else a bootstrap round-1 model
   trained here within a time budget (progress shown), so the first predictions are meaningful;
4. ``monailabel start_server --app apps/revseg --studies ... --conf models unet`` on 127.0.0.1:8000.

Every step is skipped when its output exists, so a second start is up in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lib.app_config import AppConfig
from lib.example_ct import example_case
from lib.model_store import ModelStore
from lib.paths import REPO_ROOT, data_dir
from lib.phantom import PhantomConfig, build_cohort
from lib.trainers.train_task import PRETRAINED_DIR, PUBLISHED_NAMES
from model.checkpoint import load_checkpoint

log = logging.getLogger("revseg.serve")


COHORT_SPACING = 3.0  # the demo CTs shown in Slicer; models resample them to their own spacing
CPU_GEOMETRY = {"spacing": "6", "roi_size": "32"}  # a bootstrap that learns the large organs in minutes on CPU
BOOTSTRAP_EPOCHS = 100  # the cosine schedule's length; the time budget usually ends the run first on CPU


def prepare_cohort(root: Path, num_cases: int) -> Path:
    if not (root / "cohort.json").is_file():
        log.info("building a %d-case phantom cohort at %.1f mm in %s", num_cases, COHORT_SPACING, root)
        build_cohort(root, PhantomConfig(num_cases=num_cases, seed=0, spacing=(COHORT_SPACING,) * 3))
    return root


def published_geometry(store: ModelStore, backbones: list[str]) -> dict[str, str]:
    """Spacing and ROI the published model was trained with: serving it at others would be garbage."""
    for backbone in backbones:
        if store.exists(backbone):
            trained = load_checkpoint(store.path(backbone)).get("train_config") or {}
            if trained.get("spacing") and trained.get("roi_size"):
                return {"spacing": _conf_value(trained["spacing"]), "roi_size": _conf_value(trained["roi_size"])}
    return {}


def _conf_value(values: Sequence[float]) -> str:
    """One number when isotropic ("6"), else all three ("1.5,1.5,3"), as the app's conf parses them."""
    texts = [f"{v:g}" for v in values]
    return texts[0] if len(set(texts)) == 1 else ",".join(texts)


def serving_geometry(args: argparse.Namespace, store: ModelStore, backbones: list[str]) -> dict[str, str]:
    """Explicit flags, else the published model's geometry, else 6 mm / 32^3 on CPU and the app's defaults on GPU."""
    chosen = {k: v for k, v in {"spacing": args.spacing, "roi_size": args.roi_size}.items() if v is not None}
    if len(chosen) == 2:
        return chosen
    fallback = published_geometry(store, backbones) or ({} if torch.cuda.is_available() else CPU_GEOMETRY)
    return fallback | chosen


def prepare_studies(studies: Path, cohort: Path) -> Path:
    """Copy CTs (and their simulated AI labels as the ``original`` tag) into a MONAI Label studies folder."""
    originals = studies / "labels" / "original"
    originals.mkdir(parents=True, exist_ok=True)
    for image in sorted((cohort / "images").glob("*.nii.gz")):
        if not (studies / image.name).exists():
            shutil.copy(image, studies / image.name)
            shutil.copy(cohort / "labels_ai" / image.name, originals / image.name)
    real_ct, _ = example_case("example_ct")
    if not (studies / "example_ct.nii.gz").exists():
        shutil.copy(real_ct, studies / "example_ct.nii.gz")
    return studies


def bootstrap_model(store: ModelStore, backbone: str, cohort: Path, config: AppConfig, minutes: float) -> None:
    """Publish a round-1 model: full training on the cohort's AI labels, bounded in time."""
    run_dir = config.runs / backbone / f"bootstrap-{config.spacing[0]:g}mm-roi{config.roi_size[0]}"
    args = ["--backbone", backbone, "--data_root_path", str(cohort), "--dataset_list", str(cohort / "train.txt"),
            "--val_list", str(cohort / "val.txt"), "--run_dir", str(run_dir), "--max_epoch", str(BOOTSTRAP_EPOCHS),
            "--warmup_epoch", "2", "--val_every", "25", "--store_num", "5", "--lr", "2e-3", "--num_samples", "2",
            "--width", str(config.width), "--time_limit_minutes", str(minutes)]
    for axis, roi, spacing in zip("xyz", config.roi_size, config.spacing, strict=True):
        args += [f"--roi_{axis}", str(roi), f"--space_{axis}", str(spacing)]
    pretrained = PRETRAINED_DIR / PUBLISHED_NAMES[backbone]
    if pretrained.is_file():
        args += ["--pretrain", str(pretrained)]
    resume = run_dir / "checkpoints" / "last.pt"
    if resume.is_file():  # an interrupted bootstrap continues where it stopped
        args = ["--resume", str(resume)]
    log.info("no published %s model: training a bootstrap model (at most %.0f min; Ctrl-C is safe)", backbone, minutes)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], env=env, cwd=REPO_ROOT, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch, validation = last_validation(run_dir / "log.jsonl")
    if validation:
        ranked = ", ".join(f"{n} {d:.2f}" for n, d in sorted(validation.items(), key=lambda item: -item[1]))
        log.info("bootstrap %s model: validation Dice after epoch %d (against AI labels): %s", backbone, epoch, ranked)
    store.publish(backbone, run_dir / "checkpoints" / "last.pt",
                  {"mode": "full", "bootstrap": True, "wall_seconds": summary["wall_seconds"],
                   "epochs": summary["epochs"], "validation_dice": validation})


def last_validation(log_path: Path) -> tuple[int, dict[str, float]]:
    """(epoch, per-class Dice) of a run's last validation; (0, {}) when none ran."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
        if log_path.is_file() else []
    validated = [r for r in records if any(k.startswith("val_dice.") for k in r)]
    if not validated:
        return 0, {}
    last = validated[-1]
    return int(last["epoch"]), {k.removeprefix("val_dice."): round(float(v), 4) for k, v in last.items()
                                if k.startswith("val_dice.")}


def server_command(app_conf: dict[str, str], studies: Path, host: str, port: int) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(REPO_ROOT / "apps" / "revseg"),
           "--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in app_conf.items():
        cmd += ["--conf", key, value]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=Path, default=data_dir() / "studies")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (see README before exposing it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--models", default="unet")
    parser.add_argument("--cases", type=int, default=20, help="phantom cases in the demo studies folder")
    parser.add_argument("--bootstrap-minutes", type=float, default=10.0)
    parser.add_argument("--width", default="0.25", help="backbone width of a bootstrap model (CPU)")
    parser.add_argument("--spacing", default=None,
                        help="mm (default: the published model's, else 6 on CPU and the app's 3 on GPU)")
    parser.add_argument("--roi-size", default=None, help="voxels per side (default: the published model's, else "
                                                         "32 on CPU and the app's 64 on GPU)")
    parser.add_argument("--prepare-only", action="store_true", help="prepare everything, do not start the server")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    app_conf = {"models": args.models, "width": args.width}
    requested = AppConfig.from_conf(app_conf)
    store = ModelStore(requested.model_dir)
    app_conf |= serving_geometry(args, store, requested.models)
    config = AppConfig.from_conf(app_conf)
    log.info("serving at %s mm with %s windows", _conf_value(config.spacing), "x".join(map(str, config.roi_size)))
    cohort = prepare_cohort(data_dir() / "phantom_demo", args.cases)
    studies = prepare_studies(args.studies, cohort)
    for backbone in config.models:
        if not store.exists(backbone):
            bootstrap_model(store, backbone, cohort, config, args.bootstrap_minutes)
    cmd = server_command(app_conf, studies, args.host, args.port)
    log.info("starting: %s", " ".join(cmd))
    if args.prepare_only:
        return 0
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
