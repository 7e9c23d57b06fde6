"""Benchmarks measured in one run on this machine: inference latency and memory, scaling, training and scoring cost.

    python -m lib.benchmark              # make benchmark; about 10 min on 2 CPU cores, less on a GPU
    python -m lib.benchmark --quick      # 3 mm only, smaller size series: a couple of minutes on CPU

Figures (each printed with the device that produced it):

1. Latency and peak memory per CT of each backbone at the published widths (U-Net 19.08M, Swin UNETR
   62.19M parameters; random weights: latency does not depend on them) on the real example CT
   (``lib.example_ct``) at 3 mm and 1.5 mm, through :class:`lib.inference.Predictor` (load, preprocess,
   sliding window, inversion to the original grid, thresholding). On CUDA the paper's settings (96^3
   windows, overlap 0.5) after one warm-up pass; on CPU the CPU defaults (64^3, overlap 0.25; the paper's
   settings take about 17 min per CT at 1.5 mm there), without warm-up.
2. How latency grows with volume size: the U-Net on the same CT resampled to three spacings.
3. Round-2 cost: full / continual training time at the measured quality, read from a finished demo
   (``lib.experiment``) when one is present.
4. Attention scoring cost relative to plain inference: the two-backbone ensemble against one plain
   inference of each backbone, and a single model's four test-time flips against its plain inference.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (weights included); on CPU the peak rise of the
process's resident memory during the call (sampled every 2 ms), weights excluded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lib.activelearning.score import score_case
from lib.classes import CLASS_NAMES
from lib.example_ct import example_case
from lib.inference import InferenceConfig, Predictor, sliding_window_probabilities
from lib.report import ExperimentResults, group_mean
from lib.transforms import IMAGE_KEY, CTPipelineConfig
from model.universal import BACKBONES, UniversalModel

T = TypeVar("T")
MB = 2**20


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures and how."""

    roi: int
    overlap: float
    width: float
    latency_spacings: tuple[float, ...]
    size_spacings: tuple[float, ...]
    scoring_spacing: float
    warmup: bool
    description: str


