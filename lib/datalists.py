"""Dataset lists in the seed's format, validated up front with errors that name the file and line.

One case per line, paths relative to a data root, tab-separated::

    01_Multi-Atlas_Labeling/img/img0001.nii.gz<TAB>01_Multi-Atlas_Labeling/label/label0001.nii.gz
    phantom/images/case_0003.nii.gz<TAB>phantom/labels_ai/case_0003.nii.gz<TAB>spleen,liver,aorta
    phantom/images/case_0004.nii.gz                      (image only: inference and scoring)

The optional third column lists the classes the label annotates (partial labels); absent means all.
Blank lines and lines starting with '#' are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.classes import (
    CLASS_NAMES,
    NUM_CLASSES,
    LabelValueError,
    UnknownClassError,
    check_universal_label_values,
)
from lib.classes import parse_class_list as _parse_class_list
from lib.volumes import VolumeReadError, read_header, read_volume

ALL_CLASSES: tuple[int, ...] = tuple(range(NUM_CLASSES))


class DatasetListError(ValueError):
    """A dataset list line that cannot be used; the message names the list, the line and the file."""


@dataclass(frozen=True)
class CaseEntry:
    """One line of a dataset list, with absolute paths."""

    image: Path
    label: Path | None
    classes: tuple[int, ...]  # channels the label annotates (partial-label mask)
    line: int
    list_path: Path | None = None

    @property
    def case_id(self) -> str:
        """File name without NIfTI/NRRD suffixes: the id used in reports and MONAI Label."""
        return strip_volume_suffix(self.image.name)

    @property
    def where(self) -> str:
        return f"{self.list_path}:{self.line}" if self.list_path else f"line {self.line}"


def strip_volume_suffix(name: str) -> str:
    return re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", name)


def _split(line: str) -> list[str]:
    parts = line.split("\t") if "\t" in line else line.split()
    return [p.strip() for p in parts if p.strip()]


def parse_dataset_list(
    list_path: str | Path, data_root: str | Path | None = None, require_labels: bool = False
) -> list[CaseEntry]:
    """Parse a list without touching the volumes. Paths resolve against ``data_root`` (default: list's folder)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DatasetListError(f"{list_path}: dataset list does not exist")
    root = Path(data_root) if data_root is not None else list_path.parent
    entries: list[CaseEntry] = []
    for number, raw in enumerate(list_path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = _split(line)
        where = f"{list_path}:{number}"
        if len(parts) > 3:
            raise DatasetListError(f"{where}: expected 'image<TAB>label[<TAB>classes]', got {len(parts)} fields")
        label = root / parts[1] if len(parts) >= 2 else None
        if require_labels and label is None:
            raise DatasetListError(f"{where}: a label is required for training/evaluation, the line has only an image")
        try:
            classes = _parse_class_list(parts[2]) if len(parts) == 3 else ALL_CLASSES
        except UnknownClassError as error:
            raise DatasetListError(f"{where}: {error}") from error
        entries.append(CaseEntry(root / parts[0], label, classes, number, list_path))
    if not entries:
        raise DatasetListError(f"{list_path}: dataset list has no cases")
    return entries


class PairCheckError(ValueError):
    """An image/label pair that cannot be used together; the message names the file and the problem."""


def check_pair(image: Path, label: Path | None, check_label_values: bool = True) -> np.ndarray | None:
    """Files exist and load, grids match, label values lie in the template; returns the label voxels if read.

    Shared by dataset-list validation and label uploads, so both reject the same things the same way.
    """
    files = [("image", image)] + ([("label", label)] if label is not None else [])
    headers = {}
    for role, path in files:
        if not path.exists():
            raise PairCheckError(f"{role} file {path} does not exist")
        try:
            headers[role] = read_header(path)
        except VolumeReadError as error:
            raise PairCheckError(f"{role} file {error}") from error
    if label is None:
        return None
    (image_shape, image_affine), (label_shape, label_affine) = headers["image"], headers["label"]
    if image_shape != label_shape:
        raise PairCheckError(f"label {label} has shape {label_shape} but image {image} has {image_shape}")
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise PairCheckError(
            f"label {label} affine differs from image {image} "
            f"(max difference {np.abs(image_affine - label_affine).max():.3g} mm)"
        )
    if not check_label_values:
        return None
    try:
        voxels = read_volume(label)[0]
        check_universal_label_values(voxels, source=str(label))
    except (LabelValueError, VolumeReadError) as error:
        raise PairCheckError(str(error)) from error
    return voxels


def validate_entry(entry: CaseEntry, check_label_values: bool = True) -> None:
    """check_pair for one list line; errors are prefixed with the list file and line number."""
    try:
        check_pair(entry.image, entry.label, check_label_values)
    except PairCheckError as error:
        raise DatasetListError(f"{entry.where}: {error}") from error


def read_dataset_list(
    list_path: str | Path,
    data_root: str | Path | None = None,
    require_labels: bool = False,
    validate: bool = True,
) -> list[CaseEntry]:
    """Parse and (by default) validate every case, failing on the first bad line."""
    entries = parse_dataset_list(list_path, data_root, require_labels)
    if validate:
        for entry in entries:
            validate_entry(entry)
    return entries


def format_entry(image: Path, label: Path | None, root: Path, classes: Sequence[int] | None = None) -> str:
    """One dataset-list line with paths relative to ``root``."""
    fields = [str(Path(image).relative_to(root))]
    if label is not None:
        fields.append(str(Path(label).relative_to(root)))
        if classes is not None and tuple(classes) != ALL_CLASSES:
            fields.append(",".join(CLASS_NAMES[c] for c in classes))
    return "\t".join(fields)


def write_dataset_list(path: str | Path, lines: Iterable[str], header: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {header}\n" if header else "") + "\n".join(lines) + "\n"
    path.write_text(text)
    return path
