"""The training engine end to end on the tiny phantom cohort: real torchrun, real gloo, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.classes import CLASS_NAMES, SEED_REVISED_CLASSES, class_indices
from lib.paths import REPO_ROOT
from lib.trainers.train import main as train_main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.universal import UniversalModel

TINY = ["--width", "0.25", "--roi_x", "32", "--roi_y", "32", "--roi_z", "32", "--space_x", "6", "--space_y", "6",
        "--space_z", "6", "--num_samples", "1", "--warmup_epoch", "1", "--lr", "1e-3", "--device", "cpu"]


def _args(cohort: Path, run_dir: Path, *extra: str, lists: tuple[str, ...] = ("train.txt",)) -> list[str]:
    return ["--data_root_path", str(cohort), "--dataset_list", *[str(cohort / name) for name in lists],
            "--run_dir", str(run_dir), *TINY, *extra]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO_ROOT / "train.py"), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def round1(tiny_cohort: Path, tmp_path_factory) -> Path:
    """A short single-process full-training run: the 'previous round' for continual tests."""
    run = tmp_path_factory.mktemp("round1")
    assert train_main(_args(tiny_cohort, run, "--max_epoch", "4", "--val_list", str(tiny_cohort / "val.txt"),
                            "--val_every", "2", "--store_num", "2")) == 0
    return run


def test_full_training_lowers_loss_and_logs(round1: Path):
    records = [json.loads(line) for line in (round1 / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"] * 0.9, [r["loss"] for r in records]
    assert "val_dice.liver" in records[1] and "val_metric" in records[-1]
    for name in ("last.pt", "best.pt", "epoch_0002.pt", "epoch_0004.pt"):
        assert (round1 / "checkpoints" / name).is_file()
    assert list((round1 / "tb").iterdir()), "TensorBoard events are written"
    summary = json.loads((round1 / "summary.json").read_text())
    assert summary["samples"] == 4 * 4 and summary["steps"] == 16


def test_ddp_two_gloo_processes_keep_replicas_identical(tiny_cohort: Path, tmp_path: Path):
    _torchrun(_args(tiny_cohort, tmp_path / "ddp", "--max_epoch", "2", "--dist", "True"))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["replica_digests"]) == 2 and len(set(summary["replica_digests"])) == 1
    assert summary["steps"] == 2 * 2, "4 cases sharded over 2 ranks: 2 steps per epoch"


def test_continual_tuning_changes_only_revised_heads(tiny_cohort: Path, round1: Path, tmp_path: Path):
    pretrain = round1 / "checkpoints" / "last.pt"
    revised = ",".join(SEED_REVISED_CLASSES)
    run = tmp_path / "continual"
    _torchrun(_args(tiny_cohort, run, "--continual_tuning", "--pretrain", str(pretrain), "--revised_classes",
                    revised, "--replay_list", str(tiny_cohort / "train.txt"), "--replay_fraction", "0.5",
                    "--max_epoch", "2", lists=("val.txt",)))
    before, after = load_checkpoint(pretrain), load_checkpoint(run / "checkpoints" / "last.pt")
    tuned = {f"controllers.{k}." for k in class_indices(SEED_REVISED_CLASSES)}
    changed = {k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], after["state_dict"][k])}
    assert changed and all(k.startswith(tuple(tuned)) for k in changed), sorted(changed)[:5]
    assert {k.split(".")[1] for k in changed} == {str(k) for k in class_indices(SEED_REVISED_CLASSES)}
    assert after["trained_classes"] == list(SEED_REVISED_CLASSES)
    assert len(after["optimizer"]["param_groups"][0]["params"]) == 4 * 4, "only the 4 heads' tensors are optimised"

    old, new = UniversalModel.from_config(before["config"]), UniversalModel.from_config(after["config"])
    old.load_state_dict(before["state_dict"])
    new.load_state_dict(after["state_dict"])
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_old, p_new = old.eval()(image), new.eval()(image)
    untouched = [k for k in range(len(CLASS_NAMES)) if k not in class_indices(SEED_REVISED_CLASSES)]
    assert torch.equal(p_old[:, untouched], p_new[:, untouched])
    assert not torch.equal(p_old[:, list(class_indices(SEED_REVISED_CLASSES))],
                           p_new[:, list(class_indices(SEED_REVISED_CLASSES))])


def test_killed_run_resumes_to_identical_weights(tiny_cohort: Path, tmp_path: Path):
    common = ("--max_epoch", "4", "--store_num", "1", "--seed", "3")
    assert train_main(_args(tiny_cohort, tmp_path / "straight", *common)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *_args(tiny_cohort, killed, *common)]
    process = subprocess.Popen(cmd, env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "epoch_0002.pt").exists() and time.time() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "epoch_0004.pt").exists(), "kill must interrupt the run"
    resume_from = max((killed / "checkpoints").glob("epoch_*.pt"))
    assert train_main(["--resume", str(resume_from), "--device", "cpu"]) == 0

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(killed / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run must end bit-identical to the uninterrupted one"


def test_clear_errors(tiny_cohort: Path, round1: Path, tmp_path: Path, capsys):
    pretrain = str(round1 / "checkpoints" / "last.pt")
    assert train_main(_args(tiny_cohort, tmp_path / "a", "--continual_tuning", "--pretrain", pretrain,
                            "--revised_classes", "aorta,appendix")) == 2
    assert "unknown class 'appendix'" in capsys.readouterr().err

    assert train_main(_args(tiny_cohort, tmp_path / "b", "--backbone", "swinunetr", "--continual_tuning",
                            "--pretrain", pretrain, "--revised_classes", "aorta")) == 2
    assert "is a unet checkpoint but --backbone is swin_unetr" in capsys.readouterr().err

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert train_main(["--dataset_list", str(empty), "--run_dir", str(tmp_path / "c"), *TINY]) == 2
    assert "empty.txt: dataset list has no cases" in capsys.readouterr().err

    model = UniversalModel("unet", CLASS_NAMES[:3], roi_size=(32, 32, 32), width=0.25)
    other = save_checkpoint(tmp_path / "three_classes.pt", model)
    assert train_main(_args(tiny_cohort, tmp_path / "d", "--continual_tuning", "--pretrain", str(other),
                            "--revised_classes", "aorta")) == 2
    assert "three_classes.pt: the model's classes differ from the class template" in capsys.readouterr().err
