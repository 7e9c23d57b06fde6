"""`make serve`'s choices: where it listens and the geometry it serves a model at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib.model_store import ModelStore
from lib.serve import CPU_GEOMETRY, build_parser, last_validation, serving_geometry
from model.checkpoint import load_checkpoint


def test_binds_localhost_by_default():
    assert build_parser().parse_args([]).host == "127.0.0.1"


@pytest.fixture
def checkpoint_48(round1_checkpoint: Path, tmp_path: Path) -> Path:
    """The round-1 checkpoint, recorded as trained at 4.5 mm on 48^3 crops (neither the CPU nor the GPU default)."""
    ckpt = load_checkpoint(round1_checkpoint)
    ckpt["train_config"] = dict(ckpt["train_config"], spacing=[4.5, 4.5, 4.5], roi_size=[48, 48, 48])
    path = tmp_path / "trained_at_4.5mm.pt"
    torch.save(ckpt, path)
    return path


def test_geometry_follows_flags_then_the_published_model(checkpoint_48: Path, tmp_path: Path):
    store = ModelStore(tmp_path / "models")
    flags = build_parser().parse_args(["--spacing", "1.5", "--roi-size", "96"])
    assert serving_geometry(flags, store, ["unet"]) == {"spacing": "1.5", "roi_size": "96"}

    defaults = build_parser().parse_args([])
    if not torch.cuda.is_available():
        assert serving_geometry(defaults, store, ["unet"]) == CPU_GEOMETRY, "nothing published: the CPU bootstrap's"
    store.publish("unet", checkpoint_48, {"mode": "full"})
    assert serving_geometry(defaults, store, ["unet"]) == {"spacing": "4.5", "roi_size": "48"}
    assert serving_geometry(defaults, store, ["swin_unetr", "unet"])["spacing"] == "4.5", "the published one"
    one_flag = build_parser().parse_args(["--roi-size", "64"])
    assert serving_geometry(one_flag, store, ["unet"]) == {"spacing": "4.5", "roi_size": "64"}


def test_last_validation_reads_the_last_validated_epoch(tmp_path: Path):
    log = tmp_path / "log.jsonl"
    assert last_validation(log) == (0, {})
    records = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.8, "val_dice.liver": 0.5, "val_metric": 0.5},
               {"epoch": 3, "loss": 0.7, "val_dice.liver": 0.81234, "val_dice.spleen": 0.2}, {"epoch": 4, "loss": 0.6}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert last_validation(log) == (3, {"liver": 0.8123, "spleen": 0.2})
