"""Seed-compatible entry point: ``python train.py ...`` or ``torchrun ... train.py ...`` (see lib/trainers/train.py)."""

import sys

from lib.trainers.train import main

if __name__ == "__main__":
    sys.exit(main())
