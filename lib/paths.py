"""Where revseg keeps data and runs: one place, overridable by environment for tests and deployments."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Git-ignored data folder: $REVSEG_DATA or <repo>/data."""
    return Path(os.environ.get("REVSEG_DATA", REPO_ROOT / "data"))


def runs_dir() -> Path:
    """Git-ignored folder for training runs and published models: $REVSEG_RUNS or <repo>/runs."""
    return Path(os.environ.get("REVSEG_RUNS", REPO_ROOT / "runs"))
