"""Train a universal model: round-1 full training or continual tuning on expert revisions.

Keeps the seed's flags, so its commands keep working (``--dist True`` is accepted; distribution
comes from torchrun). Examples::

    # round 1, 2 processes (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node=2 train.py --backbone unet \\
        --data_root_path data/phantom --dataset_list data/phantom/train.txt --val_list data/phantom/val.txt

    # round 2: continual tuning of the revised classes, with 10% replay of the most important old cases
    torchrun --standalone --nproc_per_node=2 train.py --backbone unet --continual_tuning \\
        --pretrain runs/round1/checkpoints/last.pt --dataset_list revised.txt --revised_classes aorta,postcava \\
        --replay_list data/phantom/train.txt --replay_fraction 0.1 --priorities priorities.csv

    # the same, running the frozen encoder once per crop (4 crop draws per case) instead of every epoch
    ... --continual_tuning ... --cache_features --cache_draws 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.classes import UnknownClassError
from lib.datalists import DatasetListError
from lib.paths import runs_dir
from lib.trainers.distributed import configure_logging
from lib.trainers.engine import TrainConfig, TrainingError, run_training
from model.checkpoint import load_checkpoint


def _bool(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "y")


def _resolve_list(value: str, data_txt_path: str, split: str) -> str:
    """A list file path, or a seed-style dataset name resolved as ``{data_txt_path}/{name}_{split}.txt``."""
    if Path(value).is_file():
        return value
    candidate = Path(data_txt_path) / f"{value}_{split}.txt"
    return str(candidate) if candidate.is_file() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--backbone", default=d.backbone, help="unet or swin_unetr (seed spelling swinunetr accepted)")
    p.add_argument("--data_root_path", default=".", help="root the dataset-list paths are relative to")
    p.add_argument("--dataset_list", nargs="+", default=[], help="training list file(s) or seed dataset names")
    p.add_argument("--data_txt_path", default="dataset/dataset_list", help="where seed dataset names resolve")
    p.add_argument("--val_list", default=None, help="validation list (best checkpoint by its Dice)")
    p.add_argument("--log_name", default=None, help="run folder name under runs/ (seed habit)")
    p.add_argument("--run_dir", default=None, help="run folder (overrides --log_name)")
    p.add_argument("--continual_tuning", action="store_true", help="train only the revised classes' heads")
    p.add_argument("--revised_classes", default="", help="comma-separated classes the experts revised")
    p.add_argument("--replay_list", nargs="*", default=[], help="old cases to replay from (continual)")
    p.add_argument("--replay_fraction", type=float, default=d.replay_fraction)
    p.add_argument("--priorities", default=None, help="priority table (attention scores) for replay selection")
    p.add_argument("--pretrain", default=None,
                   help="starting weights: previous round (continual) or a published backbone (full)")
    p.add_argument("--resume", default=None, help="continue an interrupted run exactly from its checkpoint")
    p.add_argument("--max_epoch", type=int, default=d.max_epoch)
    p.add_argument("--warmup_epoch", type=int, default=d.warmup_epoch)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--num_samples", type=int, default=d.num_samples, help="crops per CT per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    for axis, value in zip("xyz", d.roi_size, strict=True):
        p.add_argument(f"--roi_{axis}", type=int, default=value)
    for axis, value in zip("xyz", d.spacing, strict=True):
        p.add_argument(f"--space_{axis}", type=float, default=value)
    p.add_argument("--width", type=float, default=d.width, help="backbone width multiplier (1 = published)")
    p.add_argument("--embedding", default=None, help="fixed class embedding file (e.g. txt_encoding.pth)")
    p.add_argument("--store_num", type=int, default=d.store_every, help="checkpoint every N epochs")
    p.add_argument("--val_every", type=int, default=d.val_every)
    p.add_argument("--val_overlap", type=float, default=d.val_overlap, help="sliding-window overlap in validation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--num_workers", type=int, default=d.num_workers)
    p.add_argument("--cache_gb", type=float, default=d.cache_gb, help="memory budget for cached volumes")
    p.add_argument("--no_amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--time_limit_minutes", type=float, default=None, help="stop after the epoch crossing this")
    p.add_argument("--cache_features", action="store_true",
                   help="continual only: run the frozen encoder once per cached crop, then train only the heads")
    p.add_argument("--cache_draws", type=int, default=d.cache_draws,
                   help="random crop draws per case kept in the feature cache (each draw = --num_samples crops)")
    p.add_argument("--cache_dtype", default=d.cache_dtype, choices=("float16", "float32"),
                   help="storage type of cached features")
    p.add_argument("--dist", type=_bool, default=False, help="accepted for seed compatibility; use torchrun")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    run_dir = args.run_dir or str(runs_dir() / (args.log_name or ("continual" if args.continual_tuning else "full")))
    return TrainConfig(
        dataset_list=[_resolve_list(v, args.data_txt_path, "train") for v in args.dataset_list],
        data_root=args.data_root_path, backbone=args.backbone,
        mode="continual" if args.continual_tuning else "full", run_dir=run_dir,
        val_list=_resolve_list(args.val_list, args.data_txt_path, "val") if args.val_list else None,
        pretrain=args.pretrain,
        revised_classes=[c.strip() for c in args.revised_classes.split(",") if c.strip()],
        replay_list=list(args.replay_list), replay_fraction=args.replay_fraction, priorities=args.priorities,
        max_epoch=args.max_epoch, warmup_epoch=args.warmup_epoch, batch_size=args.batch_size,
        num_samples=args.num_samples, lr=args.lr, weight_decay=args.weight_decay,
        roi_size=(args.roi_x, args.roi_y, args.roi_z), spacing=(args.space_x, args.space_y, args.space_z),
        width=args.width, embedding=args.embedding, store_every=args.store_num, val_every=args.val_every,
        val_overlap=args.val_overlap,
        seed=args.seed, device=args.device, num_workers=args.num_workers, cache_gb=args.cache_gb,
        amp=not args.no_amp, time_limit_minutes=args.time_limit_minutes,
        cache_features=args.cache_features, cache_draws=args.cache_draws, cache_dtype=args.cache_dtype,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        if args.resume:
            # The run's own config continues it exactly; only where it runs may change.
            stored = TrainConfig.from_dict(load_checkpoint(args.resume)["train_config"])
            stored.device, stored.num_workers = args.device, args.num_workers
            requested = config_from_args(args)
            if stored.backbone != requested.backbone and "--backbone" in (argv or sys.argv):
                stored.backbone = requested.backbone  # let the engine refuse the mismatch by name
            run_training(stored, resume=args.resume)
        else:
            run_training(config_from_args(args))
    except (TrainingError, DatasetListError, UnknownClassError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
