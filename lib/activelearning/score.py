"""Attention scoring: which cases, and which classes in them, experts should revise first.

The core is reused by the MONAI Label scoring method and the attention infer task:

* :func:`ensemble_probabilities` gives ``[M, C, ...]`` sigmoid maps of one image, one member per model
  (the published U-Net + Swin UNETR ensemble) or, with a single model, one per test-time flip;
* :func:`score_case` turns them into a :class:`CaseScore` with the AbdomenAtlas-8K maths of
  :mod:`lib.activelearning.attention`: priority = attention voxels summed over the target classes,
  classes ranked by heatmap sum, and the maps themselves on the preprocessed grid.

The command scores a dataset list, on one process or sharded over ``torchrun`` processes::

    python -m lib.activelearning.score --checkpoints unet.pt [swin.pt] --dataset_list train.txt \\
        --data_root_path data/phantom --out_dir runs/attention
    torchrun --standalone --nproc_per_node=2 -m lib.activelearning.score ...

and writes, under ``--out_dir``:

* ``attention/{case}.nii.gz``: the target classes' binary attention on the original grid and affine, as
  one label map (class index + 1; where classes overlap, the hottest heatmap wins), to open over the CT;
* ``cases/{case}.json``: the per-class breakdown and what it was computed from (image and checkpoint
  stamps, settings); a rerun skips cases whose record matches, so an interrupted run resumes;
* ``priorities.csv``: the table the training engine reads with ``--priorities`` (and ``replay``);
* ``failures.json``: cases that could not be loaded, which were skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm import tqdm

from lib.activelearning.attention import (
    DEFAULT_OPENING_ITERATIONS,
    AttentionMaps,
    attention_maps,
    case_priority,
    class_ranking,
)
from lib.activelearning.priorities import write_priority_rows
from lib.atomic import atomic_write_text
from lib.classes import CLASS_NAMES, NUM_CLASSES, SEED_REVISED_CLASSES, UnknownClassError, parse_class_list
from lib.datalists import CaseEntry, DatasetListError, read_dataset_list, strip_volume_suffix
from lib.inference import InferenceConfig, sliding_window_probabilities, universal_label_map
from lib.trainers.distributed import barrier, configure_logging, gather_objects, init_distributed, shard, shutdown
from lib.transforms import (
    IMAGE_KEY,
    PRED_KEY,
    CTInputError,
    CTPipeline,
    CTPipelineConfig,
    ct_pipeline,
    first_line,
    invert_to_original,
)
from lib.volumes import write_nifti
from model.checkpoint import build_model_from_checkpoint
from model.universal import UniversalModel

log = logging.getLogger(__name__)

DEFAULT_TARGET_CLASSES: tuple[int, ...] = parse_class_list(SEED_REVISED_CLASSES)
# Identity, then a flip along each spatial axis of a [B, 1, D, H, W] tensor.
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))
RECORD_VERSION = 1  # bump when a record's meaning changes, so old records are rescored

InferenceConfigs = InferenceConfig | Sequence[InferenceConfig]


# ----------------------------------------------------------------------------------------------
# Core
# ----------------------------------------------------------------------------------------------


def _per_model(config: InferenceConfigs, count: int) -> list[InferenceConfig]:
    """One config per model: models trained on different window sizes must be run on their own."""
    if isinstance(config, InferenceConfig):
        return [config] * count
    configs = list(config)
    if len(configs) != count:
        raise ValueError(f"{len(configs)} inference configs given for {count} models")
    return configs


def _flip(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return tensor.flip(dims) if dims else tensor


def _universal_classes(class_indices: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(range(NUM_CLASSES)) if class_indices is None else tuple(int(c) for c in class_indices)


def ensemble_probabilities(
    models: Sequence[UniversalModel],
    image: torch.Tensor,
    config: InferenceConfigs,
    class_indices: Sequence[int] | None = None,
    flips: bool | None = None,
) -> torch.Tensor:
    """``[M, C, D, H, W]`` CPU float32 sigmoid maps of one ``[1, 1, D, H, W]`` image.

    Two backbones disagree where the image is ambiguous, which is what the attention's inconsistency
    term measures. A single model has no partner, so its predictions under flips along each spatial
    axis (flipped back) stand in for one; ``flips`` defaults to exactly that case. ``class_indices``
    are universal classes (default: all), looked up in each model's own channel order. ``config`` is
    one InferenceConfig or one per model.
    """
    if not models:
        raise ValueError("at least one model is needed")
    if image.dim() != 5 or tuple(image.shape[:2]) != (1, 1):
        raise ValueError(f"expected one image of shape [1, 1, D, H, W], got {tuple(image.shape)}")
    names = [CLASS_NAMES[c] for c in _universal_classes(class_indices)]
    use_flips = len(models) == 1 if flips is None else flips
    members = [
        (model, cfg, dims)
        for model, cfg in zip(models, _per_model(config, len(models)), strict=True)
        for dims in (FLIP_DIMS if use_flips else ((),))
    ]
    plain = image.as_tensor() if isinstance(image, MetaTensor) else image
    result: torch.Tensor | None = None
    for index, (model, cfg, dims) in enumerate(members):
        probs = sliding_window_probabilities(model, _flip(plain, dims), cfg, model.class_indices(names))
        if result is None:  # preallocated: stacking would hold every member twice
            result = torch.empty((len(members), *probs.shape[1:]), dtype=torch.float32)
        result[index] = _flip(probs, dims)[0]
    assert result is not None
    return result


@dataclass(frozen=True, eq=False)
class CaseScore:
    """One case's attention score; ``maps`` channels are ``class_indices``, on the preprocessed grid.

    The breakdown fields cover the target classes only: they are what the priority sums.
    """

    case_id: str
    priority: float
    target_classes: tuple[int, ...]
    attention_voxels: Mapping[int, int]  # target class -> binary attention voxels
    heatmap_sums: Mapping[int, float]  # target class -> heatmap sum (the class ranking's key)
    ranked_classes: tuple[int, ...]  # target classes with attention, hottest first
    class_indices: tuple[int, ...]
    maps: AttentionMaps
    ensemble_size: int

    def target_channels(self) -> list[int]:
        return [self.class_indices.index(c) for c in self.target_classes]

    def label_map(self) -> torch.Tensor:
        """``[1, ...]`` uint8 map of the targets' attention (class index + 1); the hottest heatmap wins."""
        channels = self.target_channels()
        masks = torch.from_numpy(self.maps.attention[channels])  # fancy indexing copies: writeable
        heat = torch.from_numpy(self.maps.heatmap[channels])
        return universal_label_map(masks, heat, self.target_classes)

    def summary(self) -> dict[str, Any]:
        """JSON-ready breakdown, classes by name."""
        return {
            "case_id": self.case_id,
            "priority": self.priority,
            "ensemble_size": self.ensemble_size,
            "attention_voxels": {CLASS_NAMES[c]: n for c, n in self.attention_voxels.items()},
            "heatmap_sums": {CLASS_NAMES[c]: s for c, s in self.heatmap_sums.items()},
            "ranked_classes": [CLASS_NAMES[c] for c in self.ranked_classes],
        }

    def priority_row(self) -> dict[str, Any]:
        """A row of the priority table (:mod:`lib.activelearning.priorities`)."""
        row: dict[str, Any] = {"case_id": self.case_id, "priority": self.priority}
        row.update({f"attention_{CLASS_NAMES[c]}": n for c, n in self.attention_voxels.items()})
        row["ranked_classes"] = ";".join(CLASS_NAMES[c] for c in self.ranked_classes)
        return row


