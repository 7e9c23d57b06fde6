"""The training engine: round-1 full training and continual tuning, on one process or many (torchrun).

Plain PyTorch + torch.distributed and no MONAI Label imports, so the same engine serves the command
line, the experiment scripts and the MONAI Label train task (which launches it with torchrun).

Continual tuning freezes the backbone, ``precls_conv``, ``GAP`` and every head but the revised
classes'; the frozen encoder runs under ``no_grad`` and the optimiser holds only the trainable heads.

With ``cache_features`` (continual only) the frozen encoder runs once per crop instead of once per crop
per epoch: each case's random crops are drawn ``cache_draws`` times up front, encoded, and every epoch
then trains the heads on the cached (task features, head input) pairs. The cache is built inside the
timed run, so its cost is part of the wall time a run reports.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from lib.classes import CLASS_NAMES, UnknownClassError, class_indices
from lib.datalists import CaseEntry, read_dataset_list
from lib.inference import InferenceConfig, sliding_window_probabilities
from lib.metrics import dice
from lib.trainers.data import (
    CLASS_MASK_KEY,
    TrainingCase,
    cached_dataset,
    continual_training_cases,
    draw_crops,
    full_training_cases,
    training_transforms,
)
from lib.trainers.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    shard,
    shutdown,
    state_digest,
)
from lib.trainers.loss import partial_dice_bce
from lib.trainers.schedule import build_optimizer
from lib.transforms import IMAGE_KEY, LABEL_KEY, CTPipelineConfig, ct_pipeline
from model.checkpoint import load_checkpoint, load_into, load_published_backbone, save_checkpoint
from model.universal import UniversalModel, canonical_backbone, freeze_except_heads

log = logging.getLogger(__name__)

MODES = ("full", "continual")


class TrainingError(ValueError):
    """A training request that cannot run as given; the message says what to change."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Stored in every checkpoint so ``resume`` continues exactly."""

    dataset_list: list[str] = field(default_factory=list)
    data_root: str = "."
    backbone: str = "unet"
    mode: str = "full"
    run_dir: str = "runs/train"
    val_list: str | None = None
    pretrain: str | None = None
    revised_classes: list[str] = field(default_factory=list)
    replay_list: list[str] = field(default_factory=list)
    replay_fraction: float = 0.1
    priorities: str | None = None
    max_epoch: int = 100
    warmup_epoch: int = 10
    batch_size: int = 1
    num_samples: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    roi_size: tuple[int, int, int] = (96, 96, 96)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    width: float = 1.0
    embedding: str | None = None
    store_every: int = 10
    val_every: int = 10
    val_overlap: float = 0.5
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cache_gb: float = 4.0
    amp: bool = True
    time_limit_minutes: float | None = None  # stop after the epoch that crosses it (bounded bootstraps)
    cache_features: bool = False  # continual only: encode fixed crops once, then train the heads on them
    cache_draws: int = 4  # random crop draws per case in the feature cache (each draw = num_samples crops)
    cache_dtype: str = "float16"  # storage of cached features (float16 halves the memory; float32 is exact)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["roi_size"], data["spacing"] = list(self.roi_size), list(self.spacing)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.roi_size = tuple(int(v) for v in config.roi_size)  # type: ignore[assignment]
        config.spacing = tuple(float(v) for v in config.spacing)  # type: ignore[assignment]
        return config


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float = -1.0
    samples: int = 0
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Model set-up
# ----------------------------------------------------------------------------------------------


class HeadTrainingStep(nn.Module):
    """image -> logits of the trained classes. The frozen encoder runs without autograd in continual mode.

    A module (not a function) so DistributedDataParallel sees every forward and syncs the head gradients.
    """

    def __init__(self, model: UniversalModel, trained: Sequence[int], frozen_encoder: bool):
        super().__init__()
        self.model, self.trained, self.frozen_encoder = model, list(trained), frozen_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.frozen_encoder:
            with torch.no_grad():
                task_features, head_input = self.model.encode(image)
        else:
            task_features, head_input = self.model.encode(image)
        return self.model.decode(task_features, head_input, self.trained)


