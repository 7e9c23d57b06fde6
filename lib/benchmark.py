"""Benchmarks measured in one run on this machine: inference latency and memory, scaling, training and scoring cost.

    python -m lib.benchmark              # make benchmark; about 10 min on 2 CPU cores, a few on a GPU
    python -m lib.benchmark --quick      # the 30-slice CT at 3 mm only, smaller sizes: about 3 min on CPU
    python -m lib.benchmark --full_ct    # CPU: the whole example CT at 1.5 mm too (~12 min per backbone here)

Figures (each printed with the device that produced it):

1. Latency and peak memory per CT of each backbone at the published widths (U-Net 19.08M, Swin UNETR
   62.19M parameters; random weights: latency does not depend on them) on the real example CT
   (``lib.example_ct``) at 3 mm and 1.5 mm, through :class:`lib.inference.Predictor` (load, preprocess,
   sliding window, inversion to the original grid, thresholding). On CUDA the paper's settings (96^3
   windows, overlap 0.5) after one warm-up pass; on CPU the CPU defaults (64^3, overlap 0.25), without
   warm-up. On CPU the 1.5 mm figure uses the 30-slice real CT (``example_ct_sm``, 20 windows) by default:
   the whole example CT at 1.5 mm is 100 windows of about 7 s each per backbone on a shared 2-core machine,
   so ``--full_ct`` measures it only on request.
2. How latency grows with volume size: the U-Net's sliding window on the example CT resampled to three
   spacings (CPU: 8, 6 and 4.5 mm, i.e. 1, 1 and 8 windows; CUDA: 3, 2 and 1.5 mm).
3. Round-2 cost: full / continual training time at the measured quality, read from a finished demo
   (``lib.experiment``) when one is present.
4. Attention scoring cost relative to plain inference: the two-backbone ensemble against one plain
   inference of each backbone, and a single model's four test-time flips against its plain inference.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (weights included); on CPU the peak rise of the
process's resident memory during the call (sampled every 2 ms), weights excluded.

On CPU the benchmark runs one torch thread by default (``--threads``): on the shared 2-core machine it
was measured as fast as two for the U-Net and twice as fast for Swin UNETR (idle OpenMP threads spin).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from lib.activelearning.score import score_case
from lib.classes import CLASS_NAMES
from lib.example_ct import example_case
from lib.inference import InferenceConfig, Predictor, sliding_window_probabilities
from lib.report import LEARNED_FLOOR, ExperimentResults, group_mean
from lib.transforms import IMAGE_KEY, CTPipelineConfig
from model.universal import BACKBONES, UniversalModel

T = TypeVar("T")
MB = 2**20
MEMORY_NOTE = {True: "torch.cuda.max_memory_allocated (weights included)",
               False: "peak rise of resident memory during the call (weights excluded)"}


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures and how; volumes are (example case, spacing in mm)."""

    roi: int
    overlap: float
    width: float
    latency: tuple[tuple[str, float], ...]
    sizes: tuple[tuple[str, float], ...]
    scoring: tuple[str, float]
    warmup: bool
    description: str


FULL, SMALL = "example_ct", "example_ct_sm"


