"""Evaluation: scoring on the original grid, the empty/perfect extremes, and the command end to end."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference import COARSE, FAST, constant_logit_model, tiny_model

from lib.classes import CLASS_NAMES
from lib.datalists import read_dataset_list
from lib.evaluate import (
    PER_CASE_COLUMNS,
    SUMMARY_COLUMNS,
    EvaluationError,
    evaluate_cases,
    main,
    score_prediction,
    summarise,
)
from lib.inference import Predictor
from lib.transforms import labels_to_channels
from lib.volumes import read_volume
from model.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.pth", tiny_model())


def test_perfect_prediction_scores_one(tiny_cohort):
    """The ground-truth label, used as its own prediction, through the command's scoring function."""
    entry = read_dataset_list(tiny_cohort / "test_gt.txt", tiny_cohort)[0]
    label, affine = read_volume(entry.label)
    masks = labels_to_channels(torch.from_numpy(label[None].astype(np.int64))).bool()
    scores = score_prediction(masks, range(len(CLASS_NAMES)), entry.label, entry.classes, 2.0, affine)
    assert set(scores) == set(entry.classes)
    assert sum(s["truth_voxels"] > 0 for s in scores.values()) >= 10
    for score in scores.values():
        assert score["dice"] == 1.0 and score["surface_dice"] == 1.0
        assert score["pred_voxels"] == score["truth_voxels"]


def test_empty_prediction_scores_zero(tiny_cohort, tmp_path):
    """A real model whose heads predict background everywhere, through evaluate_cases."""
    entries = read_dataset_list(tiny_cohort / "test_gt.txt", tiny_cohort)
    predictor = Predictor(constant_logit_model(-20.0), COARSE, FAST)
    rows = evaluate_cases(predictor, entries, 2.0, classes=("liver", "aorta", "kidney_tumor"), store_dir=tmp_path)
    assert [r["class"] for r in rows] == ["liver", "aorta"]  # kidney_tumor is not annotated by these labels
    for row in rows:
        assert row["truth_voxels"] > 0 and row["pred_voxels"] == 0
        assert row["dice"] == 0.0 and row["surface_dice"] == 0.0
        assert set(row) == set(PER_CASE_COLUMNS)
    stored = nib.load(str(tmp_path / f"{entries[0].case_id}.nii.gz"))
    assert not np.asarray(stored.dataobj).any()
    assert [s["class"] for s in summarise(rows)] == ["liver", "aorta", "mean"]


def test_summarise_averages_per_class_in_template_order():
    rows = [
        {"case": "a", "class": "aorta", "dice": 0.5, "surface_dice": 0.2},
        {"case": "b", "class": "aorta", "dice": 1.0, "surface_dice": 0.4},
        {"case": "a", "class": "spleen", "dice": 0.0, "surface_dice": 0.0},
    ]
    summary = summarise(rows)
    assert [s["class"] for s in summary] == ["spleen", "aorta", "mean"]
    assert summary[1] == {"class": "aorta", "mean_dice": 0.75, "mean_surface_dice": pytest.approx(0.3), "n_cases": 2}
    assert summary[2]["mean_dice"] == pytest.approx(0.375) and summary[2]["n_cases"] == 2
    assert summarise([]) == []


def test_scoring_refuses_a_prediction_on_another_grid(tiny_cohort):
    entry = read_dataset_list(tiny_cohort / "test_gt.txt", tiny_cohort)[0]
    with pytest.raises(EvaluationError, match="shape"):
        score_prediction(np.zeros((1, 4, 4, 4), bool), [5], entry.label, [5], 2.0)
    shape = nib.load(str(entry.label)).shape
    with pytest.raises(EvaluationError, match="affine"):
        score_prediction(np.zeros((1, *shape), bool), [5], entry.label, [5], 2.0, affine=np.eye(4))


def _seed_flags(tiny_cohort: Path, checkpoint: Path, save_dir: Path, backbone: str = "unet") -> list[str]:
    """The seed README's test.py flags, plus a CPU-scale geometry (12 mm: one 32^3 window per case)."""
    return [
        "--resume", str(checkpoint), "--backbone", backbone, "--save_dir", str(save_dir),
        "--dataset_list", str(tiny_cohort / "test_gt.txt"), "--data_root_path", str(tiny_cohort),
        "--space_x", "12", "--space_y", "12", "--space_z", "12", "--roi_x", "32", "--roi_y", "32", "--roi_z", "32",
    ]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_command_end_to_end(tiny_cohort, unet_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    extra = ["--store_result", "--overlap", "0.25", "--thresholds", "aorta=0.4", "--largest_component", "all",
             "--tolerance_mm", "3", "--classes", "spleen,liver,aorta", "--device", "cpu"]
    assert main(_seed_flags(tiny_cohort, unet_checkpoint, out) + extra) == 0

    columns, per_case = _read_csv(out / "per_case.csv")
    assert columns == list(PER_CASE_COLUMNS)
    assert [r["class"] for r in per_case] == ["spleen", "liver", "aorta"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["seconds"]) > 0 for r in per_case)
    columns, summary = _read_csv(out / "summary.csv")
    assert columns == list(SUMMARY_COLUMNS)
    assert [r["class"] for r in summary] == ["spleen", "liver", "aorta", "mean"]

    case_id = per_case[0]["case"]
    stored, image = nib.load(str(out / "predictions" / f"{case_id}.nii.gz")), nib.load(
        str(tiny_cohort / "images" / f"{case_id}.nii.gz"))
    assert stored.shape == image.shape and np.allclose(stored.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(stored.dataobj)).tolist()) <= {0, 1, 6, 8}
    printed = capsys.readouterr().out
    assert "surface dice" in printed and "mean" in printed


@pytest.mark.parametrize("problem", ["backbone", "checkpoint", "dataset_list"])
def test_command_reports_bad_inputs_in_one_line(problem, tiny_cohort, unet_checkpoint, tmp_path, capsys):
    flags = _seed_flags(tiny_cohort, unet_checkpoint, tmp_path / "eval", backbone="swinunetr")
    expected = {"backbone": ("swin_unetr", "unet"), "checkpoint": ("missing.pth", "does not exist"),
                "dataset_list": ("nope.txt", "does not exist")}[problem]
    if problem != "backbone":
        flags[flags.index("swinunetr")] = "unet"
    if problem == "checkpoint":
        flags[flags.index(str(unet_checkpoint))] = str(tmp_path / "missing.pth")
    if problem == "dataset_list":
        flags[flags.index(str(tiny_cohort / "test_gt.txt"))] = str(tmp_path / "nope.txt")
    assert main(flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error
    assert all(part in error for part in expected)
    assert not (tmp_path / "eval" / "per_case.csv").exists()


def test_seed_entry_point_runs_the_command(tmp_path, monkeypatch, capsys):
    """`python test.py ...` (the seed's habit) is the same command: one error line and exit code 2 here."""
    argv = ["test.py", "--resume", str(tmp_path / "missing.pth"), "--backbone", "unet",
            "--dataset_list", str(tmp_path / "list.txt"), "--save_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "test.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
