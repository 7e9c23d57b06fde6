"""MONAI Label train task: one click in Slicer launches the engine under torchrun, then publishes the model.

MONAI Label's own multi-GPU path spawns NCCL workers and never runs on CPU; launching torchrun
instead gives one code path for CPU (gloo) and GPU (NCCL) alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning.priorities import write_priority_rows
from lib.app_config import AppConfig
from lib.atomic import atomic_write_text
from lib.classes import CLASS_NAMES, parse_class_list
from lib.datalists import ALL_CLASSES, CaseEntry
from lib.datastore import RevisionDatastore
from lib.model_store import ModelStore
from lib.paths import REPO_ROOT
from lib.trainers.engine import TrainingError
from lib.trainers.forgetting import forgetting_guard
from lib.trainers.revisions import union_of_revised

log = logging.getLogger(__name__)

PRETRAINED_DIR = REPO_ROOT / "pretrained_checkpoints"
PUBLISHED_NAMES = {"unet": "unet.pth", "swin_unetr": "swinunetr.pth"}
ATTENTION_INFO_KEY = "attention"


def _die_with_parent() -> None:
    """Linux: torchrun gets SIGTERM when the train task dies (e.g. the server is killed), so no orphan
    round keeps running and publishing after the server is gone."""
    with contextlib.suppress(OSError):  # not Linux: no parent-death signal, nothing else changes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TrainingBusy(RuntimeError):
    """A training round for this model is already running."""


def _lines(rows: list[tuple[str, str, list[str] | None]]) -> str:
    return "".join("\t".join([image, label, *([",".join(classes)] if classes else [])]) + "\n"
                   for image, label, classes in rows)


class RevisionTrainTask(TrainTask):
    """Continual tuning on expert revisions (default once a model is published), or full training."""

    def __init__(self, backbone: str, store: ModelStore, config: AppConfig):
        super().__init__(f"Train the {backbone} universal model on expert revisions (continual tuning or full)")
        self.backbone, self.store, self.app_config = backbone, store, config

    def config(self) -> dict[str, Any]:
        return {"mode": "auto", "max_epochs": self.app_config.train_epochs, "revised_classes": "", "lr": 1e-4,
                "replay_fraction": self.app_config.replay_fraction, "gpus": "all",
                "forgetting_margin": self.app_config.forgetting_margin}

    def stats(self) -> dict[str, Any]:
        last = self.store.root / self.backbone / "last_train.json"
        return {"published": self.store.info(self.backbone),
                "last_train": json.loads(last.read_text()) if last.is_file() else {}}

    # -- the round -------------------------------------------------------------------------

    def __call__(self, request: dict[str, Any], datastore: RevisionDatastore) -> dict[str, Any]:
        lock = FileLock(str(self.store.root / f".{self.backbone}.train.lock"))
        self.store.root.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout as error:
            raise TrainingBusy(f"a {self.backbone} training round is already running") from error
        try:
            return self._train(request, datastore)
        finally:
            lock.release()

    def _mode(self, request: dict[str, Any]) -> str:
        mode = str(request.get("mode", "auto"))
        if mode == "auto":
            return "continual" if self.store.exists(self.backbone) else "full"
        if mode not in ("continual", "full"):
            raise TrainingError(f"mode must be auto, continual or full, got {mode!r}")
        if mode == "continual" and not self.store.exists(self.backbone):
            raise TrainingError(f"continual tuning needs a published {self.backbone} model; train with mode=full first")
        return mode

    def _train(self, request: dict[str, Any], datastore: RevisionDatastore) -> dict[str, Any]:
        mode = self._mode(request)
        run_dir = self.app_config.runs / self.backbone / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{mode}"
        run_dir.mkdir(parents=True, exist_ok=True)
        args, details = (self._continual_args if mode == "continual" else self._full_args)(request, datastore, run_dir)
        epochs = int(request.get("max_epochs", self.app_config.train_epochs))
        args += ["--backbone", self.backbone, "--run_dir", str(run_dir), "--data_root_path", "/",
                 "--max_epoch", str(epochs), "--warmup_epoch", str(max(1, min(10, epochs // 10))),
                 "--store_num", str(max(1, epochs // 4)), "--device", self.app_config.device]
        if "lr" in request:
            args += ["--lr", str(float(request["lr"]))]
        for axis, roi, spacing in zip("xyz", self.app_config.roi_size, self.app_config.spacing, strict=True):
            args += [f"--roi_{axis}", str(roi), f"--space_{axis}", str(spacing)]
        self._launch(args, request, run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        candidate = run_dir / "checkpoints" / "last.pt"
        result = {"mode": mode, "run_dir": str(run_dir), **details,
                  **{k: summary[k] for k in ("wall_seconds", "epochs", "steps", "samples", "world_size")}}
        if self.store.exists(self.backbone):
            revised = details.get("revised_classes") or union_of_revised(datastore.revised_cases())
            margin = float(request.get("forgetting_margin", self.app_config.forgetting_margin))
            result["forgetting_guard"] = self._guard(candidate, datastore, revised, margin)
        if result.get("forgetting_guard", {}).get("passed", True):
            self.store.publish(self.backbone, candidate, {"mode": mode, "run_dir": str(run_dir), **details})
            result |= {"published": True, "round": self.store.info(self.backbone)["round"]}
        else:
            guard = result["forgetting_guard"]
            result |= {"published": False, "round": self.store.info(self.backbone).get("round"),
                       "reason": f"forgetting guard: {guard['worst_class']} lost {guard['worst_drop']:.3f} Dice "
                                 f"(margin {guard['margin']}); the previous model stays published"}
            log.warning(result["reason"])
        atomic_write_text(self.store.root / self.backbone / "last_train.json", json.dumps(result, indent=1))
        return result

    def _guard(self, candidate: Path, datastore: RevisionDatastore, revised: list[str], margin: float,
               ) -> dict[str, Any]:
        """Unrevised classes on the experts' final labels (which the experts approved), before vs after.

        A full retraining almost always moves those by more than a Dice point; an admin who wants it
        anyway sends a larger ``forgetting_margin`` with the request (1 accepts any result).
        """
        entries = [CaseEntry(Path(c["image"]), Path(c["label"]), ALL_CLASSES, 0) for c in datastore.revised_cases()]
        guarded = [k for k in ALL_CLASSES if CLASS_NAMES[k] not in revised]
        return forgetting_guard(self.store.path(self.backbone), candidate, entries, guarded,
                                margin, self.app_config.pipeline(),
                                self.app_config.inference())

    def _continual_args(self, request, datastore: RevisionDatastore, run_dir: Path) -> tuple[list[str], dict]:
        revised = [c for c in datastore.revised_cases() if c["revised_classes"]]
        if not revised:
            raise TrainingError("no submitted label revises any class yet: submit a corrected label first")
        named = request.get("revised_classes") or ""
        classes = [CLASS_NAMES[k] for k in parse_class_list(named)] if named else union_of_revised(revised)
        rows = [(c["image"], c["label"], [n for n in c["revised_classes"] if n in classes]) for c in revised]
        rows = [r for r in rows if r[2]]
        (run_dir / "revised.txt").write_text(_lines(rows))
        revised_ids = {c["id"] for c in revised}
        pool = [i for i in datastore.get_labeled_images(DefaultLabelTag.ORIGINAL.value) if i not in revised_ids]
        (run_dir / "replay_pool.txt").write_text(_lines(
            [(datastore.get_image_uri(i), datastore.get_label_uri(i, DefaultLabelTag.ORIGINAL.value), None)
             for i in pool]))
        args = ["--continual_tuning", "--pretrain", str(self.store.path(self.backbone)),
                "--dataset_list", str(run_dir / "revised.txt"), "--revised_classes", ",".join(classes),
                "--replay_fraction", str(request.get("replay_fraction", self.app_config.replay_fraction))]
        if pool:
            args += ["--replay_list", str(run_dir / "replay_pool.txt")]
            priorities = [{"case_id": i, "priority": info[ATTENTION_INFO_KEY]["priority"]} for i in pool
                          if ATTENTION_INFO_KEY in (info := datastore.get_image_info(i))]
            if priorities:
                args += ["--priorities", str(write_priority_rows(run_dir / "priorities.csv", priorities))]
        return args, {"revised_classes": classes, "revised_cases": len(rows), "replay_pool": len(pool)}

    def _full_args(self, request, datastore: RevisionDatastore, run_dir: Path) -> tuple[list[str], dict]:
        rows = []
        for image_id in datastore.list_images():
            labels = datastore.get_labels_by_image_id(image_id)
            tag = next((t for t in (DefaultLabelTag.FINAL.value, DefaultLabelTag.ORIGINAL.value) if t in labels), None)
            if tag:
                rows.append((datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, tag), None))
        if not rows:
            raise TrainingError("no labelled images to train on")
        (run_dir / "train.txt").write_text(_lines(rows))
        args = ["--dataset_list", str(run_dir / "train.txt"), "--width", str(self.app_config.width)]
        pretrained = PRETRAINED_DIR / PUBLISHED_NAMES[self.backbone]
        if pretrained.is_file():
            args += ["--pretrain", str(pretrained)]
        return args, {"cases": len(rows), "pretrained": str(pretrained) if pretrained.is_file() else None}

    def _launch(self, args: list[str], request: dict[str, Any], run_dir: Path) -> None:
        """torchrun: one process per visible GPU (NCCL), else ``train_processes`` CPU processes (gloo)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        gpus = str(request.get("gpus", "all"))
        if torch.cuda.is_available() and self.app_config.device != "cpu":
            if gpus != "all":
                env["CUDA_VISIBLE_DEVICES"] = gpus
            nproc = len(gpus.split(",")) if gpus != "all" else torch.cuda.device_count()
        else:
            nproc = self.app_config.train_processes
            env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO_ROOT / "train.py"), *args]
        log.info("launching: %s", " ".join(cmd))
        with open(run_dir / "train.log", "w") as output:
            process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, preexec_fn=_die_with_parent)
            for line in process.stdout or []:  # tee: the run folder keeps the log, MONAI Label shows progress
                output.write(line)
                sys.stdout.write(line)
            returncode = process.wait()
        if returncode != 0:
            tail = (run_dir / "train.log").read_text()[-2000:]
            raise TrainingError(f"training exited with code {returncode}; log {run_dir / 'train.log'}:\n{tail}")