def default_settings(device: torch.device, quick: bool, full_ct: bool = False) -> BenchSettings:
    """Paper settings on CUDA, the CPU defaults on CPU, sized to finish in about 10 minutes (``quick``: 3)."""
    if device.type == "cuda":
        return BenchSettings(
            roi=96, overlap=0.5, width=1.0, latency=((FULL, 3.0),) if quick else ((FULL, 3.0), (FULL, 1.5)),
            sizes=tuple((FULL, s) for s in ((6.0, 4.5, 3.0) if quick else (3.0, 2.0, 1.5))), scoring=(FULL, 3.0),
            warmup=True, description="paper settings (96^3 windows, overlap 0.5)",
        )
    if quick:
        latency, sizes, scoring = ((SMALL, 3.0),), ((SMALL, 6.0), (SMALL, 4.5), (SMALL, 3.0)), (SMALL, 6.0)
    else:
        latency = ((FULL, 3.0), (FULL if full_ct else SMALL, 1.5))
        sizes, scoring = ((FULL, 8.0), (FULL, 6.0), (FULL, 4.5)), (FULL, 6.0)  # 3 mm is in figure 1
    return BenchSettings(roi=64, overlap=0.25, width=1.0, latency=latency, sizes=sizes, scoring=scoring,
                         warmup=False, description="CPU defaults (64^3 windows, overlap 0.25)")


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
    case: str
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
    """Holds the models and the settings; each method measures one figure."""

    def __init__(self, settings: BenchSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.models = {name: random_model(name, settings.roi, settings.width, device) for name in BACKBONES}
        self.inference = InferenceConfig(roi_size=(settings.roi,) * 3, overlap=settings.overlap, device=str(device))

    def predictor(self, backbone: str, spacing: float) -> Predictor:
        return Predictor(self.models[backbone], CTPipelineConfig.from_spacing(spacing), self.inference)

    def _measurement(self, what: str, case: str, backbone: str, spacing: float, shape: Sequence[int],
                     seconds: float, peak: float) -> Measurement:
        windows = window_count(shape, self.settings.roi, self.settings.overlap)
        return Measurement(what, case, backbone, spacing, tuple(int(s) for s in shape), windows, seconds, peak)

    def predict_latency(self, case: str, backbone: str, spacing: float) -> Measurement:
        """Latency and peak memory of one whole CT through the Predictor."""
        image, _ = example_case(case)
        predictor = self.predictor(backbone, spacing)
        if self.settings.warmup:
            predictor.predict(image)
        prediction, seconds, peak = timed(lambda: predictor.predict(image), self.device)
        return self._measurement("predict", case, backbone, spacing, prediction.probabilities.shape[1:], seconds,
                                 peak)

    def preprocessed(self, case: str, spacing: float) -> dict:
        return self.predictor("unet", spacing).preprocess(example_case(case)[0])[0]

    def network_latency(self, case: str, backbone: str, spacing: float) -> Measurement:
        """Sliding-window inference alone on a preprocessed volume (no loading or inversion)."""
        image = self.preprocessed(case, spacing)[IMAGE_KEY][None]
        model = self.models[backbone]
        if self.settings.warmup:
            sliding_window_probabilities(model, image, self.inference)
        _, seconds, peak = timed(lambda: sliding_window_probabilities(model, image, self.inference), self.device)
        return self._measurement("sliding window", case, backbone, spacing, image.shape[2:], seconds, peak)

    def scoring_cost(self) -> dict[str, Any]:
        """Seconds of attention scoring (ensemble and flips) and of the plain inferences it replaces."""
        case, spacing = self.settings.scoring
        sample = self.preprocessed(case, spacing)
        image = sample[IMAGE_KEY][None]
        plain = {name: timed(lambda m=model: sliding_window_probabilities(m, image, self.inference), self.device)[1]
                 for name, model in self.models.items()}
        ensemble = timed(lambda: score_case(list(self.models.values()), sample, self.inference), self.device)[1]
        flips = timed(lambda: score_case([self.models["unet"]], sample, self.inference), self.device)[1]
        return {"plain_" + name: seconds for name, seconds in plain.items()} | {
            "ensemble_scoring": ensemble, "unet_flip_scoring": flips, "case": case, "spacing_mm": spacing,
            "ensemble_ratio": ensemble / sum(plain.values()), "flip_ratio": flips / plain["unet"],
        }


def demo_round2(demo: Path) -> dict[str, float] | None:
    """Full / continual round-2 time ratios and the revised-class Dice gap of a finished demo, if present."""
    if not (demo / "experiment.json").is_file():
        return None
    results = ExperimentResults.load(demo)
    full = results.costs["full"]
    full_revised = group_mean(results.scores["full"], results.revised)
    figures: dict[str, float] = {"full_revised_dice": full_revised}
    for run in ("continual", "continual_cached"):
        cost = results.costs[run]
        figures[f"{run}_training_ratio"] = full.training_seconds / cost.training_seconds
        figures[f"{run}_wall_ratio"] = full.wall_seconds / cost.wall_seconds
        gap = full_revised - group_mean(results.scores[run], results.revised)
        figures[f"{run}_revised_dice_gap_points"] = 100 * gap
    return figures


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU, {os.cpu_count()} cores"


def print_measurements(title: str, rows: Sequence[Measurement]) -> None:
    print(f"\n{title}")
    print(f"{'case':<14} {'backbone':<11} {'spacing':>7} {'volume':>13} {'Mvox':>6} {'windows':>7} "
          f"{'seconds':>8} {'s/window':>8} {'peak MB':>8}")
    for m in rows:
        volume = "x".join(str(s) for s in m.shape)
        print(f"{m.case:<14} {m.backbone:<11} {m.spacing_mm:>5.1f}mm {volume:>13} {m.megavoxels:>6.2f} "
              f"{m.windows:>7d} {m.seconds:>8.2f} {m.seconds / m.windows:>8.2f} {m.peak_mb:>8.0f}")


def growth_exponent(rows: Sequence[Measurement]) -> float:
    """Slope of log(seconds) against log(voxels) between the smallest and largest volume."""
    small, large = min(rows, key=lambda m: m.megavoxels), max(rows, key=lambda m: m.megavoxels)
    return math.log(large.seconds / small.seconds) / math.log(large.megavoxels / small.megavoxels)


def run_benchmark(settings: BenchSettings, device: torch.device, demo: Path) -> dict[str, Any]:
    """Measure and print every figure; returns them for ``--json``."""
    print(f"device: {device_name(device)}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{settings.description}; "
          f"width {settings.width:g}; peak memory: {MEMORY_NOTE[device.type == 'cuda']}")
    bench = Bench(settings, device)
    print("parameters: " + ", ".join(f"{n} {parameter_millions(m.backbone):.2f}M backbone "
                                     f"({parameter_millions(m):.2f}M with the class heads)"
                                     for n, m in bench.models.items()))
    latency = [bench.predict_latency(c, b, s) for c, s in settings.latency for b in BACKBONES]
    print_measurements("1. latency per CT (Predictor: load, preprocess, sliding window, inversion, masks)", latency)
    sizes = [bench.network_latency(c, "unet", s) for c, s in settings.sizes]
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
                  f"{round2[f'{run}_revised_dice_gap_points']:.2f} pt below full")
        if round2["full_revised_dice"] < LEARNED_FLOOR:
            print(f"   no evidence on quality: full training's revised-class Dice is "
                  f"{100 * round2['full_revised_dice']:.2f} pt < {100 * LEARNED_FLOOR:.0f}: nothing learned to compare")
    scoring = bench.scoring_cost()
    print(f"\n4. attention scoring ({scoring['case']} at {scoring['spacing_mm']:g} mm)")
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
    p.add_argument("--quick", action="store_true", help="the 30-slice CT at 3 mm only and smaller sizes")
    p.add_argument("--full_ct", action="store_true", help="CPU: time the whole example CT at 1.5 mm as well")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's on CUDA)")
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="finished experiment to read round 2 from")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--width", type=float, default=None, help="backbone width (default: published, 1)")
    p.add_argument("--roi", type=int, default=None, help="window size (default: 96 CUDA, 64 CPU)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap (default: 0.5 CUDA, 0.25 CPU)")
    p.add_argument("--spacings", type=_floats, default=None, help="latency spacings in mm, e.g. 3,1.5")
    p.add_argument("--size_spacings", type=_floats, default=None, help="spacings of the size series, e.g. 6,4.5,3")
    p.add_argument("--scoring_spacing", type=float, default=None, help="spacing of the scoring comparison")
    p.add_argument("--case", choices=(FULL, SMALL), default=None, help="run every measurement on this CT")
    return p