def default_settings(device: torch.device, quick: bool) -> BenchSettings:
    """Paper settings on CUDA, the CPU defaults on CPU; ``quick`` drops 1.5 mm and the finest size."""
    cuda = device.type == "cuda"
    return BenchSettings(
        roi=96 if cuda else 64, overlap=0.5 if cuda else 0.25, width=1.0,
        latency_spacings=(3.0,) if quick else (3.0, 1.5),
        size_spacings=(6.0, 4.5, 3.0) if quick or not cuda else (3.0, 2.0, 1.5),
        scoring_spacing=3.0, warmup=cuda,
        description=("paper settings (96^3 windows, overlap 0.5)" if cuda
                     else "CPU defaults (64^3 windows, overlap 0.25)"),
    )


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux), else its lifetime peak (``ru_maxrss``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak, or the sampled peak rise of the process's RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes() - base)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(current_rss_bytes(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """(result, seconds, peak MB) of one call, synchronising CUDA so the time is the device's."""
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return result, seconds, memory.peak_bytes / MB


def window_count(shape: Sequence[int], roi: int, overlap: float) -> int:
    """Sliding windows MONAI runs over a volume (its scan interval: ``int(roi * (1 - overlap))``)."""
    interval = max(1, int(roi * (1 - overlap)))
    return math.prod(1 if s <= roi else math.ceil((s - roi) / interval) + 1 for s in shape)


def random_model(backbone: str, roi: int, width: float, device: torch.device) -> UniversalModel:
    """A randomly initialised universal model (latency does not depend on the weights)."""
    torch.manual_seed(0)
    return UniversalModel(backbone, CLASS_NAMES, roi_size=(roi,) * 3, width=width).to(device).eval()


def parameter_millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@dataclass(frozen=True)
class Measurement:
    """One timed call on one volume."""

    what: str
    backbone: str
    spacing_mm: float
    shape: tuple[int, ...]
    windows: int
    seconds: float
    peak_mb: float

    @property
    def megavoxels(self) -> float:
        return math.prod(self.shape) / 1e6


# ----------------------------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------------------------


class Bench:
    """Holds the models, the CT and the settings; each method measures one figure."""

    def __init__(self, settings: BenchSettings, device: torch.device, image: Path):
        self.settings, self.device, self.image = settings, device, image
        self.models = {name: random_model(name, settings.roi, settings.width, device) for name in BACKBONES}
        self.inference = InferenceConfig(roi_size=(settings.roi,) * 3, overlap=settings.overlap, device=str(device))

    def predictor(self, backbone: str, spacing: float) -> Predictor:
        return Predictor(self.models[backbone], CTPipelineConfig.from_spacing(spacing), self.inference)

    def predict_latency(self, backbone: str, spacing: float) -> Measurement:
        """Latency and peak memory of one whole CT through the Predictor."""
        predictor = self.predictor(backbone, spacing)
        if self.settings.warmup:
            predictor.predict(self.image)
        prediction, seconds, peak = timed(lambda: predictor.predict(self.image), self.device)
        shape = tuple(prediction.probabilities.shape[1:])
        return Measurement("predict", backbone, spacing, shape, window_count(shape, self.settings.roi,
                                                                             self.settings.overlap), seconds, peak)

    def network_latency(self, backbone: str, spacing: float) -> Measurement:
        """Sliding-window inference alone on a preprocessed volume (no loading or inversion)."""
        sample = self.predictor(backbone, spacing).preprocess(self.image)[0]
        image = sample[IMAGE_KEY][None]
        if self.settings.warmup:
            sliding_window_probabilities(self.models[backbone], image, self.inference)
        _, seconds, peak = timed(lambda: sliding_window_probabilities(self.models[backbone], image, self.inference),
                                 self.device)
        shape = tuple(image.shape[2:])
        return Measurement("sliding window", backbone, spacing, shape,
                           window_count(shape, self.settings.roi, self.settings.overlap), seconds, peak)

    def scoring_cost(self) -> dict[str, float]:
        """Seconds of attention scoring (ensemble and flips) and of the plain inferences it replaces."""
        spacing = self.settings.scoring_spacing
        sample = self.predictor("unet", spacing).preprocess(self.image)[0]
        image = sample[IMAGE_KEY][None]
        plain = {name: timed(lambda m=model: sliding_window_probabilities(m, image, self.inference), self.device)[1]
                 for name, model in self.models.items()}
        ensemble = timed(lambda: score_case(list(self.models.values()), sample, self.inference), self.device)[1]
        flips = timed(lambda: score_case([self.models["unet"]], sample, self.inference), self.device)[1]
        return {"plain_" + name: seconds for name, seconds in plain.items()} | {
            "ensemble_scoring": ensemble, "unet_flip_scoring": flips, "spacing_mm": spacing,
            "ensemble_ratio": ensemble / sum(plain.values()), "flip_ratio": flips / plain["unet"],
        }


def demo_round2(demo: Path) -> dict[str, float] | None:
    """Full / continual round-2 time ratios and the revised-class Dice gap of a finished demo, if present."""
    if not (demo / "experiment.json").is_file():
        return None
    results = ExperimentResults.load(demo)
    full = results.costs["full"]
    figures: dict[str, float] = {}
    for run in ("continual", "continual_cached"):
        cost = results.costs[run]
        figures[f"{run}_training_ratio"] = full.training_seconds / cost.training_seconds
        figures[f"{run}_wall_ratio"] = full.wall_seconds / cost.wall_seconds
        gap = group_mean(results.scores["full"], results.revised) - group_mean(results.scores[run], results.revised)
        figures[f"{run}_revised_dice_gap_points"] = 100 * gap
    return figures


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def print_measurements(title: str, rows: Sequence[Measurement]) -> None:
    print(f"\n{title}")
    print(f"{'backbone':<11} {'spacing':>7} {'volume':>15} {'Mvox':>6} {'windows':>7} {'seconds':>8} "
          f"{'s/Mvox':>7} {'peak MB':>8}")
    for m in rows:
        volume = "x".join(str(s) for s in m.shape)
        print(f"{m.backbone:<11} {m.spacing_mm:>5.1f}mm {volume:>15} {m.megavoxels:>6.2f} {m.windows:>7d} "
              f"{m.seconds:>8.2f} {m.seconds / m.megavoxels:>7.2f} {m.peak_mb:>8.0f}")


def growth_exponent(rows: Sequence[Measurement]) -> float:
    """Slope of log(seconds) against log(voxels) between the smallest and largest volume."""
    small, large = min(rows, key=lambda m: m.megavoxels), max(rows, key=lambda m: m.megavoxels)
    return math.log(large.seconds / small.seconds) / math.log(large.megavoxels / small.megavoxels)


def run_benchmark(settings: BenchSettings, device: torch.device, image: Path, demo: Path) -> dict[str, Any]:
    """Measure and print every figure; returns them for ``--json``."""
    print(f"device: {device_name(device)}; torch {torch.__version__}; {settings.description}; "
          f"width {settings.width:g}; CT {image.name}")
    bench = Bench(settings, device, image)
    print("parameters: " + ", ".join(f"{n} {parameter_millions(m):.2f}M" for n, m in bench.models.items()))
    latency = [bench.predict_latency(b, s) for s in settings.latency_spacings for b in BACKBONES]
    print_measurements("1. latency per CT (Predictor: load, preprocess, sliding window, inversion, masks)", latency)
    sizes = [bench.network_latency("unet", s) for s in settings.size_spacings]
    print_measurements("2. latency against volume size (U-Net, sliding window only)", sizes)
    if len(sizes) > 1:
        print(f"   seconds grow as voxels^{growth_exponent(sizes):.2f} "
              f"({sizes[0].megavoxels:.2f} -> {sizes[-1].megavoxels:.2f} Mvoxels)")
    round2 = demo_round2(demo)
    print("\n3. round-2 training time, full / continual (from the demo report)")
    if round2 is None:
        print(f"   no finished demo in {demo}: run `make demo` first")
    else:
        for run, label in (("continual", "continual"), ("continual_cached", "continual + feature cache")):
            print(f"   {label:<26} {round2[f'{run}_training_ratio']:6.1f}x training wall, "
                  f"{round2[f'{run}_wall_ratio']:6.1f}x total wall; revised-class Dice "
                  f"{-round2[f'{run}_revised_dice_gap_points']:+.2f} pt vs full")
    scoring = bench.scoring_cost()
    print(f"\n4. attention scoring at {scoring['spacing_mm']:g} mm")
    print(f"   ensemble (U-Net + Swin UNETR): {scoring['ensemble_scoring']:.2f} s = {scoring['ensemble_ratio']:.2f}x "
          f"plain inference of both ({scoring['plain_unet']:.2f} s + {scoring['plain_swin_unetr']:.2f} s)")
    print(f"   one model, 4 test-time flips:  {scoring['unet_flip_scoring']:.2f} s = {scoring['flip_ratio']:.2f}x "
          f"plain U-Net inference")
    return {"device": device_name(device), "settings": asdict(settings),
            "latency": [asdict(m) for m in latency], "sizes": [asdict(m) for m in sizes],
            "round2": round2, "scoring": scoring}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 mm only and a coarser size series")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="finished experiment to read round 2 from")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--width", type=float, default=None, help="backbone width (default: published, 1)")
    p.add_argument("--roi", type=int, default=None, help="window size (default: 96 CUDA, 64 CPU)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap (default: 0.5 CUDA, 0.25 CPU)")
    p.add_argument("--spacings", type=_floats, default=None, help="latency spacings in mm, e.g. 3,1.5")
    p.add_argument("--size_spacings", type=_floats, default=None, help="spacings of the size series, e.g. 6,4.5,3")
    p.add_argument("--case", default="example_ct", help="example case: example_ct or example_ct_sm")
    return p


def settings_from_args(args: argparse.Namespace, device: torch.device) -> BenchSettings:
    settings = default_settings(device, args.quick)
    overrides = {"width": args.width, "roi": args.roi, "overlap": args.overlap, "latency_spacings": args.spacings,
                 "size_spacings": args.size_spacings}
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if args.spacings is not None:
        chosen["scoring_spacing"] = max(args.spacings)
    if chosen:
        chosen["description"] = settings.description + " with overrides " + json.dumps(chosen)
    return BenchSettings(**(asdict(settings) | chosen))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    settings = settings_from_args(args, device)
    image, _ = example_case(args.case)
    figures = run_benchmark(settings, device, image, args.demo)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
