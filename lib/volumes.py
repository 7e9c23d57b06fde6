"""Light volume I/O for validation and data generation: NIfTI via nibabel, NRRD via pynrrd.

The training/inference pipeline reads through MONAI (lib.transforms); this module exists for the
cheap checks that should not build a transform chain, and for writing NIfTI atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

NRRD_SUFFIXES = (".nrrd", ".nhdr")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeReadError(ValueError):
    """A file that is not a readable 3D NIfTI/NRRD volume."""


def _is_nrrd(path: Path) -> bool:
    return path.name.lower().endswith(NRRD_SUFFIXES)


def _nrrd_affine(header: dict) -> np.ndarray:
    """RAS affine of an NRRD header (pynrrd gives LPS/RAS space directions as rows)."""
    directions = np.asarray(header["space directions"], dtype=float)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(spatial shape, RAS affine) without reading voxel data."""
    path = Path(path)
    try:
        if _is_nrrd(path):
            import nrrd

            header = nrrd.read_header(str(path))
            shape, affine = tuple(int(s) for s in header["sizes"]), _nrrd_affine(header)
        else:
            image = nib.load(str(path))
            shape, affine = tuple(int(s) for s in image.shape), np.asarray(image.affine, dtype=float)
    except Exception as error:  # nibabel/pynrrd raise many types for a bad file
        raise VolumeReadError(f"{path}: not a readable NIfTI/NRRD volume ({type(error).__name__}: {error})") from error
    if len(shape) != 3:
        raise VolumeReadError(f"{path}: expected a 3D volume, got shape {shape}")
    return shape, affine


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxel array, RAS affine) of a 3D volume."""
    path = Path(path)
    shape, affine = read_header(path)
    try:
        if _is_nrrd(path):
            import nrrd

            data, _ = nrrd.read(str(path))
        else:
            data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as error:
        raise VolumeReadError(
            f"{path}: not a readable NIfTI/NRRD volume: its voxel data is damaged ({type(error).__name__}: {error})"
        ) from error
    if tuple(data.shape) != shape:
        raise VolumeReadError(f"{path}: data shape {data.shape} does not match header {shape}")
    return data, affine


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, description: str = "") -> Path:
    """Write a NIfTI atomically (temp file + rename), so readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    image.header.set_xyzt_units("mm")
    if description:
        image.header["descrip"] = description.encode()[:79]
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
