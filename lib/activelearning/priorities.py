"""The priority table: one CSV that attention scoring writes and replay selection / strategies read.

Columns: ``case_id, priority`` then optional per-class breakdown columns (``attention_<class>``) and
``ranked_classes`` (the classes to review first, most attention first, ';'-separated).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib.atomic import atomic_write_text

REQUIRED_COLUMNS = ("case_id", "priority")


class PriorityTableError(ValueError):
    """A priority table that cannot be read; names the file and the problem."""


def read_priorities(path: str | Path) -> dict[str, float]:
    """{case_id: priority} from a priority table."""
    return {row["case_id"]: float(row["priority"]) for row in read_priority_rows(path)}


def read_priority_rows(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise PriorityTableError(f"{path}: priority table does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PriorityTableError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        try:
            float(row["priority"])
        except (TypeError, ValueError) as error:
            raise PriorityTableError(f"{path}:{number}: priority {row['priority']!r} is not a number") from error
    return rows


def write_priority_rows(path: str | Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write rows (sorted by priority, highest first) atomically, so readers never see half a table."""
    path = Path(path)
    rows = sorted(rows, key=lambda r: (-float(r["priority"]), str(r["case_id"])))  # type: ignore[arg-type]
    columns = list(REQUIRED_COLUMNS) + sorted({k for r in rows for k in r} - set(REQUIRED_COLUMNS))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
