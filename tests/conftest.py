"""Shared fixtures: the real example CT and a tiny phantom cohort built from it (both real NIfTI files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

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