class CachedHeadStep(nn.Module):
    """(task features, head input) -> logits of the trained classes: the decode-only step of a cached run.

    A module so DistributedDataParallel can wrap it; only the trained heads require gradients, so only
    their gradients are all-reduced.
    """

    def __init__(self, model: UniversalModel, trained: Sequence[int]):
        super().__init__()
        self.model, self.trained = model, list(trained)

    def forward(self, task_features: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
        return self.model.decode(task_features, head_input, self.trained)


@dataclass(frozen=True)
class CachedCrops:
    """One draw of a case's crops after the frozen encoder: all a head-training step needs, on the CPU."""

    task_features: torch.Tensor  # [S, 256]
    head_input: torch.Tensor  # [S, 8, *roi]
    label: torch.Tensor  # [S, 1, *roi] uint8 universal label values
    class_mask: torch.Tensor  # [S, K] bool: classes each crop's case supervises

    @property
    def nbytes(self) -> int:
        tensors = (self.task_features, self.head_input, self.label, self.class_mask)
        return sum(t.numel() * t.element_size() for t in tensors)


CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def plain_tensor(value: Any) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor tracks metadata through every op, which slows a network pass ~1.5x."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def encode_crops(model: UniversalModel, batch: dict, device: torch.device, dtype: torch.dtype,
                 use_amp: bool) -> CachedCrops:
    """Run the frozen encoder once on a collated crop batch and keep its outputs (not the image)."""
    image = plain_tensor(batch[IMAGE_KEY]).to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=use_amp):
        task_features, head_input = model.encode(image)
    return CachedCrops(
        task_features=task_features.to("cpu", dtype), head_input=head_input.to("cpu", dtype),
        label=plain_tensor(batch[LABEL_KEY]).to(torch.uint8).cpu(),
        class_mask=plain_tensor(batch[CLASS_MASK_KEY]).bool().cpu(),
    )


def concat_crops(parts: Sequence[CachedCrops]) -> CachedCrops:
    """Several cases' cached crops as one batch (batch_size > 1)."""
    if len(parts) == 1:
        return parts[0]
    return CachedCrops(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(CachedCrops)))


def _cache_seed(config: TrainConfig, case: int, draw: int) -> int:
    """Seed of one cache draw: depends on the case and draw only, so every rank and a resume agree."""
    return (config.seed * 7_919 + case * 104_729 + draw * 1_299_709 + 17) % (2**31)


def _check_backbone(config: TrainConfig, ckpt: dict, path: str) -> None:
    found = ckpt["config"]["backbone"]
    if canonical_backbone(config.backbone) != found:
        raise TrainingError(f"{path} is a {found} checkpoint but --backbone is {canonical_backbone(config.backbone)}")


def build_model(config: TrainConfig) -> UniversalModel:
    """Fresh model for full training (optionally from a published backbone), or the previous round's."""
    if config.mode == "continual":
        if not config.pretrain:
            raise TrainingError("continual tuning starts from a previous round: pass --pretrain CHECKPOINT")
        ckpt = load_checkpoint(config.pretrain)
        _check_backbone(config, ckpt, config.pretrain)
        model = UniversalModel.from_config(ckpt["config"])
        load_into(model, ckpt)
        return model
    model = UniversalModel(
        canonical_backbone(config.backbone), CLASS_NAMES, roi_size=config.roi_size, width=config.width,
        embedding=config.embedding,
    )
    if config.pretrain:
        try:
            ckpt = load_checkpoint(config.pretrain)
        except ValueError:  # not ours: a published Universal Model backbone
            loaded = load_published_backbone(model, config.pretrain)
            log.info("initialised the backbone from %s (%d tensors)", config.pretrain, loaded)
        else:
            _check_backbone(config, ckpt, config.pretrain)
            load_into(model, ckpt)
    return model


def trained_class_indices(config: TrainConfig) -> list[int]:
    """Channels a run may train: the revised classes (continual) or all of them (full); the run then keeps
    those some training case supervises (:func:`supervised_indices`)."""
    if config.mode == "full":
        return list(range(len(CLASS_NAMES)))
    if not config.revised_classes:
        raise TrainingError("continual tuning needs --revised_classes (the classes experts changed)")
    try:
        return list(class_indices(config.revised_classes))
    except UnknownClassError as error:
        raise TrainingError(str(error)) from error


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def supervised_indices(cases: Sequence[TrainingCase]) -> list[int]:
    """Channels at least one case supervises: the heads a run trains."""
    return sorted({k for case in cases for k in case.supervised})


def _read_lists(paths: Sequence[str], root: str) -> list[CaseEntry]:
    entries: list[CaseEntry] = []
    for path in paths:
        entries += read_dataset_list(path, root, require_labels=True)
    return entries


