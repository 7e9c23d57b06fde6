"""Published models: one current checkpoint per backbone, swapped atomically, with every round archived.

Layout under the store root::

    <backbone>/model.pt              the model inference serves (replaced by os.replace, never torn)
    <backbone>/published.json        round, time, source run and metrics of model.pt
    <backbone>/history/round_NNNN.pt every model ever published

Inference reloads when model.pt's mtime changes, so a new round is live without a restart.

A publish is write-ahead: the round is archived, model.pt's new content is written to a temp file, then
published.json (with the model's sha256) is replaced, which commits the round, then model.pt is renamed
into place. A crash between the last two renames leaves published.json one round ahead of model.pt;
opening the store (every server start and training round does) rolls model.pt forward from the archive.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from lib.atomic import atomic_copy, atomic_write_text, fsync, sha256_of, staged
from model.checkpoint import build_model_from_checkpoint
from model.universal import BACKBONES, UniversalModel, canonical_backbone

log = logging.getLogger(__name__)
T = TypeVar("T")
PUBLISH_WAIT_SECONDS = 60.0  # a publish copies one checkpoint; longer means a stuck publisher


class ModelNotReady(FileNotFoundError):
    """No model has been published yet for the requested backbone."""


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[tuple[str, str], tuple[tuple[int, int], dict[str, Any], Any]] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        for backbone in BACKBONES:
            self.recover(backbone)

    def path(self, backbone: str) -> Path:
        return self.root / canonical_backbone(backbone) / "model.pt"

    def exists(self, backbone: str) -> bool:
        return self.path(backbone).is_file()

    def info(self, backbone: str) -> dict[str, Any]:
        meta = self.path(backbone).with_name("published.json")
        return json.loads(meta.read_text()) if meta.is_file() else {}

    def _publish_lock(self, backbone: str) -> FileLock:
        """Held by every process while it publishes or recovers ``backbone``."""
        folder = self.path(backbone).parent
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / ".publish.lock"))

    def _archived(self, backbone: str, round_number: int) -> Path:
        return self.path(backbone).parent / "history" / f"round_{round_number:04d}.pt"

    def publish(self, backbone: str, checkpoint: str | Path, details: dict[str, Any] | None = None) -> Path:
        """Archive ``checkpoint`` as the next round and make it the served model (write-ahead, see above)."""
        target = self.path(backbone)
        with self._publish_lock(backbone):
            self._recover(backbone)
            round_number = int(self.info(backbone).get("round", 0)) + 1
            archived = atomic_copy(Path(checkpoint), self._archived(backbone, round_number))
            record = {**(details or {}), "round": round_number, "published_at": time.time(),
                      "source": str(checkpoint), "archived": str(archived), "sha256": sha256_of(archived)}
            with staged(target) as out, open(archived, "rb") as source:
                shutil.copyfileobj(source, out)
                fsync(out)  # the new model is on disk before the record that commits it
                atomic_write_text(target.with_name("published.json"), json.dumps(record, indent=1, default=str))
        log.info("published %s round %d from %s", backbone, round_number, checkpoint)
        return target

    def recover(self, backbone: str) -> bool:
        """Finish a publish a crash interrupted: make model.pt the round published.json commits.

        Returns whether anything was repaired. Cheap when nothing is wrong (one hash of model.pt).
        """
        if not self._needs_recovery(backbone):
            return False
        with self._publish_lock(backbone):
            return self._recover(backbone)

    def _needs_recovery(self, backbone: str) -> bool:
        digest = self.info(backbone).get("sha256")
        target = self.path(backbone)
        return bool(digest) and (not target.is_file() or sha256_of(target) != digest)

    def _recover(self, backbone: str) -> bool:
        """``recover`` with the publish lock held."""
        if not self._needs_recovery(backbone):
            return False
        record = self.info(backbone)
        archived = self._archived(backbone, int(record["round"]))
        if not archived.is_file() or sha256_of(archived) != record["sha256"]:
            log.error("%s: published.json names round %s but its archive %s is missing or differs; not touching "
                      "model.pt", backbone, record["round"], archived)
            return False
        atomic_copy(archived, self.path(backbone))
        log.warning("%s: a publish was interrupted; model.pt is now round %s, as published.json says",
                    backbone, record["round"])
        return True

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
        """``build(model path)`` once per published version; thread-safe."""
        return self.loaded(backbone, purpose, build)[1]

    def loaded(self, backbone: str, purpose: str, build: Callable[[Path], T]) -> tuple[dict[str, Any], T]:
        """(published.json, ``build(model path)``) of the same published version, built once per version.

        A publish writes published.json before it renames model.pt into place, so the two are read
        together under the publish lock: a request never reports one round while using another's weights.
        """
        path = self.path(backbone)
        key = (canonical_backbone(backbone), purpose)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one build per version and purpose; other backbones and purposes are not held up
            hit = self._cache.get(key)
            if hit is None or hit[0] != self._version(path):
                try:
                    with self._publish_lock(backbone).acquire(timeout=PUBLISH_WAIT_SECONDS):
                        self._recover(backbone)  # an interrupted publish: make model.pt what published.json says
                        version, info = self._version(path), self.info(backbone)
                        log.info("loading %s (%s): round %s", path, purpose, info.get("round"))
                        self._cache[key] = (version, info, build(path))
                except Timeout as error:
                    raise ModelNotReady(f"a {canonical_backbone(backbone)} model is being published; retry in a "
                                        "moment") from error
            _, info, value = self._cache[key]
            return info, value

    @staticmethod
    def _version(path: Path) -> tuple[int, int]:
        """Identity of the file now at ``path``: a publish renames a new file (new inode) into place."""
        try:
            stat = path.stat()
        except FileNotFoundError as error:
            raise ModelNotReady(
                f"no {canonical_backbone(path.parent.name)} model is published yet ({path}); train one first"
            ) from error
        return stat.st_ino, stat.st_mtime_ns
