"""Write the replay set of a continual-tuning round as a dataset list: the old cases with the most attention.

    python -m lib.activelearning.replay --priorities runs/attention/priorities.csv \\
        --dataset_list data/phantom/train.txt --data_root_path data/phantom --fraction 0.1 --out replay.txt

The list keeps the input's format (same root, labels and class columns), highest priority first, so it
can be inspected, versioned, or passed to the engine as ``--replay_list replay.txt --replay_fraction 1``.
The engine makes the same choice itself from ``--replay_list train.txt --replay_fraction 0.1
--priorities priorities.csv``; both go through :func:`lib.trainers.data.choose_replay`, so they agree.
Cases without a priority rank last (with a warning).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.activelearning.priorities import PriorityTableError
from lib.datalists import CaseEntry, DatasetListError, format_entry, parse_dataset_list, write_dataset_list
from lib.trainers.data import choose_replay

log = logging.getLogger(__name__)


def replay_entries(entries: Sequence[CaseEntry], priorities_path: str | Path, fraction: float) -> list[CaseEntry]:
    """The top ``fraction`` of ``entries`` by priority (at least one), highest first."""
    by_id = {e.case_id: e for e in entries}
    chosen = choose_replay(list(by_id), fraction, str(priorities_path), seed=0)
    return [by_id[c] for c in chosen]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--priorities", required=True, type=Path, help="priority table from lib.activelearning.score")
    p.add_argument("--dataset_list", required=True, type=Path, help="the old cases to choose from")
    p.add_argument("--data_root_path", default=None, type=Path, help="root of the list's paths (default: its folder)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of old cases to replay (at least one case)")
    p.add_argument("--out", required=True, type=Path, help="replay dataset list to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        entries = parse_dataset_list(args.dataset_list, args.data_root_path)
        root = args.data_root_path if args.data_root_path is not None else args.dataset_list.parent
        chosen = replay_entries(entries, args.priorities, args.fraction)
        lines = [format_entry(e.image, e.label, root, e.classes) for e in chosen]
    except (DatasetListError, PriorityTableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    header = f"replay: top {args.fraction:g} of {args.dataset_list.name} by {args.priorities}"
    write_dataset_list(args.out, lines, header=header)
    log.info("%d of %d case(s) written to %s", len(chosen), len(entries), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
