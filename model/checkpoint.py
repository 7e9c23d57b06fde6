"""Saving, loading and validating revseg checkpoints, and importing published backbones.

A revseg checkpoint is self-describing (``config`` rebuilds the architecture) so a wrong file is refused
with a message saying what differs instead of a wall of missing/unexpected keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.universal import UniversalModel

log = logging.getLogger(__name__)

FORMAT = "revseg-universal-v1"
_RESERVED = ("format", "config", "state_dict")
_WRAPPER_KEYS = ("net", "state_dict", "model")  # where published/seed checkpoints nest their weights
_STRIP_PREFIXES = ("module.", "backbone.")  # DataParallel / Universal_model wrappers
_OUTPUT_PREFIXES = ("out.", "out_tr.")  # task-specific output layers, never transferable
# BatchNorm's scalar step counter: matches any BN model by shape, carries no weights.
_COUNTER_SUFFIX = "num_batches_tracked"


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort where directories cannot be opened (e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: UniversalModel, **extra: Any) -> Path:
    """Write model config + weights (+ ``extra``) atomically, so a crash never leaves a truncated file.

    Tensors are moved to CPU so the file loads anywhere. Returns the path written.
    """
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite reserved checkpoint fields {list(_RESERVED)}")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _torch_load(path: Path, map_location: Any, allow_pickle: bool = False) -> Any:
    """torch.load restricted to tensors/containers by default, with errors that name the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle, zip and weights_only errors have no common base class
        raise ValueError(f"{path} is not a loadable torch checkpoint: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a revseg checkpoint, refusing any other file with a message naming it."""
    path = Path(path)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path} is not a revseg checkpoint (expected format {FORMAT!r}, found {found!r})")
    if not isinstance(ckpt.get("config"), Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{path} is a damaged revseg checkpoint: 'config' or 'state_dict' missing")
    return dict(ckpt)


def _describe_class_change(expected: list[str], found: list[str]) -> str:
    """Human summary of how the checkpoint's class list differs from the model's."""
    added = [n for n in expected if n not in found]
    removed = [n for n in found if n not in expected]
    parts = []
    if added:
        parts.append(f"added in model {added}")
    if removed:
        parts.append(f"removed from model {removed}")
    if not parts:
        parts.append(f"reordered: checkpoint {found} vs model {expected}")
    return "class names " + "; ".join(parts)


def config_differences(model_config: Mapping[str, Any], ckpt_config: Mapping[str, Any]) -> list[str]:
    """Architecture differences that make the checkpoint's weights unusable for the model.

    ``roi_size`` is deliberately ignored: the weights of both backbones do not depend on it.
    """
    diffs = []
    expected, found = list(model_config["class_names"]), list(ckpt_config.get("class_names", []))
    if expected != found:
        diffs.append(_describe_class_change(expected, found))
    kind = {True: "fixed", False: "learned"}
    pairs = {
        "backbone": (ckpt_config.get("backbone"), model_config["backbone"]),
        "width": (ckpt_config.get("width"), model_config["width"]),
        "embedding dim": (ckpt_config.get("embedding_dim"), model_config["embedding_dim"]),
        "embedding": (
            kind[bool(ckpt_config.get("fixed_embedding", False))],
            kind[bool(model_config["fixed_embedding"])],
        ),
    }
    for label, (in_ckpt, in_model) in pairs.items():
        if in_ckpt != in_model:
            diffs.append(f"{label}: checkpoint {in_ckpt} vs model {in_model}")
    return diffs


def load_into(model: UniversalModel, ckpt: Mapping[str, Any]) -> None:
    """Load a checkpoint's weights, refusing (ValueError) when its architecture differs from ``model``'s."""
    diffs = config_differences(model.config, ckpt["config"])
    if diffs:
        raise ValueError("checkpoint does not match the model: " + "; ".join(diffs))
    model.load_state_dict(ckpt["state_dict"], strict=True)


def build_model_from_checkpoint(
    path: str | Path,
    map_location: Any = "cpu",
) -> tuple[UniversalModel, dict[str, Any]]:
    """Rebuild the model described by a checkpoint and load its weights; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = UniversalModel.from_config(ckpt["config"])
    load_into(model, ckpt)
    return model.to(map_location) if isinstance(map_location, str | torch.device) else model, ckpt


def unwrap_state_dict(obj: Any) -> Mapping[str, Any] | None:
    """Find the state dict in a published checkpoint: top level, or under ``net``/``state_dict``/``model``."""
    if not isinstance(obj, Mapping):
        return None
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):  # a whole pickled model (only with allow_pickle)
            return inner.state_dict()
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj if any(isinstance(v, torch.Tensor) for v in obj.values()) else None


def strip_prefixes(key: str) -> str:
    """Remove any run of ``module.`` / ``backbone.`` prefixes (DataParallel and Universal_model wrapping)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def is_transferable(key: str) -> bool:
    """Backbone keys worth importing: not an output layer, not a step counter."""
    return not key.startswith(_OUTPUT_PREFIXES) and not key.endswith(_COUNTER_SUFFIX)


def match_backbone_tensors(
    source: Mapping[str, Any], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Select source tensors whose stripped name and shape match a transferable tensor of ``target``.

    Returns (matched tensors under target names, names skipped because only the shape differed).
    """
    matched: dict[str, torch.Tensor] = {}
    shape_mismatch = []
    for raw_key, value in source.items():
        key = strip_prefixes(raw_key)
        if not isinstance(value, torch.Tensor) or not is_transferable(key) or key not in target:
            continue
        if value.shape != target[key].shape:
            shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
            continue
        matched[key] = value
    return matched, shape_mismatch


def load_published_backbone(
    model: UniversalModel | nn.Module,
    path: str | Path,
    allow_pickle: bool = False,
) -> int:
    """Initialise the backbone from a published CLIP-Driven Universal Model checkpoint.

    Returns the number of tensors loaded.

    Only backbone tensors whose name and shape match are copied; output layers, heads and embeddings are
    skipped. ``allow_pickle`` permits full unpickling (only for files from a trusted source whose extra
    entries are not plain tensors/containers).
    """
    path = Path(path)
    backbone = model.backbone if isinstance(model, UniversalModel) else model
    state = unwrap_state_dict(_torch_load(path, "cpu", allow_pickle=allow_pickle))
    if state is None:
        raise ValueError(f"{path} holds no state dict (looked at top level and under {list(_WRAPPER_KEYS)})")
    target = backbone.state_dict()
    matched, shape_mismatch = match_backbone_tensors(state, target)
    if not matched:
        kind = type(backbone).__name__
        raise ValueError(f"{path}: no tensor matches the {kind} backbone by name and shape")
    backbone.load_state_dict(matched, strict=False)
    unmatched = [k for k in target if k not in matched and is_transferable(k)]
    log.info(
        "loaded %d backbone tensors from %s; %d backbone tensors left unmatched; %d skipped for shape",
        len(matched),
        path,
        len(unmatched),
        len(shape_mismatch),
    )
    if shape_mismatch:
        log.warning("shape mismatches in %s: %s", path, ", ".join(shape_mismatch[:10]))
    if unmatched:
        log.warning("backbone tensors not in %s (kept at init): %s", path, ", ".join(unmatched[:10]))
    return len(matched)
