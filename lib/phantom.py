"""Phantom cohort: N synthetic patients built from the one real CT, with ground truth and AI-like labels.

Each case is the real CT (and its universal labels) under a random affine plus smooth elastic
deformation, contrast/brightness/noise variation and a random z-crop, resampled to a chosen spacing.
Its "AI-predicted" label equals the ground truth except in the chosen classes, which carry the
systematic errors experts fix: under-segmentation, holes, leakage toward a neighbour, or a missed organ.

    python -m lib.phantom --out data/phantom --num-cases 20 --seed 0 --spacing 3

Note: the source labels are TotalSegmentator predictions; "ground truth" here means the labels the
phantom was built from, which is what the experiment needs (a known answer), not expert truth.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from lib.classes import CLASS_NAMES, SEED_REVISED_CLASSES, parse_class_list
from lib.datalists import format_entry, write_dataset_list
from lib.example_ct import AI_LABEL_NOTE, case_paths, prepare_example_ct
from lib.volumes import read_volume, write_nifti

log = logging.getLogger(__name__)

ERROR_KINDS = ("under_segmentation", "holes", "leakage", "missed")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PhantomConfig:
    """Ranges of the random variation; defaults give plausible abdominal CT variety at CPU scale."""

    num_cases: int = 20
    seed: int = 0
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    error_classes: tuple[str, ...] = SEED_REVISED_CLASSES
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.92, 1.08)
    max_translation_mm: float = 6.0
    elastic_magnitude_mm: float = 5.0
    elastic_control_points: int = 5
    z_keep_fraction: tuple[float, float] = (0.7, 1.0)
    contrast_range: tuple[float, float] = (0.9, 1.1)
    brightness_hu: float = 25.0
    noise_hu: tuple[float, float] = (5.0, 25.0)
    missed_probability: float = 0.15
    source_case: str = "example_ct"
    error_kinds: tuple[str, ...] = field(default=ERROR_KINDS[:3])  # drawn per class; "missed" has its own prob


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], control_points: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: random control points upsampled with cubic splines."""
    coarse = rng.uniform(-1.0, 1.0, size=(control_points,) * 3)
    zoom = [s / control_points for s in shape]
    fine = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    return np.clip(fine, -1.0, 1.0)


