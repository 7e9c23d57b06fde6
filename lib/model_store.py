"""Published models: one current checkpoint per backbone, swapped atomically, with every round archived.

Layout under the store root::

    <backbone>/model.pt              the model inference serves (replaced by os.replace, never torn)
    <backbone>/published.json        round, time, source run and metrics of model.pt
    <backbone>/history/round_NNNN.pt every model ever published

Inference reloads when model.pt's mtime changes, so a new round is live without a restart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lib.atomic import atomic_copy, atomic_write_text
from model.checkpoint import build_model_from_checkpoint
from model.universal import UniversalModel, canonical_backbone

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelNotReady(FileNotFoundError):
    """No model has been published yet for the requested backbone."""


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def path(self, backbone: str) -> Path:
        return self.root / canonical_backbone(backbone) / "model.pt"

    def exists(self, backbone: str) -> bool:
        return self.path(backbone).is_file()

    def info(self, backbone: str) -> dict[str, Any]:
        meta = self.path(backbone).with_name("published.json")
        return json.loads(meta.read_text()) if meta.is_file() else {}

    def publish(self, backbone: str, checkpoint: str | Path, details: dict[str, Any] | None = None) -> Path:
        """Archive ``checkpoint`` as the next round and make it the served model, atomically."""
        target = self.path(backbone)
        history = target.parent / "history"
        history.mkdir(parents=True, exist_ok=True)
        round_number = int(self.info(backbone).get("round", 0)) + 1
        archived = history / f"round_{round_number:04d}.pt"
        atomic_copy(Path(checkpoint), archived)
        atomic_copy(archived, target)
        record = {"round": round_number, "published_at": time.time(), "source": str(checkpoint),
                  "archived": str(archived), **(details or {})}
        atomic_write_text(target.with_name("published.json"), json.dumps(record, indent=1, default=str))
        log.info("published %s round %d from %s", backbone, round_number, checkpoint)
        return target

    def model(self, backbone: str, device: str = "cpu") -> UniversalModel:
        """The published model in eval mode on ``device``, reloaded when a new round is published."""
        return self.cached(
            backbone, f"model@{device}", lambda path: build_model_from_checkpoint(path)[0].to(device).eval()
        )

    def published_models(self, backbones: Sequence[str], device: str = "cpu") -> list[UniversalModel]:
        return [self.model(b, device) for b in backbones if self.exists(b)]

    def stamp(self, backbones: Sequence[str]) -> dict[str, Any]:
        """Which published versions a result was computed with (to know when it is stale)."""
        return {b: {"round": self.info(b).get("round"), "mtime": self.path(b).stat().st_mtime}
                for b in backbones if self.exists(b)}

    def cached(self, backbone: str, purpose: str, build: Callable[[Path], T]) -> T:
        """``build(model path)`` once per published version (keyed by mtime); thread-safe."""
        path = self.path(backbone)
        if not path.is_file():
            raise ModelNotReady(
                f"no {canonical_backbone(backbone)} model is published yet ({path}); train one first"
            )
        mtime = path.stat().st_mtime
        key = (canonical_backbone(backbone), purpose)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None or hit[0] != mtime:
                log.info("loading %s (%s) published at mtime %.0f", path, purpose, mtime)
                self._cache[key] = (mtime, build(path))
            return self._cache[key][1]