def check_cache_config(config: TrainConfig) -> None:
    """The feature cache is only sound where the encoder is frozen."""
    if not config.cache_features:
        return
    if config.mode != "continual":
        raise TrainingError("--cache_features needs --continual_tuning: full training changes the encoder")
    if config.cache_draws < 1:
        raise TrainingError(f"--cache_draws must be at least 1, got {config.cache_draws}")
    if config.cache_dtype not in CACHE_DTYPES:
        raise TrainingError(f"--cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {config.cache_dtype!r}")


def training_cases(config: TrainConfig, trained: Sequence[int]) -> list[TrainingCase]:
    if not config.dataset_list:
        raise TrainingError("no --dataset_list given")
    entries = _read_lists(config.dataset_list, config.data_root)
    if config.mode == "full":
        return full_training_cases(entries)
    pool = _read_lists(config.replay_list, config.data_root) if config.replay_list else []
    cases = continual_training_cases(
        entries, pool, trained, config.replay_fraction, config.priorities, config.seed
    )
    if not cases:
        raise TrainingError("no training case supervises the revised classes")
    return cases


def _epoch_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    return (config.seed * 1_000_003 + epoch * 10_007 + rank) % (2**31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class Trainer:
    """One training run. Every epoch is a pure function of (weights, config, epoch), so resume is exact."""

    def __init__(self, config: TrainConfig, context: DistContext, resume: str | None = None):
        self.config, self.ctx = config, context
        self.run_dir = Path(config.run_dir)
        self.state = RunState()
        seed_everything(config.seed)
        resumed = load_checkpoint(resume) if resume else None
        if resumed is not None:
            _check_backbone(config, resumed, resume or "")
            self.model = UniversalModel.from_config(resumed["config"])
            load_into(self.model, resumed)
        else:
            self.model = build_model(config)
        if tuple(self.model.class_names) != CLASS_NAMES:
            missing = [n for n in CLASS_NAMES if n not in self.model.class_names]
            raise TrainingError(
                f"{resume or config.pretrain}: the model's classes differ from the class template "
                f"(missing {missing[:6]}{'...' if len(missing) > 6 else ''}); revseg trains the universal template"
            )
        self.model.to(context.device)
        check_cache_config(config)
        self.cases = training_cases(config, trained_class_indices(config))
        self.trained = supervised_indices(self.cases)
        continual = config.mode == "continual"
        if continual:
            freeze_except_heads(self.model, [self.model.class_names[k] for k in self.trained])
            self.model.eval()  # frozen BatchNorm/Dropout state; ContBatchNorm still normalises per batch
        else:
            # Heads no case supervises get no gradient: skip them (a quarter of a step here) and keep them
            # out of DDP's gradient reduction; they keep their weights and inference does not serve them.
            for k, controller in enumerate(self.model.controllers):
                controller.requires_grad_(k in self.trained)
            self.model.train()
        step: nn.Module
        if config.cache_features:
            step = CachedHeadStep(self.model, self.trained)
        else:
            step = HeadTrainingStep(self.model, self.trained, frozen_encoder=continual)
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            step = DistributedDataParallel(step, device_ids=device_ids)
        self.step_module = step

        self.supervised_classes = supervised_class_names(self.cases, resumed or _pretrain_checkpoint(config))
        self.pipeline = CTPipelineConfig(spacing=config.spacing)
        self.transforms = training_transforms(self.pipeline, config.roi_size, config.num_samples)
        self.dataset = cached_dataset(self.cases, self.transforms, config.spacing, config.cache_gb)
        self.steps_per_epoch = len(shard(range(len(self.cases)), context)) // config.batch_size or 1
        total = self.steps_per_epoch * config.max_epoch
        self.optimizer, self.scheduler = build_optimizer(
            self.model.parameters(), config.lr, config.weight_decay, self.steps_per_epoch * config.warmup_epoch, total
        )
        self.use_amp = config.amp and context.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if resumed is not None:
            self._restore(resumed)
        self.val_entries = read_dataset_list(config.val_list, config.data_root, True) if config.val_list else []
        self._val_cache: dict[str, dict] = {}
        self.feature_cache: dict[int, list[CachedCrops]] | None = None
        self.cache_seconds = 0.0
        self.validation_seconds = 0.0
        self.writer = self._tensorboard() if context.is_main else None

    # -- bookkeeping ---------------------------------------------------------------------------

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=self.state.global_step or None)

    def _restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        run = ckpt["run_state"]
        self.state = RunState(
            epoch=int(run["epoch"]), global_step=int(run["global_step"]), best_metric=float(run["best_metric"]),
            samples=int(run["samples"]), history=list(run.get("history", [])),
        )
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("resumed at epoch %d (step %d)", self.state.epoch, self.state.global_step)

    def _save(self, name: str) -> Path | None:
        """Atomic checkpoint on rank 0 (temp file + rename inside save_checkpoint)."""
        if not self.ctx.is_main:
            return None
        return save_checkpoint(
            self.run_dir / "checkpoints" / name, self.model,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), run_state=asdict(self.state), torch_rng=torch.get_rng_state(),
            train_config=self.config.to_dict(), mode=self.config.mode,
            trained_classes=[CLASS_NAMES[k] for k in self.trained],
            supervised_classes=self.supervised_classes,
        )

    def _log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key.replace(".", "/"), value, record["step"])
            self.writer.flush()

    # -- training --------------------------------------------------------------------------------

    def _epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.config, epoch, 0))
        order = torch.randperm(len(self.cases), generator=generator).tolist()
        return shard(order, self.ctx)

    def _image_batches(self, epoch: int, seed: int):
        """(inputs, label, class mask) of this epoch's steps from freshly drawn crops of this rank's shard."""
        self.transforms.set_random_state(seed=seed)
        loader = DataLoader(
            Subset(self.dataset, self._epoch_indices(epoch)), batch_size=self.config.batch_size, shuffle=False,
            num_workers=self.config.num_workers, drop_last=True,
        )
        for batch in loader:
            yield (plain_tensor(batch[IMAGE_KEY]),), plain_tensor(batch[LABEL_KEY]), batch[CLASS_MASK_KEY]

    # -- feature cache (continual tuning with a frozen encoder) -----------------------------------

    def _cached_cases(self) -> list[int]:
        """This rank's fixed share of the cases (padded, so every rank takes the same number of steps)."""
        return shard(range(len(self.cases)), self.ctx)

    def build_feature_cache(self) -> dict[int, list[CachedCrops]]:
        """Encode ``cache_draws`` seeded crop draws of each of this rank's cases once (idempotent)."""
        if self.feature_cache is not None:
            return self.feature_cache
        started = time.perf_counter()
        dtype = CACHE_DTYPES[self.config.cache_dtype]
        cache: dict[int, list[CachedCrops]] = {}
        cases = sorted(set(self._cached_cases()))
        for case in tqdm(cases, desc="feature cache", disable=not self.ctx.is_main, leave=False, unit="case"):
            cache[case] = [
                encode_crops(self.model, draw_crops(self.dataset, self.transforms, case,
                                                    _cache_seed(self.config, case, draw)),
                             self.ctx.device, dtype, self.use_amp)
                for draw in range(self.config.cache_draws)
            ]
        self.feature_cache = cache
        self.cache_seconds = time.perf_counter() - started
        megabytes = sum(c.nbytes for draws in cache.values() for c in draws) / 2**20
        log.info("feature cache: %d crops of %d cases encoded once in %.1fs (%.0f MB, %s)",
                 sum(c.label.shape[0] for draws in cache.values() for c in draws), len(cache), self.cache_seconds,
                 megabytes, self.config.cache_dtype)
        return cache

    def _cached_batches(self, epoch: int):
        """(inputs, label, class mask) of this epoch's steps from the cache: draw ``epoch % cache_draws``."""
        cache = self.build_feature_cache()
        mine = self._cached_cases()
        generator = torch.Generator().manual_seed(_epoch_seed(self.config, epoch, self.ctx.rank))
        order = [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]
        size = self.config.batch_size
        for start in range(0, len(order) - size + 1, size):
            crops = concat_crops([cache[case][epoch % self.config.cache_draws] for case in order[start:start + size]])
            yield (crops.task_features, crops.head_input), crops.label, crops.class_mask

    # -- training --------------------------------------------------------------------------------

    def _train_step(
        self, inputs: Sequence[torch.Tensor], label: torch.Tensor, class_mask: torch.Tensor
    ) -> torch.Tensor:
        """One optimiser step on a batch (an image, or cached encoder outputs); returns the detached loss."""
        device = self.ctx.device
        values = torch.tensor([k + 1 for k in self.trained], device=device).view(1, -1, 1, 1, 1)
        target = (label.to(device) == values).float()
        mask = torch.as_tensor(class_mask)[:, self.trained].to(device)
        with torch.autocast(device.type, enabled=self.use_amp):
            logits = self.step_module(*(x.to(device).float() for x in inputs))
        loss = partial_dice_bce(logits, target, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def train_epoch(self, epoch: int) -> float:
        """One pass over this rank's shard; returns the mean loss over all ranks."""
        seed = _epoch_seed(self.config, epoch, self.ctx.rank)
        seed_everything(seed)
        batches = self._cached_batches(epoch) if self.config.cache_features else self._image_batches(epoch, seed)
        loss_sum, steps = torch.zeros(()), 0
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{self.config.max_epoch}", disable=not self.ctx.is_main,
                        leave=False, unit="step", total=self.steps_per_epoch)
        for inputs, label, class_mask in progress:
            loss = self._train_step(inputs, label, class_mask)
            self.state.global_step += 1
            steps += 1
            loss_sum += loss.cpu()
            self.state.samples += inputs[0].shape[0] * self.ctx.world_size
            progress.set_postfix(loss=f"{loss.item():.4f}")
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps))]), self.ctx)
        return float(totals[0] / totals[1].clamp_min(1))

    # -- validation ------------------------------------------------------------------------------

    def _val_sample(self, entry: CaseEntry) -> dict:
        if entry.case_id not in self._val_cache:
            pipeline = ct_pipeline(self.pipeline, with_label=True)
            self._val_cache[entry.case_id] = pipeline({IMAGE_KEY: str(entry.image), LABEL_KEY: str(entry.label)})
        return self._val_cache[entry.case_id]

    def validate(self) -> dict[str, float]:
        """Mean Dice per class over the validation cases that annotate it and where the class is in the truth
        or the prediction (sharded, reduced over ranks)."""
        started = time.perf_counter()
        try:
            return self._validate()
        finally:
            self.validation_seconds += time.perf_counter() - started

    def _validate(self) -> dict[str, float]:
        sums, counts = torch.zeros(len(CLASS_NAMES)), torch.zeros(len(CLASS_NAMES))
        infer = InferenceConfig(roi_size=tuple(self.config.roi_size), overlap=self.config.val_overlap,
                                device=str(self.ctx.device))
        for entry in shard(self.val_entries, self.ctx, pad=False):
            sample = self._val_sample(entry)
            probs = sliding_window_probabilities(self.model, sample[IMAGE_KEY][None], infer)[0]
            label = torch.as_tensor(sample[LABEL_KEY])[0]
            for k in entry.classes:
                predicted, truth = (probs[k] > 0.5).numpy(), (label == k + 1).numpy()
                if predicted.any() or truth.any():  # empty vs empty says nothing about the model
                    sums[k] += dice(predicted, truth)
                    counts[k] += 1
        if self.config.mode == "continual":
            self.model.eval()
        else:
            self.model.train()
        totals = all_reduce_sum(torch.stack([sums, counts]), self.ctx)
        return {CLASS_NAMES[k]: float(totals[0, k] / totals[1, k]) for k in range(len(CLASS_NAMES)) if totals[1, k]}

    def _selection_metric(self, per_class: dict[str, float]) -> float:
        wanted = [CLASS_NAMES[k] for k in self.trained if CLASS_NAMES[k] in per_class]
        return float(np.mean([per_class[n] for n in wanted])) if wanted else float("nan")

    # -- the loop --------------------------------------------------------------------------------

    def _out_of_time(self, wall_start: float) -> bool:
        """Same answer on every rank (rank 0 decides), so all ranks stop after the same epoch."""
        if self.config.time_limit_minutes is None:
            return False
        over = float(time.perf_counter() - wall_start > 60 * self.config.time_limit_minutes)
        return bool(gather_objects(over, self.ctx)[0])

    def run(self) -> dict:
        config = self.config
        if self.ctx.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
            log.info("%s training: %d cases (%s), %d steps/epoch, %d epochs, trained classes: %s, world size %d",
                     config.mode, len(self.cases), _roles(self.cases), self.steps_per_epoch, config.max_epoch,
                     [CLASS_NAMES[k] for k in self.trained],
                     self.ctx.world_size)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        if config.cache_features:
            self.build_feature_cache()
        for epoch in range(self.state.epoch, config.max_epoch):
            started = time.perf_counter()
            loss = self.train_epoch(epoch)
            self.state.epoch = epoch + 1
            record: dict[str, Any] = {"epoch": self.state.epoch, "step": self.state.global_step, "loss": loss,
                                      "lr": self.scheduler.get_last_lr()[0], "epoch_seconds": 0.0,
                                      "samples": self.state.samples}
            last = self.state.epoch == config.max_epoch
            out_of_time = self._out_of_time(wall_start)
            if self.val_entries and (self.state.epoch % config.val_every == 0 or last or out_of_time):
                validation_started = self.validation_seconds
                per_class = self.validate()
                record["val_seconds"] = self.validation_seconds - validation_started
                metric = self._selection_metric(per_class)
                record.update({f"val_dice.{name}": value for name, value in per_class.items()})
                record["val_metric"] = metric
                if metric == metric and metric > self.state.best_metric:
                    self.state.best_metric = metric
                    self._save("best.pt")
            record["epoch_seconds"] = time.perf_counter() - started
            self.state.history.append({k: v for k, v in record.items() if not k.startswith("val_dice.")})
            self._log(record)
            if self.ctx.is_main:
                remaining = (config.max_epoch - self.state.epoch) * record["epoch_seconds"]
                log.info("epoch %d/%d loss %.4f%s (%.1fs, ETA %.0fs)", self.state.epoch, config.max_epoch, loss,
                         f" val {record['val_metric']:.4f}" if "val_metric" in record else "",
                         record["epoch_seconds"], remaining)
            if self.state.epoch % config.store_every == 0 or last or out_of_time:
                self._save(f"epoch_{self.state.epoch:04d}.pt")
                self._save("last.pt")
            barrier(self.ctx)
            if out_of_time:
                log.info("time limit of %.1f min reached after epoch %d", config.time_limit_minutes, self.state.epoch)
                break
        timing = all_reduce_sum(torch.tensor([time.process_time() - cpu_start]), self.ctx)
        digests = gather_objects(state_digest(self.model), self.ctx)
        summary = {
            "mode": config.mode, "epochs": self.state.epoch, "steps": self.state.global_step,
            "samples": self.state.samples, "wall_seconds": time.perf_counter() - wall_start,
            "process_cpu_seconds": float(timing[0]), "world_size": self.ctx.world_size,
            "validation_seconds": self.validation_seconds, "cache_seconds": self.cache_seconds,
            "cache_features": config.cache_features,
            "best_val_metric": self.state.best_metric, "trained_classes": [CLASS_NAMES[k] for k in self.trained],
            "final_checkpoint": str(self.run_dir / "checkpoints" / "last.pt"),
            "replica_digests": digests,
        }
        if len(set(digests)) > 1:
            log.error("replicas diverged: weight digests differ across ranks %s", digests)
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if self.writer is not None:
                self.writer.close()
        return summary


