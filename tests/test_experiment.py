"""The whole experiment in miniature (``--config tiny``), the report's provenance, and the feature cache."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.activelearning.priorities import read_priorities
from lib.benchmark import main as benchmark_main
from lib.classes import CLASS_NAMES, SEED_REVISED_CLASSES, class_indices
from lib.datalists import read_dataset_list
from lib.experiment import RUNS, expert_revision
from lib.experiment import main as experiment_main
from lib.paths import REPO_ROOT
from lib.report import LEARNING_CURVES_PNG, PER_CLASS_PNG, RUN_LABELS
from lib.trainers.engine import CachedCrops, encode_crops
from lib.transforms import IMAGE_KEY, LABEL_KEY
from lib.volumes import read_volume
from model.checkpoint import load_checkpoint
from model.universal import UniversalModel

TARGETS = class_indices(SEED_REVISED_CLASSES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny experiment, run once for this module through its command line."""
    out = tmp_path_factory.mktemp("tiny_experiment")
    assert experiment_main(["--out", str(out), "--config", "tiny", "--device", "cpu"]) == 0
    return out


def _table(report: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first markdown table after ``heading``, as dicts keyed by the header."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def _summary(out: Path, run: str) -> dict:
    return json.loads((out / run / "summary.json").read_text())


def _eval_rows(out: Path, run: str) -> dict[str, dict[str, str]]:
    with open(out / "eval" / run / "summary.csv", newline="") as handle:
        return {row["class"]: row for row in csv.DictReader(handle)}


def test_report_has_every_section_and_plot(tiny: Path):
    report = (tiny / "report.md").read_text()
    for heading in ("## Targets", "## Test accuracy by group", "## Test accuracy per class", "## Cost",
                    "## Stage wall times", "## Plots", "## Commands run"):
        assert heading in report, heading
    targets = _table(report, "## Targets")
    assert len(targets) == 8 and {t["verdict"] for t in targets} <= {"PASS", "MISS", "NO EVIDENCE"}
    per_class = _table(report, "## Test accuracy per class")
    for run in RUNS:
        assert f"Dice {RUN_LABELS[run]}" in per_class[0] and f"NSD {RUN_LABELS[run]}" in per_class[0]
    assert {row["group"] for row in per_class} == {"revised", "unrevised"}
    for name in (LEARNING_CURVES_PNG, PER_CLASS_PNG):
        assert (tiny / name).read_bytes()[:8] == PNG_MAGIC and f"({name})" in report


def test_report_numbers_are_the_runs_numbers(tiny: Path):
    report = (tiny / "report.md").read_text()
    cost = {row["run"]: row for row in _table(report, "## Cost")}
    for run in RUNS:
        summary = _summary(tiny, run)
        row = cost[RUN_LABELS[run]]
        assert row["wall s"] == f"{summary['wall_seconds']:.2f}"
        assert row["validation s"] == f"{summary['validation_seconds']:.2f}"
        assert row["processor s (all ranks)"] == f"{summary['process_cpu_seconds']:.2f}"
        assert int(row["samples"]) == summary["samples"] and int(row["steps"]) == summary["steps"]
    per_class = _table(report, "## Test accuracy per class")
    for run in RUNS:
        rows = _eval_rows(tiny, run)
        for line in per_class:
            assert line[f"Dice {RUN_LABELS[run]}"] == f"{float(rows[line['class']]['mean_dice']):.4f}"
            assert line[f"NSD {RUN_LABELS[run]}"] == f"{float(rows[line['class']]['mean_surface_dice']):.4f}"
    assert _summary(tiny, "continual_cached")["cache_seconds"] > 0 and _summary(tiny, "continual")["cache_seconds"] == 0


def test_expert_revised_the_most_attended_cases(tiny: Path):
    priorities = read_priorities(tiny / "attention" / "priorities.csv")
    record = json.loads((tiny / "experiment.json").read_text())
    assert len(priorities) == 4 and record["revised_cases"] == [max(priorities, key=priorities.get)]
    revised = read_dataset_list(tiny / "cohort" / "revised.txt", tiny / "cohort")
    assert [e.case_id for e in revised] == record["revised_cases"]
    entry = revised[0]
    assert entry.classes == TARGETS
    label = read_volume(entry.label)[0]
    truth = read_volume(tiny / "cohort" / "labels_gt" / entry.label.name)[0]
    ai = read_volume(tiny / "cohort" / "labels_ai" / entry.label.name)[0]
    target_values = [k + 1 for k in TARGETS]
    for value in target_values:
        assert np.array_equal(label == value, truth == value)
    untouched = ~np.isin(ai, target_values) & ~np.isin(truth, target_values)
    assert np.array_equal(label[untouched], ai[untouched])
    full_list = {e.case_id: e for e in read_dataset_list(tiny / "cohort" / "train_revised.txt", tiny / "cohort")}
    assert len(full_list) == 4 and full_list[entry.case_id].label == entry.label


def test_continual_runs_change_only_revised_heads(tiny: Path):
    before = load_checkpoint(tiny / "round1" / "checkpoints" / "last.pt")["state_dict"]
    tuned = tuple(f"controllers.{k}." for k in TARGETS)
    for run in ("continual", "continual_cached"):
        after = load_checkpoint(tiny / run / "checkpoints" / "last.pt")["state_dict"]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.startswith(tuned) for k in changed), (run, sorted(changed)[:4])
        assert {k.split(".")[1] for k in changed} == {str(k) for k in TARGETS}, run
        round1, tuned_rows = _eval_rows(tiny, "round1"), _eval_rows(tiny, run)
        for name in round1:
            if name != "mean" and name not in SEED_REVISED_CLASSES:
                assert round1[name] == tuned_rows[name], (run, name)