def scored_classes(target_classes: Sequence[int], context_classes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Classes to predict: the targets plus the context classes whose overlap with a target counts (default all)."""
    context = range(NUM_CLASSES) if context_classes is None else context_classes
    return tuple(sorted({int(c) for c in target_classes} | {int(c) for c in context}))


def score_probabilities(
    probs: torch.Tensor | np.ndarray,
    class_indices: Sequence[int],
    target_classes: Sequence[int] = DEFAULT_TARGET_CLASSES,
    per_slice: bool = False,
    case_id: str = "",
    opening_iterations: int = DEFAULT_OPENING_ITERATIONS,
) -> CaseScore:
    """Score ``[M, C, ...]`` ensemble probabilities whose channels are the universal ``class_indices``.

    ``opening_iterations`` is the published 2 (a 5-voxel cube that drops speckle at 1.5 mm); it counts
    voxels, so at coarse working spacings it also erases real structures (30 mm at 6 mm).
    """
    classes = tuple(int(c) for c in class_indices)
    targets = tuple(int(c) for c in target_classes)
    missing = [CLASS_NAMES[c] for c in targets if c not in classes]
    if missing or not targets:
        raise ValueError(f"target classes {missing or '(none)'} are not among the scored classes")
    array = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    maps = attention_maps(array, opening_iterations=opening_iterations)
    channels = [classes.index(c) for c in targets]
    pairs = list(zip(targets, channels, strict=True))
    return CaseScore(
        case_id=case_id,
        priority=case_priority(maps.attention, channels, per_slice=per_slice),
        target_classes=targets,
        attention_voxels={c: int(np.count_nonzero(maps.attention[k])) for c, k in pairs},
        heatmap_sums={c: float(np.sum(maps.heatmap[k], dtype=np.float64)) for c, k in pairs},
        ranked_classes=tuple(classes[k] for k in class_ranking(maps.heatmap, channels)),
        class_indices=classes,
        maps=maps,
        ensemble_size=int(array.shape[0]),
    )


def sample_case_id(sample: Mapping[str, Any]) -> str:
    """Case id (file name without volume suffix) from the image's metadata, or '' for in-memory images."""
    meta = getattr(sample.get(IMAGE_KEY), "meta", {}) or {}
    source = meta.get("filename_or_obj")
    return strip_volume_suffix(Path(str(source)).name) if source else ""


def score_case(
    models: Sequence[UniversalModel],
    sample: Mapping[str, Any],
    inference_config: InferenceConfigs,
    target_classes: Sequence[int] = DEFAULT_TARGET_CLASSES,
    *,
    context_classes: Sequence[int] | None = None,
    per_slice: bool = False,
    case_id: str | None = None,
    flips: bool | None = None,
    opening_iterations: int = DEFAULT_OPENING_ITERATIONS,
) -> CaseScore:
    """Attention score of one preprocessed sample (the output of :func:`lib.transforms.ct_pipeline`).

    ``context_classes`` (default: all) are predicted besides the targets so that a target's overlap
    with them counts, as in the published method; pass ``()`` to predict the targets alone.
    """
    classes = scored_classes(target_classes, context_classes)
    probs = ensemble_probabilities(models, sample[IMAGE_KEY][None], inference_config, classes, flips)
    case = sample_case_id(sample) if case_id is None else case_id
    return score_probabilities(probs, classes, target_classes, per_slice, case, opening_iterations)


def attention_on_original(score: CaseScore, sample: Mapping[str, Any], pipeline: CTPipeline) -> MetaTensor:
    """The score's label map moved back onto the original grid (nearest neighbour) with its affine."""
    preprocessed = MetaTensor(score.label_map().float())
    return invert_to_original({**sample, PRED_KEY: preprocessed}, pipeline, nearest=True)


# ----------------------------------------------------------------------------------------------
# What a scored case depends on (for resume)
# ----------------------------------------------------------------------------------------------


def file_stamp(path: str | Path) -> dict[str, Any]:
    """Identity of a file's current content, cheap enough for large checkpoints: path, size, mtime."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class ScoringSetup:
    """Models and settings shared by every case of a run; ``settings()`` goes into each case record."""

    models: tuple[UniversalModel, ...]
    checkpoint_stamps: tuple[dict[str, Any], ...]
    pipeline_config: CTPipelineConfig
    inference_configs: tuple[InferenceConfig, ...]
    target_classes: tuple[int, ...] = DEFAULT_TARGET_CLASSES
    context_classes: tuple[int, ...] | None = None
    per_slice: bool = False
    opening_iterations: int = DEFAULT_OPENING_ITERATIONS

    def settings(self) -> dict[str, Any]:
        context = "all" if self.context_classes is None else [CLASS_NAMES[c] for c in self.context_classes]
        return {
            "version": RECORD_VERSION,
            "spacing": list(self.pipeline_config.spacing),
            "roi_sizes": [list(c.roi_size) for c in self.inference_configs],
            "overlaps": [c.overlap for c in self.inference_configs],
            "target_classes": [CLASS_NAMES[c] for c in self.target_classes],
            "context_classes": context,
            "per_slice": self.per_slice,
            "opening_iterations": self.opening_iterations,
        }

    def fingerprint(self, entry: CaseEntry) -> dict[str, Any]:
        """Everything the case's score depends on; raises OSError when the image is missing."""
        return {"image": file_stamp(entry.image), "checkpoints": list(self.checkpoint_stamps),
                "settings": self.settings()}


def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a record either exists whole or not at all, which is what resume relies on."""
    atomic_write_text(path, json.dumps(data, indent=1))


def record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{case_id}.json"


def attention_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / "attention" / f"{case_id}.nii.gz"


def stored_row(entry: CaseEntry, setup: ScoringSetup, out_dir: Path) -> dict[str, Any] | None:
    """The priority row of an earlier run when it was computed from exactly these inputs, else None."""
    try:
        record = json.loads(record_path(out_dir, entry.case_id).read_text())
        current = json.loads(json.dumps(setup.fingerprint(entry)))  # JSON-normalised for comparison
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != current or not isinstance(record.get("row"), dict):
        return None
    return record["row"] if attention_path(out_dir, entry.case_id).is_file() else None


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def score_and_write(
    entry: CaseEntry, sample: dict, fingerprint: dict, setup: ScoringSetup, pipeline: CTPipeline, out_dir: Path
) -> dict[str, Any]:
    """Score a loaded case, write its attention NIfTI then its record (last: it marks the case done)."""
    score = score_case(
        setup.models, sample, setup.inference_configs, setup.target_classes,
        context_classes=setup.context_classes, per_slice=setup.per_slice, case_id=entry.case_id,
        opening_iterations=setup.opening_iterations,
    )
    restored = attention_on_original(score, sample, pipeline)
    nifti = write_nifti(
        attention_path(out_dir, entry.case_id), restored[0].as_tensor().round().numpy().astype(np.uint8),
        restored.affine.numpy(), "revseg attention: class index + 1",
    )
    record = {**score.summary(), "image": str(entry.image), "attention_map": str(nifti.relative_to(out_dir)),
              "row": score.priority_row(), "fingerprint": fingerprint}
    _write_json(record_path(out_dir, entry.case_id), record)
    return record["row"]


def _failure(entry: CaseEntry, error: BaseException) -> dict[str, str]:
    return {"case_id": entry.case_id, "image": str(entry.image), "where": entry.where, "error": str(error)}


def score_shard(
    entries: Sequence[CaseEntry], setup: ScoringSetup, out_dir: Path, show_progress: bool
) -> tuple[list[dict], list[dict]]:
    """Score this process's cases; (priority rows, failures). Only loading errors skip a case."""
    pipeline = ct_pipeline(setup.pipeline_config, with_label=False, load=True)
    rows, failures = [], []
    for entry in tqdm(entries, desc="attention", unit="case", disable=not show_progress):
        try:
            fingerprint = setup.fingerprint(entry)  # before loading: an edit during scoring rescores next time
            sample = pipeline({IMAGE_KEY: str(entry.image)})
        except (CTInputError, OSError) as error:
            log.error("%s: skipped, cannot be loaded: %s", entry.where, first_line(error))
            failures.append(_failure(entry, error))
            continue
        rows.append(score_and_write(entry, sample, fingerprint, setup, pipeline, out_dir))
    return rows, failures


def check_unique_ids(entries: Sequence[CaseEntry]) -> None:
    """Outputs are named by case id, so two images with one id would overwrite each other."""
    seen: dict[str, CaseEntry] = {}
    for entry in entries:
        if entry.case_id in seen:
            raise DatasetListError(
                f"{entry.where}: case id {entry.case_id!r} repeats {seen[entry.case_id].where}; outputs would clash"
            )
        seen[entry.case_id] = entry


def _axes(args: argparse.Namespace, prefix: str) -> tuple[Any, Any, Any]:
    return tuple(getattr(args, f"{prefix}_{axis}") for axis in "xyz")  # type: ignore[return-value]


def load_models(paths: Sequence[str | Path], device: torch.device | str) -> tuple[list[UniversalModel], list[dict]]:
    """(models in eval mode on ``device``, their checkpoints) in the order given."""
    models, checkpoints = [], []
    for path in paths:
        model, ckpt = build_model_from_checkpoint(path)
        models.append(model.to(device).eval())
        checkpoints.append(ckpt)
    return models, checkpoints


def trained_spacing(
    checkpoints: Sequence[Mapping[str, Any]], override: Sequence[float | None] = (None, None, None)
) -> tuple[float, float, float]:
    """Working spacing: ``override`` where given, else what the checkpoints were trained at (else the default)."""
    trained = {tuple(float(s) for s in c["train_config"]["spacing"]) for c in checkpoints if "train_config" in c}
    if len(trained) > 1 and None in override:
        raise ValueError(f"the checkpoints were trained at different spacings {sorted(trained)}; pass --space_x/y/z")
    base = trained.pop() if trained else CTPipelineConfig().spacing
    return tuple(float(o) if o is not None else b for o, b in zip(override, base, strict=True))  # type: ignore[return-value]


def model_inference_configs(
    models: Sequence[UniversalModel], roi_override: Sequence[int | None], overlap: float, device: torch.device | str
) -> tuple[InferenceConfig, ...]:
    """One config per model with the window it was trained on (batch statistics depend on it) unless overridden."""
    return tuple(
        InferenceConfig(
            roi_size=tuple(o if o is not None else t for o, t in zip(roi_override, m.config["roi_size"], strict=True)),
            overlap=overlap, device=str(device),
        )
        for m in models
    )


def parse_context(spec: str) -> tuple[int, ...] | None:
    """'all' -> None (every class), 'none' -> (), else a class list."""
    text = spec.strip().lower()
    return None if text == "all" else () if text == "none" else parse_class_list(spec)


def build_setup(args: argparse.Namespace, device: torch.device) -> ScoringSetup:
    """Load the checkpoints onto ``device`` and fix the settings every case of the run shares."""
    models, checkpoints = load_models(args.checkpoints, device)
    return ScoringSetup(
        models=tuple(models),
        checkpoint_stamps=tuple(file_stamp(p) for p in args.checkpoints),
        pipeline_config=CTPipelineConfig(spacing=trained_spacing(checkpoints, _axes(args, "space"))),
        inference_configs=model_inference_configs(models, _axes(args, "roi"), args.overlap, device),
        target_classes=parse_class_list(args.classes),
        context_classes=parse_context(args.context_classes),
        per_slice=args.per_slice,
        opening_iterations=args.opening_iterations,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="one checkpoint (ensemble of test-time flips) or two (e.g. U-Net and Swin UNETR)")
    p.add_argument("--dataset_list", required=True, help="cases to score (labels, if listed, are ignored)")
    p.add_argument("--data_root_path", default=None, help="root of the list's paths (default: the list's folder)")
    p.add_argument("--out_dir", required=True, type=Path)
    p.add_argument("--classes", default=",".join(SEED_REVISED_CLASSES),
                   help="target classes whose attention makes the priority (comma-separated)")
    p.add_argument("--context_classes", default="all",
                   help="classes predicted besides the targets so overlaps with them count ('all', 'none' or a list)")
    for axis in "xyz":
        p.add_argument(f"--space_{axis}", type=float, default=None, help="working spacing (default: as trained)")
    for axis in "xyz":
        p.add_argument(f"--roi_{axis}", type=int, default=None, help="window size (default: each model's own)")
    p.add_argument("--overlap", type=float, default=InferenceConfig.overlap, help="sliding-window overlap")
    p.add_argument("--per_slice", action="store_true", help="divide priorities by the number of axial slices")
    p.add_argument("--opening_iterations", type=int, default=DEFAULT_OPENING_ITERATIONS,
                   help="binary opening of the uncertainty/inconsistency maps, in voxels (published: 2, at 1.5 mm)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def write_outputs(out_dir: Path, rows: Sequence[dict], failures: Sequence[dict]) -> None:
    write_priority_rows(out_dir / "priorities.csv", rows)
    _write_json(out_dir / "failures.json", sorted(failures, key=lambda f: f["case_id"]))
    log.info("scored %d case(s), %d failed; priorities in %s", len(rows), len(failures), out_dir / "priorities.csv")


def run(args: argparse.Namespace) -> int:
    """One process of a (possibly torchrun-sharded) scoring run; 0 when at least one case is scored."""
    context = init_distributed(args.device)
    try:
        entries = read_dataset_list(args.dataset_list, args.data_root_path, validate=False)
        check_unique_ids(entries)
        setup = build_setup(args, context.device)
        done = {e.case_id: row for e in entries if (row := stored_row(e, setup, args.out_dir)) is not None}
        pending = [e for e in entries if e.case_id not in done]
        barrier(context)  # every rank plans from the same records before any is rewritten
        if done and context.is_main:
            log.info("resume: %d of %d case(s) already scored from the same image, checkpoints and settings; "
                     "skipping them", len(done), len(entries))
        rows, failures = score_shard(shard(pending, context, pad=False), setup, args.out_dir, context.is_main)
        gathered = gather_objects((rows, failures), context)
        all_rows = list(done.values()) + [r for part, _ in gathered for r in part]
        all_failures = [f for _, part in gathered for f in part]
        if context.is_main:
            write_outputs(args.out_dir, all_rows, all_failures)
        return 0 if all_rows else 1
    finally:
        shutdown(context)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return run(args)
    except (DatasetListError, UnknownClassError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