def sample_source_coordinates(
    rng: np.random.Generator, src_shape: Sequence[int], src_spacing: np.ndarray, out_spacing: np.ndarray,
    config: PhantomConfig,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Source voxel coordinates for every output voxel, and the output->source voxel matrix.

    Output voxel (i, j, k) sits at source voxel (i*f, j*f, k*f + z0) before deformation; the random
    affine and elastic field then move where it samples the source, so image and labels deform alike.
    """
    factor = out_spacing / src_spacing
    keep = rng.uniform(*config.z_keep_fraction)
    z_len = src_shape[2] * keep
    z0 = rng.uniform(0, src_shape[2] - z_len)
    out_shape = np.maximum(np.floor(np.array([src_shape[0], src_shape[1], z_len]) / factor).astype(int), 8)
    grid_to_src = np.diag([*factor, 1.0])
    grid_to_src[2, 3] = z0

    angles = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg, 3))
    scale = rng.uniform(*config.scale_range, 3)
    translation_mm = rng.uniform(-config.max_translation_mm, config.max_translation_mm, 3)
    linear_mm = _rotation(angles) @ np.diag(1.0 / scale)

    idx = np.indices(out_shape, dtype=np.float32).reshape(3, -1)
    base = grid_to_src[:3, :3] @ idx + grid_to_src[:3, 3:4]  # source voxel coords, undeformed
    centre = (np.array(src_shape, dtype=float) - 1) / 2
    mm = (base - centre[:, None]) * src_spacing[:, None]
    moved_mm = linear_mm @ mm + translation_mm[:, None]
    for axis in range(3):
        displacement = _smooth_field(rng, out_shape, config.elastic_control_points).reshape(-1)
        moved_mm[axis] += config.elastic_magnitude_mm * displacement
    coords = moved_mm / src_spacing[:, None] + centre[:, None]
    params = {
        "rotation_deg": np.rad2deg(angles).round(3).tolist(),
        "scale": scale.round(4).tolist(),
        "translation_mm": translation_mm.round(3).tolist(),
        "z_keep_fraction": round(float(keep), 4),
        "z_start_voxel": round(float(z0), 3),
    }
    return coords.reshape(3, *out_shape), grid_to_src, params


# ----------------------------------------------------------------------------------------------
# AI-like label errors (pure functions on one binary mask; other classes are never touched)
# ----------------------------------------------------------------------------------------------

_BALL = ndimage.generate_binary_structure(3, 1)


def under_segment(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Erode the organ by 1-2 voxels: the AI stops short of the true boundary."""
    return ndimage.binary_erosion(mask, _BALL, iterations=int(rng.integers(1, 3)))


def punch_holes(mask: np.ndarray, rng: np.random.Generator, max_holes: int = 4) -> np.ndarray:
    """Carve 1-4 spherical holes centred inside the organ."""
    inside = np.argwhere(mask)
    result = mask.copy()
    if len(inside) == 0:
        return result
    grid = np.indices(mask.shape)
    for _ in range(int(rng.integers(1, max_holes + 1))):
        centre = inside[rng.integers(len(inside))]
        radius = rng.uniform(1.5, 3.5)
        ball = sum((grid[a] - centre[a]) ** 2 for a in range(3)) <= radius**2
        result &= ~ball
    return result


def leak_toward_neighbour(mask: np.ndarray, others: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grow a blob from the organ's boundary point nearest another organ, into unlabelled tissue only.

    Leaking only into background keeps every other class identical to the ground truth, so the
    revision of this class is the whole correction an expert has to make.
    """
    if not mask.any():
        return mask.copy()
    boundary = mask & ~ndimage.binary_erosion(mask, _BALL)
    points = np.argwhere(boundary)
    if others.any():
        distance = ndimage.distance_transform_edt(~others)
        seed = points[np.argmin(distance[tuple(points.T)])]
    else:
        seed = points[rng.integers(len(points))]
    radius = rng.uniform(3.0, 6.0)
    grid = np.indices(mask.shape)
    region = sum((grid[a] - seed[a]) ** 2 for a in range(3)) <= radius**2
    grown = ndimage.binary_dilation(mask, _BALL, iterations=int(rng.integers(2, 5)))
    return mask | (grown & region & ~others)


def make_ai_label(
    truth: np.ndarray, error_classes: Sequence[int], rng: np.random.Generator, config: PhantomConfig
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Copy of ``truth`` with systematic errors in ``error_classes`` only; returns (label, errors per class)."""
    ai = truth.copy()
    applied: dict[str, list[str]] = {}
    for channel in error_classes:
        value = channel + 1
        mask = truth == value
        if not mask.any():
            applied[CLASS_NAMES[channel]] = ["absent"]
            continue
        if rng.random() < config.missed_probability:
            kinds = ["missed"]
            new_mask = np.zeros_like(mask)
        else:
            count = int(rng.integers(1, len(config.error_kinds) + 1))
            kinds = sorted(rng.choice(config.error_kinds, size=count, replace=False).tolist())
            others = (truth > 0) & ~mask
            new_mask = mask
            for kind in kinds:
                if kind == "under_segmentation":
                    new_mask = under_segment(new_mask, rng)
                elif kind == "holes":
                    new_mask = punch_holes(new_mask, rng)
                elif kind == "leakage":
                    new_mask = leak_toward_neighbour(new_mask, others, rng)
        ai[mask & ~new_mask] = 0
        ai[new_mask & ~mask] = value
        applied[CLASS_NAMES[channel]] = kinds
    return ai, applied


# ----------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------


def _vary_intensity(hu: np.ndarray, rng: np.random.Generator, config: PhantomConfig) -> tuple[np.ndarray, dict]:
    contrast = rng.uniform(*config.contrast_range)
    shift = rng.uniform(-config.brightness_hu, config.brightness_hu)
    sigma = rng.uniform(*config.noise_hu)
    body = hu > -500
    varied = np.where(body, (hu - 40.0) * contrast + 40.0 + shift, hu)
    varied = varied + rng.normal(0.0, sigma, size=hu.shape)
    params = {"contrast": round(float(contrast), 4), "brightness_hu": round(float(shift), 2),
              "noise_hu": round(float(sigma), 2)}
    return np.clip(np.round(varied), -1024, 3071).astype(np.int16), params


def split_assignment(num_cases: int, fractions: Sequence[float]) -> list[str]:
    """Contiguous train/val/test assignment; val and test get at least one case when N >= 3."""
    n_val = max(1, round(num_cases * fractions[1])) if num_cases >= 3 else 0
    n_test = max(1, round(num_cases * fractions[2])) if num_cases >= 3 else 0
    n_train = num_cases - n_val - n_test
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def generate_case(
    index: int, src_image: np.ndarray, src_label: np.ndarray, src_affine: np.ndarray, config: PhantomConfig,
    error_channels: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """(image HU int16, truth, AI label, affine, parameters) of phantom case ``index``; deterministic."""
    rng = np.random.default_rng([config.seed, index])
    src_spacing = np.sqrt((src_affine[:3, :3] ** 2).sum(axis=0))
    coords, grid_to_src, geometry = sample_source_coordinates(
        rng, src_image.shape, src_spacing, np.asarray(config.spacing, dtype=float), config
    )
    image = ndimage.map_coordinates(src_image.astype(np.float32), coords, order=1, mode="constant", cval=-1024.0)
    truth = ndimage.map_coordinates(src_label, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    image, intensity = _vary_intensity(image, rng, config)
    ai, errors = make_ai_label(truth, error_channels, rng, config)
    affine = src_affine @ grid_to_src
    return image, truth, ai, affine, {"geometry": geometry, "intensity": intensity, "errors": errors}


def build_cohort(out_dir: str | Path, config: PhantomConfig | None = None, data_root: Path | None = None) -> Path:
    """Write images, ground-truth and AI labels, dataset lists and cohort.json; return cohort.json's path."""
    config = config or PhantomConfig()
    out_dir = Path(out_dir)
    manifest_path = prepare_example_ct(data_root)
    manifest = json.loads(manifest_path.read_text())
    image_path, label_path = case_paths(manifest_path, config.source_case)
    src_image, src_affine = read_volume(image_path)
    src_label, _ = read_volume(label_path)
    covered = parse_class_list(manifest["covered_classes"])
    error_channels = parse_class_list(config.error_classes)

    splits = split_assignment(config.num_cases, config.split_fractions)
    lines: dict[str, list[str]] = {f"{s}{suffix}": [] for s in SPLITS for suffix in ("", "_gt")}
    cases = {}
    for index in tqdm(range(config.num_cases), desc="phantom cohort", unit="case"):
        case_id = f"case_{index:04d}"
        image, truth, ai, affine, params = generate_case(
            index, src_image, src_label.astype(np.uint8), src_affine, config, error_channels
        )
        paths = {
            "image": write_nifti(out_dir / "images" / f"{case_id}.nii.gz", image, affine, "revseg phantom CT"),
            "truth": write_nifti(out_dir / "labels_gt" / f"{case_id}.nii.gz", truth, affine, "phantom truth"),
            "ai": write_nifti(out_dir / "labels_ai" / f"{case_id}.nii.gz", ai, affine, "phantom AI-predicted"),
        }
        split = splits[index]
        lines[split].append(format_entry(paths["image"], paths["ai"], out_dir, covered))
        lines[f"{split}_gt"].append(format_entry(paths["image"], paths["truth"], out_dir, covered))
        cases[case_id] = {"split": split, "shape": list(image.shape), **params}

    for name, entries in lines.items():
        if entries:
            kind = "ground-truth" if name.endswith("_gt") else "AI-predicted"
            write_dataset_list(out_dir / f"{name}.txt", entries, header=f"revseg phantom cohort, {kind} labels")
    cohort = {
        "config": asdict(config),
        "source": {"case": config.source_case, "note": AI_LABEL_NOTE},
        "covered_classes": [CLASS_NAMES[c] for c in covered],
        "error_classes": [CLASS_NAMES[c] for c in error_channels],
        "cases": cases,
    }
    cohort_path = out_dir / "cohort.json"
    cohort_path.write_text(json.dumps(cohort, indent=1))
    log.info("phantom cohort of %d cases written to %s", config.num_cases, out_dir)
    return cohort_path


def _floats(text: str, count: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) == 1 and count == 3:
        values = values * 3
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (the cohort's data root)")
    parser.add_argument("--num-cases", type=int, default=PhantomConfig.num_cases)
    parser.add_argument("--seed", type=int, default=PhantomConfig.seed)
    parser.add_argument("--spacing", default="3", help="output spacing in mm: one value or x,y,z")
    parser.add_argument("--error-classes", default=",".join(SEED_REVISED_CLASSES),
                        help="classes whose AI labels carry errors (comma-separated)")
    parser.add_argument("--splits", default="0.6,0.2,0.2", help="train,val,test fractions")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the example CT lives")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = PhantomConfig(
        num_cases=args.num_cases, seed=args.seed, spacing=_floats(args.spacing, 3),  # type: ignore[arg-type]
        error_classes=tuple(CLASS_NAMES[c] for c in parse_class_list(args.error_classes)),
        split_fractions=_floats(args.splits, 3),  # type: ignore[arg-type]
    )
    print(build_cohort(args.out, config, args.data_dir))


if __name__ == "__main__":
    main()
