"""Shared fixtures: the real example CT and a tiny phantom cohort built from it (both real NIfTI files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: the suite runs servers, torchrun ranks and training side by side on 2 cores,
# and oversubscribed OpenMP threads spin-wait (measured: a training step 2.3x slower with 2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from lib.example_ct import example_case
from lib.phantom import PhantomConfig, build_cohort


@pytest.fixture(scope="session")
def example_ct() -> tuple[Path, Path]:
    """(image, universal label) of the real CT; `make data` fetched it, this re-checks its checksums."""
    return example_case("example_ct")


@pytest.fixture(scope="session")
def example_ct_small() -> tuple[Path, Path]:
    return example_case("example_ct_sm")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Six coarse (6 mm) phantom cases: 4 train, 1 val, 1 test. Returns the cohort folder."""
    out = tmp_path_factory.mktemp("tiny_cohort")
    build_cohort(out, PhantomConfig(num_cases=6, seed=7, spacing=(6.0, 6.0, 6.0)))
    return out


@pytest.fixture(scope="session")
def round1_checkpoint(tiny_cohort: Path, tmp_path_factory) -> Path:
    """A tiny round-1 model (3 epochs of full training on the phantom cohort), for the server tests to publish."""
    from lib.trainers.train import main as train_main

    run_dir = tmp_path_factory.mktemp("round1")
    assert train_main(["--data_root_path", str(tiny_cohort), "--dataset_list", str(tiny_cohort / "train_gt.txt"),
                       "--run_dir", str(run_dir), "--width", "0.25", "--roi_x", "32", "--roi_y", "32",
                       "--roi_z", "32", "--space_x", "6", "--space_y", "6", "--space_z", "6", "--num_samples", "1",
                       "--max_epoch", "3", "--warmup_epoch", "1", "--lr", "3e-3", "--device", "cpu"]) == 0
    return run_dir / "checkpoints" / "last.pt"