def _pretrain_checkpoint(config: TrainConfig) -> dict | None:
    try:
        return load_checkpoint(config.pretrain) if config.pretrain else None
    except ValueError:  # a published backbone, not a revseg checkpoint
        return None


def supervised_class_names(cases: Sequence[TrainingCase], previous: dict | None) -> list[str]:
    """Classes any training so far has supervised: the ones whose heads predict something meaningful.

    Inference serves only these, so heads that never saw a label (e.g. tumours in a cohort without
    them) cannot paint noise over the CT.
    """
    seen = {CLASS_NAMES[k] for case in cases for k in case.supervised}
    seen |= set((previous or {}).get("supervised_classes", []))
    return [name for name in CLASS_NAMES if name in seen]


def _roles(cases: Sequence[TrainingCase]) -> str:
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.role] = counts.get(case.role, 0) + 1
    return ", ".join(f"{n} {role}" for role, n in counts.items())


def run_training(config: TrainConfig, resume: str | None = None) -> dict:
    """Entry point for one process of a (possibly distributed) run."""
    if config.mode not in MODES:
        raise TrainingError(f"mode must be one of {MODES}, got {config.mode!r}")
    context = init_distributed(config.device)
    trainer = None
    try:
        trainer = Trainer(config, context, resume)
        return trainer.run()
    finally:
        # DDP's reducer holds the process group: release it first, so destroy_process_group tears gloo's
        # threads down now rather than during interpreter shutdown, where gloo can abort the process.
        del trainer
        gc.collect()
        shutdown(context)