def _override(volumes: Sequence[tuple[str, float]], case: str | None, spacings: Sequence[float] | None,
              ) -> tuple[tuple[str, float], ...]:
    """The volumes on ``case`` (default: their own) at ``spacings`` (default: their own)."""
    if spacings is None:
        return tuple((case or c, s) for c, s in volumes)
    return tuple((case or volumes[0][0], s) for s in spacings)


def settings_from_args(args: argparse.Namespace, device: torch.device) -> BenchSettings:
    settings = default_settings(device, args.quick, args.full_ct)
    scoring_spacing = args.scoring_spacing if args.scoring_spacing is not None else settings.scoring[1]
    chosen: dict[str, Any] = {k: v for k, v in {"width": args.width, "roi": args.roi, "overlap": args.overlap}.items()
                              if v is not None}
    if args.case or args.spacings or args.size_spacings or args.scoring_spacing is not None:
        chosen |= {"latency": _override(settings.latency, args.case, args.spacings),
                   "sizes": _override(settings.sizes, args.case, args.size_spacings),
                   "scoring": (args.case or settings.scoring[0], scoring_spacing)}
    if chosen:
        chosen["description"] = f"{settings.description} with overrides {json.dumps(chosen)}"
    return replace(settings, **chosen)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    figures = run_benchmark(settings_from_args(args, device), device, args.demo)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
