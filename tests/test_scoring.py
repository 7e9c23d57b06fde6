"""Attention scoring, replay and the selection-quality metrics on real files: checkpoints, NIfTI, torchrun/gloo."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.activelearning.epistemic import mc_dropout_probabilities, mean_binary_entropy
from lib.activelearning.priorities import read_priorities, read_priority_rows, write_priority_rows
from lib.activelearning.replay import main as replay_main
from lib.activelearning.score import DEFAULT_TARGET_CLASSES, ensemble_probabilities
from lib.activelearning.score import main as score_main
from lib.activelearning.selection_quality import captured_error, random_selector, spearman
from lib.classes import CLASS_NAMES
from lib.datalists import parse_dataset_list
from lib.inference import InferenceConfig, sliding_window_probabilities
from lib.paths import REPO_ROOT
from model.checkpoint import save_checkpoint
from model.universal import UniversalModel

ROI = (32, 32, 32)
FLAGS = ["--space_x", "6", "--space_y", "6", "--space_z", "6", "--overlap", "0", "--device", "cpu"]


def _model(noise_seed: int | None = None) -> UniversalModel:
    """Untrained tiny U-Net with sharpened heads (confident in most voxels, so attention is partial).

    ``noise_seed`` perturbs every weight slightly: a second model that disagrees with the first in places.
    """
    torch.manual_seed(0)
    model = UniversalModel("unet", CLASS_NAMES, roi_size=ROI, width=0.25)
    with torch.no_grad():
        for controller in model.controllers:
            controller[-1].weight.mul_(12.0)
            controller[-1].bias.mul_(12.0)
        if noise_seed is not None:
            generator = torch.Generator().manual_seed(noise_seed)
            for param in model.parameters():
                if param.numel() > 1:
                    param.add_(0.02 * param.std() * torch.randn(param.shape, generator=generator))
    return model


def _save_models(folder: Path) -> list[Path]:
    return [save_checkpoint(folder / "a.pt", _model()), save_checkpoint(folder / "b.pt", _model(noise_seed=1))]


def _args(checkpoints: list[Path], case_list: Path, root: Path, out: Path) -> list[str]:
    return ["--checkpoints", *map(str, checkpoints), "--dataset_list", str(case_list), "--data_root_path", str(root),
            "--out_dir", str(out), *FLAGS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in each torchrun process: identical float maths, and on 2 shared cores
    tiny convolutions run several times faster than with two spinning threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    return _save_models(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def case_list(tiny_cohort: Path, example_ct_small, tmp_path_factory) -> Path:
    """A phantom case, the real small CT at 3 mm (so the map is really resampled back), and a truncated file."""
    folder = tmp_path_factory.mktemp("lists")
    good = (tiny_cohort / "images" / "case_0004.nii.gz").read_bytes()
    broken = folder / "broken_case.nii.gz"
    broken.write_bytes(good[: len(good) // 2])
    lines = ["images/case_0004.nii.gz", str(example_ct_small[0]), str(broken)]
    path = folder / "score.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def single_run(checkpoints, case_list, tiny_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    assert score_main(_args(checkpoints, case_list, tiny_cohort, out)) == 0
    return out


def test_scores_cases_and_reports_the_unreadable_one(single_run: Path, case_list: Path):
    rows = {r["case_id"]: r for r in read_priority_rows(single_run / "priorities.csv")}
    assert sorted(rows) == ["case_0004", "example_ct_sm"]
    failures = json.loads((single_run / "failures.json").read_text())
    assert [f["case_id"] for f in failures] == ["broken_case"]
    assert "broken_case.nii.gz" in failures[0]["error"] and failures[0]["where"] == f"{case_list}:3"
    for case_id, row in rows.items():
        counts = [int(row[f"attention_{CLASS_NAMES[c]}"]) for c in DEFAULT_TARGET_CLASSES]
        assert float(row["priority"]) == sum(counts) > 0, "priority = attention voxels over the target classes"
        record = json.loads((single_run / "cases" / f"{case_id}.json").read_text())
        ranked = row["ranked_classes"].split(";")
        heat = record["heatmap_sums"]
        assert ranked == sorted(ranked, key=lambda n: -heat[n]) and set(ranked) <= set(heat)
        assert record["ensemble_size"] == 2 and len(record["fingerprint"]["checkpoints"]) == 2


def test_attention_maps_land_on_the_original_grid(single_run: Path, case_list: Path, tiny_cohort: Path):
    images = {e.case_id: e.image for e in parse_dataset_list(case_list, tiny_cohort)}
    allowed = {0} | {c + 1 for c in DEFAULT_TARGET_CLASSES}
    for case_id in ("case_0004", "example_ct_sm"):
        original, attention = nib.load(images[case_id]), nib.load(single_run / "attention" / f"{case_id}.nii.gz")
        assert attention.shape == original.shape
        assert np.allclose(attention.affine, original.affine, atol=1e-4)
        values = set(np.unique(np.asarray(attention.dataobj)).tolist())
        assert values <= allowed and values - {0}, values  # within 0..32: the target classes' label values


def test_torchrun_shards_match_single_process(single_run: Path, checkpoints, case_list, tiny_cohort, tmp_path):
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lib.activelearning.score", *_args(checkpoints, case_list, tiny_cohort, out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_priorities(out / "priorities.csv") == read_priorities(single_run / "priorities.csv")
    assert json.loads((out / "failures.json").read_text())[0]["case_id"] == "broken_case"
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(p.name for p in (single_run / "cases").iterdir())


def test_resume_skips_scored_cases_and_rescores_after_checkpoint_change(
    tiny_cohort: Path, example_ct_small, tmp_path: Path, caplog
):
    models = _save_models(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text(f"{example_ct_small[0]}\n")
    args = [*_args(models, one, tiny_cohort, tmp_path / "out"), "--context_classes", "none"]
    record = tmp_path / "out" / "cases" / "example_ct_sm.json"
    assert score_main(args) == 0
    first = record.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="lib.activelearning.score"):
        assert score_main(args) == 0
    assert record.stat().st_mtime_ns == first
    assert "1 of 1 case(s) already scored" in caplog.text
    assert list(read_priorities(tmp_path / "out" / "priorities.csv")) == ["example_ct_sm"]

    save_checkpoint(models[1], _model(noise_seed=2))  # a retrained model replaces the file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lib.activelearning.score"):
        assert score_main(args) == 0
    assert record.stat().st_mtime_ns != first and "already scored" not in caplog.text


def test_nothing_scored_is_a_failure(checkpoints, tiny_cohort: Path, tmp_path: Path):
    bad = tmp_path / "bad.txt"
    bad.write_text("images/no_such_case.nii.gz\n")
    assert score_main(_args(checkpoints, bad, tiny_cohort, tmp_path / "out")) == 1
    assert json.loads((tmp_path / "out" / "failures.json").read_text())[0]["case_id"] == "no_such_case"


class _PointwiseModel(UniversalModel):
    """Each voxel's logit depends on that voxel alone, so every flip of the image must agree after un-flipping."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(x.shape[0], 1), x

    def decode(self, task_features, head_input, class_indices=None) -> torch.Tensor:
        count = len(self.class_names) if class_indices is None else len(list(class_indices))
        return (8.0 * head_input - 4.0).repeat(1, count, 1, 1, 1)


