"""`make serve`'s choices: where it listens and the geometry it serves a model at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib.model_store import ModelStore
from lib.serve import CPU_GEOMETRY, build_parser, last_validation, serving_geometry


def test_binds_localhost_by_default():
    assert build_parser().parse_args([]).host == "127.0.0.1"


def test_geometry_follows_flags_then_the_published_model(round1_checkpoint: Path, tmp_path: Path):
    store = ModelStore(tmp_path / "models")
    flags = build_parser().parse_args(["--spacing", "1.5", "--roi-size", "96"])
    assert serving_geometry(flags, store, ["unet"]) == {"spacing": "1.5", "roi_size": "96"}

    defaults = build_parser().parse_args([])
    if not torch.cuda.is_available():
        assert serving_geometry(defaults, store, ["unet"]) == CPU_GEOMETRY, "nothing published: the CPU bootstrap's"
    store.publish("unet", round1_checkpoint, {"mode": "full"})  # trained at 6 mm on 32^3 crops
    assert serving_geometry(defaults, store, ["unet"]) == {"spacing": "6", "roi_size": "32"}
    one_flag = build_parser().parse_args(["--roi-size", "48"])
    assert serving_geometry(one_flag, store, ["unet"]) == {"spacing": "6", "roi_size": "48"}


@pytest.mark.parametrize("backbones", [["unet"], ["swin_unetr", "unet"]])
def test_geometry_reads_the_first_published_backbone(round1_checkpoint: Path, tmp_path: Path, backbones):
    store = ModelStore(tmp_path / "models")
    store.publish("unet", round1_checkpoint, {"mode": "full"})
    assert serving_geometry(build_parser().parse_args([]), store, backbones)["spacing"] == "6"


def test_last_validation_reads_the_last_validated_epoch(tmp_path: Path):
    log = tmp_path / "log.jsonl"
    assert last_validation(log) == (0, {})
    records = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.8, "val_dice.liver": 0.5, "val_metric": 0.5},
               {"epoch": 3, "loss": 0.7, "val_dice.liver": 0.81234, "val_dice.spleen": 0.2}, {"epoch": 4, "loss": 0.6}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert last_validation(log) == (3, {"liver": 0.8123, "spleen": 0.2})