def test_cached_features_reproduce_the_forward_pass(tiny: Path):
    """decode(cached encode) equals the model's own forward: exactly in float32, closely in float16."""
    ckpt = load_checkpoint(tiny / "round1" / "checkpoints" / "last.pt")
    model = UniversalModel.from_config(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    generator = torch.Generator().manual_seed(0)
    batch = {IMAGE_KEY: torch.rand(2, 1, 32, 32, 32, generator=generator),
             LABEL_KEY: torch.randint(0, 5, (2, 1, 32, 32, 32), generator=generator),
             "class_mask": torch.ones(2, len(CLASS_NAMES), dtype=torch.bool)}
    with torch.no_grad():
        expected = model(batch[IMAGE_KEY])[:, list(TARGETS)]
        exact = encode_crops(model, batch, torch.device("cpu"), torch.float32, use_amp=False)
        half = encode_crops(model, batch, torch.device("cpu"), torch.float16, use_amp=False)
        assert isinstance(exact, CachedCrops) and exact.head_input.dtype == torch.float32
        assert torch.equal(model.decode(exact.task_features, exact.head_input, list(TARGETS)), expected)
        approx = model.decode(half.task_features.float(), half.head_input.float(), list(TARGETS))
    assert half.head_input.dtype == torch.float16 and half.nbytes < exact.nbytes
    assert torch.allclose(approx, expected, atol=5e-2, rtol=1e-2)
    assert torch.equal(exact.label, batch[LABEL_KEY].to(torch.uint8))


def test_feature_cache_under_ddp_keeps_replicas_and_frozen_tensors(tiny: Path, tmp_path: Path):
    """Two gloo processes share the cached crops; replicas agree and only the revised heads move."""
    config = json.loads((tiny / "continual_cached" / "config.json").read_text())
    run = tmp_path / "ddp_cached"
    recorded = _recorded_argv(tiny, "continual_cached")
    argv = [str(run) if arg == str(tiny / "continual_cached") else arg for arg in recorded]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lib.trainers.train", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["cache_features"] and config["cache_features"]
    assert len(set(summary["replica_digests"])) == 1
    before = load_checkpoint(tiny / "round1" / "checkpoints" / "last.pt")["state_dict"]
    after = load_checkpoint(run / "checkpoints" / "last.pt")["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tuple(f"controllers.{k}." for k in TARGETS)) for k in changed)


def _recorded_argv(out: Path, stage: str) -> list[str]:
    """The arguments the experiment recorded for a stage (after ``-m module``)."""
    record = json.loads((out / "experiment.json").read_text())
    command = next(c["command"] for c in record["commands"] if c["stage"] == stage)
    words = shlex.split(command)
    return words[words.index("-m") + 2:]


def test_expert_revision_only_touches_revised_classes():
    truth = np.array([0, 4, 4, 8, 6, 1, 0], dtype=np.uint8)  # 4 gallbladder, 8 aorta, 6 liver, 1 spleen
    ai = np.array([4, 0, 4, 0, 6, 1, 8], dtype=np.uint8)
    revised = expert_revision(ai, truth, class_indices(["gallbladder", "aorta"]))
    assert revised.tolist() == [0, 4, 4, 8, 6, 1, 0]
    assert expert_revision(ai, truth, class_indices(["gallbladder"])).tolist() == [0, 4, 4, 0, 6, 1, 8]


def test_benchmark_quick_smoke(tiny: Path, tmp_path: Path, capsys):
    """Every figure of the benchmark at toy sizes; round-2 ratios come from the tiny experiment's runs."""
    out = tmp_path / "bench.json"
    assert benchmark_main(["--quick", "--device", "cpu", "--width", "0.25", "--roi", "64", "--spacings", "8",
                           "--size_spacings", "12,8", "--scoring_spacing", "12", "--case", "example_ct_sm",
                           "--demo", str(tiny), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "device: CPU" in printed and "with overrides" in printed
    figures = json.loads(out.read_text())
    assert {(m["case"], m["backbone"], m["spacing_mm"]) for m in figures["latency"]} == {
        ("example_ct_sm", "unet", 8.0), ("example_ct_sm", "swin_unetr", 8.0)}
    assert all(m["seconds"] > 0 and m["windows"] >= 1 for m in figures["latency"] + figures["sizes"])
    assert [m["spacing_mm"] for m in figures["sizes"]] == [12.0, 8.0]
    full, tuned = (_summary(tiny, run) for run in ("full", "continual"))
    training = [s["wall_seconds"] - s["validation_seconds"] for s in (full, tuned)]
    assert figures["round2"]["continual_training_ratio"] == pytest.approx(training[0] / training[1])
    assert figures["scoring"]["ensemble_ratio"] > 0 and figures["scoring"]["flip_ratio"] > 0