def test_single_model_ensemble_is_flips_mapped_back():
    image = torch.rand(1, 1, 20, 18, 12, generator=torch.Generator().manual_seed(0))  # asymmetric
    config = InferenceConfig(roi_size=(16, 16, 16), overlap=0.25, device="cpu")
    classes = [3, 6]

    pointwise = _PointwiseModel("unet", CLASS_NAMES, roi_size=(16, 16, 16), width=0.25)
    probs = ensemble_probabilities([pointwise], image, config, classes)
    assert probs.shape == (4, 2, 20, 18, 12)
    assert torch.allclose(probs, probs[:1].expand_as(probs), atol=1e-6), "flips are mapped back onto the image"
    assert torch.allclose(probs[0, 0], torch.sigmoid(8.0 * image[0, 0] - 4.0), atol=1e-5)

    model = _model()
    tta = ensemble_probabilities([model], image, config, classes)
    assert tta.shape[:2] == (4, 2) and float(tta.min()) >= 0 and float(tta.max()) <= 1
    assert torch.equal(tta[0], sliding_window_probabilities(model, image, config, classes)[0])
    assert not torch.equal(tta[0], tta[1]), "a real network is not flip-equivariant: the members differ"
    assert ensemble_probabilities([model, _model(1)], image, config, classes).shape[:2] == (2, 2)


def test_mc_dropout_is_seeded_and_entropy_is_bounded():
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    config = InferenceConfig(roi_size=(16, 16, 16), device="cpu")
    model = _model()
    a = mc_dropout_probabilities(model, image, config, passes=3, seed=5)
    assert a.shape == (1, len(DEFAULT_TARGET_CLASSES), 16, 16, 16)
    assert torch.equal(a, mc_dropout_probabilities(model, image, config, passes=3, seed=5))
    assert not torch.equal(a, mc_dropout_probabilities(model, image, config, passes=3, seed=6))
    plain = sliding_window_probabilities(model, image, config, list(DEFAULT_TARGET_CLASSES))
    assert torch.allclose(mc_dropout_probabilities(model, image, config, dropout=0.0, passes=2), plain, atol=1e-5)
    assert mean_binary_entropy(torch.tensor([0.0, 1.0])) == 0.0
    assert mean_binary_entropy(torch.tensor([0.5])) == pytest.approx(math.log(2))
    assert 0.0 <= mean_binary_entropy(a) <= math.log(2)


def test_replay_writes_the_top_cases_in_the_list_format(tiny_cohort: Path, tmp_path: Path):
    table = tmp_path / "priorities.csv"
    write_priority_rows(table, [{"case_id": f"case_000{i}", "priority": p} for i, p in enumerate([5, 40, 1, 30])])
    out = tmp_path / "replay.txt"
    args = ["--priorities", str(table), "--dataset_list", str(tiny_cohort / "train.txt"),
            "--data_root_path", str(tiny_cohort), "--out", str(out)]
    assert replay_main([*args, "--fraction", "0.5"]) == 0
    source = {e.case_id: e for e in parse_dataset_list(tiny_cohort / "train.txt", tiny_cohort)}
    chosen = parse_dataset_list(out, tiny_cohort)
    assert [e.case_id for e in chosen] == ["case_0001", "case_0003"]
    assert all((e.image, e.label, e.classes) == (source[e.case_id].image, source[e.case_id].label,
                                                 source[e.case_id].classes) for e in chosen)
    assert replay_main([*args, "--fraction", "0.1"]) == 0
    assert [e.case_id for e in parse_dataset_list(out, tiny_cohort)] == ["case_0001"], "at least one case"


def test_selection_metrics_known_answers():
    errors = {"a": 0.6, "b": 0.3, "c": 0.1, "d": 0.0}
    assert captured_error({"a": 1, "b": 2, "c": 3, "d": 4}, errors, 0.25) == pytest.approx(0.0)
    assert captured_error(errors, errors, 0.5) == pytest.approx(0.9)
    assert captured_error(errors, errors, 0.05) == pytest.approx(0.6), "at least one case"
    assert spearman({"a": 4, "b": 3, "c": 2, "d": 1}, errors)[0] == pytest.approx(1.0)
    assert math.isnan(spearman({k: 1.0 for k in errors}, errors)[0])
    assert random_selector(errors, draws=2000, seed=0).captured[1] == pytest.approx(0.25, abs=0.03)
