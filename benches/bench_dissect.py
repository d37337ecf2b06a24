"""Benchmark: Network Dissection in one pass against a NetDissect-Lite-style baseline.

Three settings, each on probe batches decoded once into memory (decoding is timed for
none), with

- ours: :func:`advinterp.metrics.dissect.dissect`, one pass of the model: exact top-tail
  thresholds (:class:`~advinterp.stats.TopQuantile`) and IoU counts kept until they are
  known (:class:`~advinterp.stats.DeferredIoU`);
- the baseline: :func:`netdissect_lite`, NetDissect-Lite's algorithm
  (``feature_operation.py``): every activation in one float64 array, thresholds by
  ``np.percentile``, then a Python loop over images and units;
- a plain forward pass over the probe (the floor of any method that runs the model);

run alternately (order reversed every other round), ``--rounds`` times each:

- ``28``: the embedded ``fashion-broden`` probe (``--probe-size`` images, 28×28, pixel
  masks for color, object and texture), the default model's ``layer2`` (32×14×14) and
  ``layer3`` (64×7×7);
- ``224-efficientnet_lite0`` (its shipped ImageNet weights; ``blocks.5``, ``blocks.6``:
  192 and 320 maps of 7×7) and ``224-resnet18`` (torchvision's, random weights;
  ``layer3``, ``layer4``: 256×14×14 and 512×7×7), on ``--size-224`` images at 224² in
  Broden's layout made from the photos scikit-image and scikit-learn ship (random
  crops and mirrors; colour bands and an object box at 112², a scene label per image).

Reported per setting: images/second (median round) and the ratio (goal: ours ≥ 3× the
baseline), with its bound (the baseline's time over a forward pass alone: what a method
whose statistics cost nothing would reach); each run's peak memory above the process's
memory at its start, from its RSS sampled every 2 ms (goal: ours ≤ 1/10 of the
baseline), in one more untimed run of each with glibc made to return freed memory at
once, so that the RSS is the live allocations (see :class:`PeakRSS`), and what each
holds beyond a forward pass; the exactness of ours against Network Dissection as defined
(thresholds by ``torch.quantile`` over every activation, IoU counted in a second pass):
thresholds bit for bit, the largest IoU difference, the units whose best concept
differs; and, at 28², the thresholds' relative error for NetDissect-Lite's own estimator
(its KLL sketch of 24,576 values read at 994/999, ``quantile_threshold``) and for our
previous one (a KLL sketch of 8,192 values). Then what each would hold at Broden's scale,
the per-image cost of ours on ``--device`` for ResNet-18's ``layer4`` at 224² (images per
second, and the hours for Broden's 63,305 images), and, unless ``--no-scaling``, how our
cost grows at 28² (batch size, images, units), under ``"scaling"``. Dissection here runs
in one process. Timings on a shared machine are noisy: compare only ratios from one run.
The 28² model is the demo run's (``runs/demo/resnet``) when it exists, else the default
architecture with random weights (speed does not depend on them). Stored under
``"dissect"`` in ``benches/results.json`` (the 224² settings under ``"settings_224"``).
Not part of the tests::

    .venv/bin/python -m benches.bench_dissect [--probe-size 3000] [--size-224 32] [--rounds 2]
        [--threads 1] [--device cuda]   # the per-image figure on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advinterp.analysis.dissection import default_dissect_layers
from advinterp.data.broden import BrodenProbe, probe_batches
from advinterp.data.fashion_broden import fashion_broden
from advinterp.metrics.dissect import dissect, label_categories
from advinterp.models import create_model, load_model
from advinterp.stats import DeferredIoU, IoUCounts, Quantile, TopQuantile

try:
    from benches.common import interleave, machine, median, save_results, set_threads
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import interleave, machine, median, save_results, set_threads

LAYERS = ["layer2", "layer3"]
QUANTILE = 0.995
GOALS = {"speed_ratio": 3.0, "memory_ratio": 0.1}
DEMO_MODEL = Path(__file__).resolve().parents[1] / "runs" / "demo" / "resnet"
# NetDissect's Broden release and ResNet-18's layer4: what the baseline's array would hold.
BRODEN_IMAGES, BRODEN_UNITS, BRODEN_MAP, BRODEN_LABELS, BRODEN_CATEGORIES = 63_305, 512, 49, 1198, 6
# NetDissect-Lite's threshold estimator: a KLL sketch (util/vecquantile.py, default
# resolution) read out at 1000 evenly spaced levels, taking index int(1000·0.995 − 1).
LITE_RESOLUTION, LITE_READOUT = 24 * 1024, 994 / 999
PREVIOUS_RESOLUTION = 8192  # our sketch before the exact top-tail store
MB = 1e6


@dataclass
class Setting:
    """A model, the layers to dissect and a probe decoded into batches."""

    key: str
    title: str
    model: torch.nn.Module
    layers: list[str]
    batches: list
    categories: dict[str, list[int]]
    labels: list[str]

    @property
    def images(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def run(self, task: str):
        if task == "ours":
            return dissect(self.model, self.layers, self.batches, self.categories, self.labels)
        if task == "baseline":
            return netdissect_lite(
                self.model, self.layers, self.batches, self.categories, self.labels
            )
        return forward(self.model, self.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe-size", type=int, default=3000, help="fashion-broden images")
    parser.add_argument("--size-224", type=int, default=32, help="224² probe images (0: none)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the interleaved runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--model", help=f"checkpoint (default: {DEMO_MODEL} if it exists)")
    parser.add_argument(
        "--device", default="cpu", help="where to measure the per-image cost (cuda: a GPU)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    parser.add_argument(
        "--scaling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time ours at other batch sizes, probe sizes and layers (~40 s)",
    )
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)
    cpu = torch.device("cpu")  # the baseline is numpy, and peak memory is the process's RSS
    info = machine(cpu)
    settings = build_settings(args)
    for s in settings:  # warm-up: oneDNN kernels, the allocator, numpy's first calls
        warm = Setting(s.key, s.title, s.model, s.layers, s.batches[:2], s.categories, s.labels)
        warm.run("ours")
        warm.run("baseline")
    if args.memory_only:  # the child of measure_memory
        peaks = {}
        for s in settings:
            peaks[s.key] = {}
            for task in ("ours", "baseline", "forward"):
                with PeakRSS() as rss:
                    s.run(task)
                peaks[s.key][task] = rss.peak
        print(json.dumps(peaks))
        return

    results = {}
    for s in settings:
        print(f"\n{s.title}", flush=True)
        results[s.key] = compare(s, args.rounds)
    live = measure_memory()
    for key, r in results.items():
        add_memory(r, live[key])
        print_setting(r)
    fashion = next(s for s in settings if s.key == "28")
    errors = threshold_errors(fashion, results["28"].pop("features"))
    for r in results.values():
        r.pop("features", None)
    print_threshold_errors(errors)
    scale = broden_scale(args.batch_size)
    print_broden(scale)
    cost = per_image_cost(torch.device(args.device), args.threads)
    print_cost(cost)
    scale_rows = scaling(fashion) if args.scaling else None
    if scale_rows:
        print_scaling(scale_rows)
    elapsed = time.perf_counter() - started
    main28 = results.pop("28")
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_dissect", *sys.argv[1:]]
        ),
        "machine": info,
        "settings": {
            "probe": f"fashion-broden n={fashion.images} 28×28",
            "images": fashion.images,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "layers": main28["layers"],
            "model": fashion.title.split("model ")[-1],
            "quantile": QUANTILE,
            "method": "one pass: exact top-tail thresholds, IoU counts kept until known",
            "baseline": "NetDissect-Lite feature_operation.py, float64 features in memory",
        },
        "goals": GOALS,
        **{k: v for k, v in main28.items() if k not in ("layers", "title")},
        "threshold_error": errors,
        "settings_224": results,
        "broden_scale": scale,
        "per_image_cost": cost,
        "scaling": scale_rows,
        "elapsed_s": elapsed,
    }
    if not args.no_save:
        path = save_results("dissect", result)
        print(f"\nwrote {path} (key 'dissect'); {elapsed:.0f} s in all")


def forward(model, batches) -> None:
    """The floor: one plain forward pass over the probe."""
    with torch.inference_mode():
        for images, _ in batches:
            model(images)


# -- the settings ----------------------------------------------------------------------------


def build_settings(args) -> list[Setting]:
    """The 28² setting, then the 224² ones (``--size-224`` images; none with 0)."""
    torch.manual_seed(0)
    checkpoint = args.model or (str(DEMO_MODEL) if (DEMO_MODEL / "model.json").is_file() else None)
    model = (load_model(checkpoint) if checkpoint else create_model("resnet")).eval()
    probe = BrodenProbe(fashion_broden(n=args.probe_size), in_chans=1, input_size=28)
    batches = list(probe_batches(probe, args.batch_size))
    shapes = layer_shapes(model, batches[0][0][:1], LAYERS)
    title = (
        f"28²: fashion-broden, {len(probe)} images 28×28, "
        + ", ".join(f"{k} {'×'.join(map(str, s))}" for k, s in shapes.items())
        + f", batches of {args.batch_size}, model {checkpoint or 'resnet (random weights)'}"
    )
    settings = [Setting("28", title, model, LAYERS, batches, probe.categories, probe.labels)]
    if args.size_224 <= 0:
        return settings
    batches, categories, labels = photo_probe(args.size_224, batch_size=16)
    for name in ("efficientnet_lite0", "resnet18"):
        torch.manual_seed(0)
        model = load_model(name, weights=None if name == "efficientnet_lite0" else "random")
        model = model.eval()
        layers = default_dissect_layers(model)
        shapes = layer_shapes(model, batches[0][0][:1], layers)
        weights = "ImageNet weights" if name == "efficientnet_lite0" else "random weights"
        title = (
            f"224²: {name} ({weights}), {args.size_224} photo crops 224×224, masks 112×112, "
            + ", ".join(f"{k} {'×'.join(map(str, s))}" for k, s in shapes.items())
            + ", batches of 16"
        )
        settings.append(Setting(f"224-{name}", title, model, layers, batches, categories, labels))
    return settings


PHOTO_OBJECTS = {  # photo → (object, scene)
    "astronaut": ("person", "outdoor"),
    "chelsea": ("cat", "indoor"),
    "coffee": ("cup", "indoor"),
    "rocket": ("rocket", "outdoor"),
    "china": ("building", "outdoor"),
    "flower": ("flower", "outdoor"),
}
COLOR_NAMES = ("dark", "red", "green", "blue", "white")


def photo_probe(n: int, batch_size: int = 16, seed: int = 0):
    """``n`` images at 224² in Broden's layout, made offline from six shipped photos: a random
    square crop (40–100% of the short side) of a photo in turn, mirrored half the time; at
    112², ``color`` (dark, white, else the strongest channel) and ``object`` (the photo's
    object over the crop's central half) pixel masks, and an image-level ``scene``.
    Returns ``(batches, categories, labels)``."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {Path(f).stem: im for f, im in zip(sample.filenames, sample.images, strict=True)}
    photos |= {k: getattr(skimage.data, k)() for k in ("astronaut", "chelsea", "coffee", "rocket")}
    names = list(PHOTO_OBJECTS)
    objects = sorted({o for o, _ in PHOTO_OBJECTS.values()})
    scenes = sorted({s for _, s in PHOTO_OBJECTS.values()})
    labels = ["-", *COLOR_NAMES, *objects, *scenes]
    number = {name: k for k, name in enumerate(labels)}
    categories = {
        "color": [number[c] for c in COLOR_NAMES],
        "object": [number[o] for o in objects],
        "scene": [number[s] for s in scenes],
    }
    gen = np.random.default_rng(seed)
    images, color, obj, scene = [], [], [], []
    for i in range(n):
        name = names[i % len(names)]
        photo = torch.from_numpy(np.array(photos[name])).permute(2, 0, 1)
        h, w = photo.shape[1:]
        side = int(min(h, w) * gen.uniform(0.4, 1.0))
        top, left = gen.integers(0, h - side + 1), gen.integers(0, w - side + 1)
        crop = photo[:, top : top + side, left : left + side].float()[None] / 255
        if gen.random() < 0.5:
            crop = crop.flip(3)
        images.append(F.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True)[0])
        small = F.interpolate(crop, size=(112, 112), mode="bilinear", antialias=True)[0] * 255
        bands = 2 + small.argmax(0)
        bright, spread = small.mean(0), small.amax(0) - small.amin(0)
        bands[bright < 60] = 1
        bands[(bright > 200) & (spread < 40)] = 5
        color.append(bands)
        box = torch.zeros(112, 112, dtype=torch.int64)
        box[28:84, 28:84] = number[PHOTO_OBJECTS[name][0]]
        obj.append(box)
        scene.append(number[PHOTO_OBJECTS[name][1]])
    images = torch.stack(images).clamp(0, 1)
    masks = {
        "color": torch.stack(color)[:, None],
        "object": torch.stack(obj)[:, None],
        "scene": torch.tensor(scene)[:, None],
    }
    batches = [
        (images[s : s + batch_size], {k: m[s : s + batch_size] for k, m in masks.items()})
        for s in range(0, n, batch_size)
    ]
    return batches, categories, labels


# -- one setting -----------------------------------------------------------------------------


def compare(s: Setting, rounds: int) -> dict:
    """Time ours, the baseline and a forward pass on ``s``; our exactness against the
    two-pass definition, from the baseline's features."""
    n = s.images
    peaks: dict[str, list[float]] = {t: [] for t in ("ours", "baseline", "forward")}

    def measured(task):
        def run():
            with PeakRSS() as rss:
                out = s.run(task)
            peaks[task].append(rss.peak)
            return out

        return run

    def progress(r: int, t: dict[str, float]) -> None:
        rss = {k: v[-1] / MB for k, v in peaks.items()}
        print(
            f"  round {r + 1}: ours {n / t['ours']:.0f} img/s (RSS {rss['ours']:.0f} MB), "
            f"baseline {n / t['baseline']:.0f} img/s (RSS {rss['baseline']:.0f} MB), "
            f"forward pass {n / t['forward']:.0f} img/s",
            flush=True,
        )

    timed = {task: measured(task) for task in peaks}
    times, last = interleave(timed, rounds, torch.device("cpu"), progress)
    med = {k: median(v) for k, v in times.items()}
    features = {layer: out["features"] for layer, out in last["baseline"].items()}
    exact = exactness(s, last["ours"], last["baseline"])
    shapes = {layer: list(f.shape[1:]) for layer, f in features.items()}
    return {
        "title": s.title,
        "images": n,
        "layers": shapes,
        "ours_ips": n / med["ours"],
        "baseline_ips": n / med["baseline"],
        "forward_ips": n / med["forward"],
        "speed_ratio": med["baseline"] / med["ours"],
        "speed_met": med["baseline"] / med["ours"] >= GOALS["speed_ratio"],
        # Were our statistics free, ours would take one forward pass.
        "speed_ratio_bound": med["baseline"] / med["forward"],
        "agreement": exact,
        "times_s": times,
        "rss_peak_mb_default_malloc": {k: max(v) / MB for k, v in peaks.items()},
        "features": features,
    }


def add_memory(r: dict, live: dict[str, int]) -> None:
    """Peak memory (live allocations, from the child), its ratio, and beyond a forward pass."""
    r["ours_peak_mb"] = live["ours"] / MB
    r["baseline_peak_mb"] = live["baseline"] / MB
    r["forward_peak_mb"] = live["forward"] / MB
    r["memory_ratio"] = live["ours"] / live["baseline"]
    r["memory_met"] = r["memory_ratio"] <= GOALS["memory_ratio"]
    extra = {k: max(0, live[k] - live["forward"]) for k in ("ours", "baseline")}
    r["extra_over_forward_mb"] = {k: v / MB for k, v in extra.items()}
    r["extra_ratio"] = extra["ours"] / max(1, extra["baseline"])
    default = r["rss_peak_mb_default_malloc"]
    r["memory_ratio_default_malloc"] = default["ours"] / default["baseline"]


def exactness(s: Setting, ours: dict, baseline: dict) -> dict:
    """Ours against Network Dissection as defined, computed from the baseline's features (the
    same maps, float64 copies of float32): thresholds by ``torch.quantile`` over every
    activation, then the IoU counted at them (:class:`IoUCounts`, itself checked against a
    brute force in the tests); and the baseline's own thresholds (``np.percentile``)."""
    label_category = label_categories(s.categories, len(s.labels))
    names = list(s.categories)
    out = {"layers": {}}
    for layer, ref in baseline.items():
        feats = torch.from_numpy(ref["features"]).float()
        values = feats.transpose(0, 1).reshape(feats.shape[1], -1)
        thresholds = torch.quantile(values, QUANTILE, dim=1)
        counts = IoUCounts(feats.shape[1], len(s.labels), label_category, len(names))
        start = 0
        for images, masks in s.batches:
            maps = feats[start : start + len(images)]
            start += len(images)
            counts.add(maps, thresholds, {names.index(c): m for c, m in masks.items()})
        iou = counts.result()
        mine = ours[layer]
        first, second = iou.topk(2, dim=1).values.unbind(1)
        differ = mine.iou.argmax(1) != iou.argmax(1)
        out["layers"][layer] = {
            "units": feats.shape[1],
            "thresholds_equal": bool(torch.equal(mine.thresholds, thresholds)),
            "max_rel_threshold_diff": float(_relative(mine.thresholds, thresholds).max()),
            "baseline_percentile_rel_diff": float(
                _relative(torch.from_numpy(ref["thresholds"]), thresholds.double()).max()
            ),
            "max_iou_diff": float((mine.iou - iou).abs().max()),
            "best_label_differs": int(differ.sum()),
            "best_label_differs_clear": int((differ & (first - second > 1e-3)).sum()),
            "baseline_max_iou_diff": float((torch.from_numpy(ref["iou"]) - iou).abs().max()),
        }
    rows = out["layers"].values()
    out["thresholds_equal"] = all(r["thresholds_equal"] for r in rows)
    out["max_iou_diff"] = max(r["max_iou_diff"] for r in rows)
    out["best_label_differs"] = sum(r["best_label_differs"] for r in rows)
    out["units"] = sum(r["units"] for r in rows)
    out["best_label_agreement"] = 1 - out["best_label_differs"] / out["units"]
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| / |b|, 0 where both are 0."""
    a, b = a.double(), b.double()
    return torch.where(b != 0, (a - b).abs() / b.abs().clamp(min=1e-30), (a != b).double())


def threshold_errors(s: Setting, features: dict) -> dict:
    """How far each estimator's thresholds are from the exact 0.995 quantiles, per layer: the
    largest rank error (the share of a unit's activations between the estimate and the
    exact value), the largest |ΔT| over the unit's activation range, and the median
    |ΔT| / |T| (a median: near-zero thresholds make the relative error of a few units
    meaningless), for NetDissect-Lite's estimator, our previous sketch and ours."""
    out = {}
    for layer, feats in features.items():
        feats = torch.from_numpy(feats).float()
        units = feats.shape[1]
        values = feats.transpose(0, 1).reshape(units, -1)
        exact = torch.quantile(values, QUANTILE, dim=1)
        lite = Quantile(units, resolution=LITE_RESOLUTION, seed=1)
        previous = Quantile(units, resolution=PREVIOUS_RESOLUTION)
        ours = TopQuantile(units, QUANTILE, total=values.shape[1])
        for start in range(0, len(feats), 64):  # Lite's batches of 64 images
            rows = feats[start : start + 64].permute(0, 2, 3, 1).reshape(-1, units)
            lite.add(rows)
            previous.add(rows)
            ours.add(feats[start : start + 64])
        estimates = {
            "netdissect_lite": lite_readout(lite, feats).float(),
            f"previous_sketch_{PREVIOUS_RESOLUTION}": previous.quantile(QUANTILE),
            "ours": ours.quantile(),
        }
        span = (values.amax(1) - values.amin(1)).double().clamp(min=1e-30)
        out[layer] = {}
        for name, t in estimates.items():
            low, high = torch.minimum(t, exact), torch.maximum(t, exact)
            between = ((values > low[:, None]) & (values < high[:, None])).double().mean(1)
            out[layer][name] = {
                "max_rank_error": float(between.max()),
                "max_range_error": float(((t - exact).abs().double() / span).max()),
                "median_relative_error": float(_relative(t, exact).median()),
            }
    return out


def lite_readout(sketch: Quantile, feats: torch.Tensor) -> torch.Tensor:
    """NetDissect-Lite's read-out of a KLL sketch (``QuantileVector.readout(1000)[:, 994]``):
    the values with the extremes (weight 0) at both ends, each at the middle of its weight
    along the cumulative count, normalised from the first to the last, interpolated at
    994/999."""
    values, weights = sketch.summary()
    low = feats.amin(dim=(0, 2, 3))[:, None]
    high = feats.amax(dim=(0, 2, 3))[:, None]
    values = torch.cat([low, values, high], dim=1).double().numpy()
    weights = torch.cat([torch.zeros_like(low), weights, torch.zeros_like(high)], dim=1)
    cumulative = (weights.double().cumsum(1) - weights.double() / 2).numpy()
    cumulative -= cumulative[:, :1]
    cumulative /= cumulative[:, -1:]
    return torch.tensor(
        [np.interp(LITE_READOUT, c, v) for c, v in zip(cumulative, values, strict=True)]
    )


# -- the per-image cost on a device ------------------------------------------------------------


def per_image_cost(device: torch.device, threads: int, images: int | None = None) -> dict:
    """Ours and a forward pass on ResNet-18's ``layer4`` at 224² (random weights, 512×7×7
    maps, masks 112²) on ``device``: images/second, and what Broden's 63,305 images take."""
    images = images or (512 if device.type == "cuda" else 32)
    batch = 64 if device.type == "cuda" else 16
    batches, categories, labels = photo_probe(images, batch_size=batch, seed=1)
    torch.manual_seed(0)
    model = load_model("resnet18", weights="random").eval().to(device)
    batches = [(x.to(device), m) for x, m in batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def run(task):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if task == "ours":
            dissect(model, "layer4", batches, categories, labels)
        else:
            forward(model, batches)
        sync()
        return time.perf_counter() - t0

    run("ours")  # warm-up: kernels, the allocator
    ours, plain = min(run("ours") for _ in range(2)), min(run("forward") for _ in range(2))
    ips = images / ours
    return {
        "device": str(device),
        "device_name": name,
        "threads": threads,
        "layer": "resnet18 layer4 (512×7×7), masks 112×112",
        "images": images,
        "batch_size": batch,
        "ours_ips": ips,
        "forward_ips": images / plain,
        "broden_images": BRODEN_IMAGES,
        "broden_hours": BRODEN_IMAGES / ips / 3600,
    }


# -- the reference method ------------------------------------------------------------------


def netdissect_lite(model, layers, batches, categories, labels, quantile=QUANTILE) -> dict:
    """Network Dissection as NetDissect-Lite computes it: the reference method of this bench.

    NetDissect-Lite (CSAILVision/NetDissect-Lite, ``feature_operation.py``), per layer:

    1. ``feature_extraction``: one forward pass; a hook copies each batch's maps into
       one ``N×U×h×w`` array of every probe image, ``dtype=float`` (float64, 8 bytes
       a value: 63,305 × 512 × 7 × 7 × 8 = 12.7 GB for ResNet-18's layer4 on Broden),
       and each unit's spatial max into ``N×U``. Lite writes a memmap on disk; here
       it is ``np.zeros`` in memory (Lite's ``memmap=False`` path).
    2. ``quantile_threshold``: ``np.percentile(features, 100·quantile, axis=(0, 2, 3))``,
       an exact quantile by partitioning every value of every unit (linear interpolation).
    3. ``tally_job``: a Python loop over images, and in it over units: a unit whose map
       max exceeds its threshold is upsampled (bilinear) to the mask size, thresholded,
       and the labels under its mask counted (``np.bincount``) into ``tally_both``
       (an image-level label, as scene: the whole mask); label areas into ``tally_labels``; the mask's area into ``tally_units_cat``
       for the categories annotated in the image.
    4. ``IoU = tally_both / (tally_units_cat[:, category(label)] + tally_labels
       − tally_both + 1e-10)``.

    Two changes, neither against the baseline's speed: Lite upsamples one unit at a time
    (``scipy.misc.imresize(map, mode='F')``, PIL's float32 bilinear); here one
    ``F.interpolate`` per image does all units (PIL's bilinear and torch's
    ``align_corners=False`` agree to 1 ulp when enlarging, and it is ~10× faster than
    a PIL call per unit). And a unit's area counts in a category's union on the images
    where the category is annotated (Bau et al.'s definition, as
    :class:`~advinterp.stats.IoUCounts`) rather than Lite's images where one of the
    category's labels lies under the unit's mask.

    Returns ``{layer: {"thresholds", "iou", "features"}}`` (numpy).
    """
    label_category = label_categories(categories, len(labels)).numpy()
    names = list(categories)
    num_labels = len(labels)
    net = getattr(model, "net", model)
    modules = dict(net.named_modules())
    n = sum(len(x) for x, _ in batches)

    # 1. feature extraction: every map of every image, float64.
    blobs: dict[str, np.ndarray] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: blobs.__setitem__(name, out.detach().cpu().numpy())
        )
        for name in layers
    ]
    features: dict[str, np.ndarray] = {}
    maxfeatures: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            start = 0
            for images, _ in batches:
                model(images)
                end = start + len(images)
                for name in layers:
                    blob = blobs[name]
                    if name not in features:
                        features[name] = np.zeros((n, *blob.shape[1:]))  # float64
                        maxfeatures[name] = np.zeros((n, blob.shape[1]))
                    features[name][start:end] = blob
                    maxfeatures[name][start:end] = blob.max(axis=(2, 3))
                start = end
    finally:
        for hook in hooks:
            hook.remove()

    out = {}
    for name in layers:
        feats, maxf = features[name], maxfeatures[name]
        units = feats.shape[1]
        # 2. thresholds: the exact quantile over all positions of all images.
        threshold = np.percentile(feats, 100 * quantile, axis=(0, 2, 3))
        # 3. tally, one image and one unit at a time.
        tally_both = np.zeros((units, num_labels))
        tally_units_cat = np.zeros((units, len(names)))
        tally_labels = np.zeros(num_labels)
        index = 0
        for _, masks in batches:
            grids = [c for c in names if masks[c].dim() == 4]  # N×S×H×W pixel labels
            pixels_batch = np.concatenate([masks[c].numpy() for c in grids], axis=1)
            scalars_batch = np.concatenate(  # N×S image-level labels
                [masks[c].numpy() for c in names if masks[c].dim() == 2]
                or [np.zeros((len(pixels_batch), 0), np.int64)],
                axis=1,
            )
            annotated_batch = np.stack(
                [masks[c].numpy().reshape(len(pixels_batch), -1).any(1) for c in names], axis=1
            )
            size = pixels_batch.shape[-2:]
            for pixels, scalars, annotated in zip(
                pixels_batch, scalars_batch, annotated_batch, strict=True
            ):
                scalars = scalars[scalars > 0]
                tally_label = np.bincount(pixels.ravel(), minlength=num_labels)
                tally_label[0] = 0
                tally_labels += tally_label
                tally_labels[scalars] += size[0] * size[1]
                up = F.interpolate(
                    torch.from_numpy(feats[index][None]).float(), size=size, mode="bilinear"
                )[0].numpy()
                for unit in range(units):
                    if maxf[index, unit] > threshold[unit]:
                        indexes = np.argwhere(up[unit] > threshold[unit])
                        tally_bt = np.bincount(
                            pixels[:, indexes[:, 0], indexes[:, 1]].ravel(), minlength=num_labels
                        )
                        tally_bt[0] = 0
                        tally_both[unit] += tally_bt
                        tally_both[unit, scalars] += len(indexes)
                        tally_units_cat[unit] += len(indexes) * annotated
                index += 1
        # 4. IoU per unit and label, the union counted in the label's category.
        units_cat = tally_units_cat[:, label_category.clip(min=0)]
        iou = tally_both / (units_cat + tally_labels[None, :] - tally_both + 1e-10)
        iou[:, label_category < 0] = 0
        out[name] = {"thresholds": threshold, "iou": iou, "features": feats}
    return out


# -- memory --------------------------------------------------------------------------------


class PeakRSS:
    """The peak resident memory of this process during a ``with`` block, above its level at entry.

    A thread reads ``/proc/self/statm`` every ``interval`` seconds. RSS counts every page
    the process touches: numpy's buffers and torch's CPU tensors alike (tracemalloc sees
    numpy's but not torch's, whose allocator bypasses Python's). Memory that glibc keeps
    after a free would let a run grow without RSS showing it, so the heap is trimmed
    (``malloc_trim``) before the level at entry is read. A spike shorter than the interval
    can be missed; the baseline's peak (its feature array) lasts seconds.

    With glibc's defaults the RSS also holds freed blocks glibc keeps for reuse (its mmap
    threshold grows to the largest block freed, up to 32 MB, and smaller blocks then come
    from a heap that is seldom returned): tens of MB here, 40% of a plain forward pass's
    figure. :func:`measure_memory` turns that off, so the RSS follows live allocations.
    """

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        self.start = self.rss()
        self._max = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self.rss()) - self.start


def measure_memory() -> dict[str, int]:
    """Each task's peak memory, from one untimed run of each in a child process (this bench,
    same arguments) whose glibc returns freed memory to the system at once.

    The child starts with glibc's mmap and trim thresholds fixed at 128 kB
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so its RSS follows the live
    allocations; set only at start-up does that hold (``mallopt`` later leaves the heap
    that grew before). It slows allocation-heavy code (a forward pass ~1.6×), hence a child
    and not the timed process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    child = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--memory-only"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then under-count a run's growth
        pass


# -- scaling ---------------------------------------------------------------------------------

SCALING_BATCHES = (32, 64, 128, 256, 512)
SCALING_IMAGES = (500, 1000, 2000)  # and the whole probe
SCALING_LAYERS = (["layer1"], ["layer2"], ["layer3"], ["layer1", "layer2", "layer3"])


def rebatch(batches, n: int, batch_size: int) -> list:
    """The first ``n`` images of the preloaded ``batches`` in batches of ``batch_size``."""
    images = torch.cat([x for x, _ in batches])[:n]
    masks = {c: torch.cat([m[c] for _, m in batches])[:n] for c in batches[0][1]}
    return [
        (x, {c: m[start : start + batch_size] for c, m in masks.items()})
        for start, x in zip(range(0, n, batch_size), images.split(batch_size), strict=True)
    ]


def scaling(s: Setting) -> dict:
    """Our dissection's seconds as the batch size, the number of images and of units change.

    One timed run per point, after the main comparison, on the same decoded probe; each
    point first runs on two batches (kernels and allocator for its shapes).
    """
    model, batches, n = s.model, s.batches, s.images
    shapes = layer_shapes(model, batches[0][0][:1], ["layer1", "layer2", "layer3"])

    def timed(layers, bs, k) -> float:
        data = rebatch(batches, k, bs)
        dissect(model, layers, data[:2], s.categories, s.labels, QUANTILE)
        t0 = time.perf_counter()
        dissect(model, layers, data, s.categories, s.labels, QUANTILE)
        return time.perf_counter() - t0

    out = {"layers_default": LAYERS, "batch": [], "images": [], "units": []}
    for bs in SCALING_BATCHES:
        t = timed(LAYERS, bs, n)
        out["batch"].append({"batch": bs, "images": n, "s": t, "ips": n / t})
    for k in (*(k for k in SCALING_IMAGES if k < n), n):
        t = timed(LAYERS, 100, k)
        out["images"].append({"images": k, "batch": 100, "s": t, "ips": k / t})
    for layers in SCALING_LAYERS:
        t = timed(layers, 100, n)
        units = sum(shapes[name][0] for name in layers)
        out["units"].append(
            {
                "layers": layers,
                "units": units,
                "map": [list(shapes[name][1:]) for name in layers],
                "images": n,
                "s": t,
                "ips": n / t,
                "us_per_image_unit": 1e6 * t / (n * units),
            }
        )
    return out


def print_scaling(s: dict) -> None:
    default = "+".join(s["layers_default"])
    print(f"\nscaling of ours at 28² ({default} unless stated; one run each):")
    print(
        "  batch size: "
        + ", ".join(f"{r['batch']} {r['ips']:.0f}" for r in s["batch"])
        + f" img/s ({s['batch'][0]['images']} images)"
    )
    print(
        "  images:     "
        + ", ".join(f"{r['images']} {r['ips']:.0f}" for r in s["images"])
        + " img/s"
    )
    print(
        "  units:      "
        + ", ".join(
            f"{'+'.join(r['layers'])} ({r['units']}) {r['us_per_image_unit']:.1f}"
            for r in s["units"]
        )
        + " µs per image per unit"
    )


# -- Broden scale ----------------------------------------------------------------------------


def broden_scale(batch_size: int) -> dict:
    """What each method holds for ResNet-18's layer4 (512 × 7 × 7) on Broden's 63,305 images
    (1,198 labels, 6 categories).

    The baseline: the float64 feature array. Ours: the exact top-tail store (each unit's
    largest ``r + 8√r + 64`` activations, ``r`` = 0.5% of its 3.1 M), measured by streaming
    that many values (batches of ``batch_size`` images) through a :class:`TopQuantile` of one
    unit; and the IoU counts: the pixels kept one by one up to
    :attr:`DeferredIoU.EXACT_PIXELS` (≈ 18 bytes each), then the bins (float64 counts per
    unit, bin and label or category, and each bin's value range).
    """
    total = BRODEN_IMAGES * BRODEN_MAP
    store = TopQuantile(1, QUANTILE, total=total)
    gen = torch.Generator().manual_seed(0)
    most = 0
    for start in range(0, total, batch_size * BRODEN_MAP):
        store.add(torch.rand(min(batch_size * BRODEN_MAP, total - start), 1, generator=gen))
        most = max(most, store.values.numel())
    bins = DeferredIoU(1, 2).inter.shape[1]
    binned = BRODEN_UNITS * bins * (8 * (BRODEN_LABELS + BRODEN_CATEGORIES) + 2 * 4)
    return {
        "images": BRODEN_IMAGES,
        "units": BRODEN_UNITS,
        "map": BRODEN_MAP,
        "labels": BRODEN_LABELS,
        "baseline_bytes": BRODEN_IMAGES * BRODEN_UNITS * BRODEN_MAP * np.dtype(float).itemsize,
        "top_values_per_unit": most,
        "top_bytes": most * BRODEN_UNITS * 4,
        "exact_pixels": DeferredIoU.EXACT_PIXELS,
        "exact_pixels_bytes": DeferredIoU.EXACT_PIXELS * 18,
        "bins_per_unit": bins,
        "binned_bytes": binned,
    }


def print_broden(s: dict) -> None:
    ours = s["top_bytes"] + max(s["exact_pixels_bytes"], s["binned_bytes"])
    print(
        f"\nat Broden's scale ({s['images']:,} images, {s['units']} units × {s['map']}, "
        f"{s['labels']} labels): baseline's array {s['baseline_bytes'] / 1e9:.1f} GB; ours "
        f"{ours / MB:.0f} MB: top-tail store {s['top_bytes'] / MB:.1f} MB "
        f"({s['top_values_per_unit']:,} float32 values a unit) + IoU counts "
        f"≤ {s['exact_pixels_bytes'] / MB:.0f} MB of pixels, then {s['binned_bytes'] / MB:.0f} MB "
        f"of bins ({s['bins_per_unit']} a unit)"
    )


def print_cost(c: dict) -> None:
    print(
        f"\nper-image cost, {c['layer']}, on {c['device']} ({c['device_name']}), "
        f"{c['images']} images in batches of {c['batch_size']}: ours {c['ours_ips']:.1f} img/s, "
        f"a forward pass {c['forward_ips']:.1f} img/s; Broden's {c['broden_images']:,} images "
        f"would take {c['broden_hours']:.2f} h"
    )


# -- the tables ------------------------------------------------------------------------------


def layer_shapes(model, x, layers=LAYERS) -> dict[str, tuple[int, ...]]:
    net = getattr(model, "net", model)
    modules = dict(net.named_modules())
    shapes = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name in layers
    ]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return shapes


def verdict(value: float, goal: float, op: str) -> str:
    ok = value >= goal if op == "≥" else value <= goal
    return f"({op} {goal:g} {'ok' if ok else 'MISSED'})"


def print_setting(r: dict) -> None:
    a = r["agreement"]
    rss = r["rss_peak_mb_default_malloc"]
    print(f"\n{r['title']}")
    print(f"  {'':<28}{'images/s':>9}{'peak memory':>14}{'(glibc defaults)':>19}")
    for key, name in (
        ("ours", "ours (one pass)"),
        ("baseline", "baseline (NetDissect-Lite)"),
        ("forward", "one forward pass"),
    ):
        print(
            f"  {name:<28}{r[key + '_ips']:>9.1f}{r[key + '_peak_mb']:>11.1f} MB"
            f"{rss[key]:>16.1f} MB"
        )
    extra = r["extra_over_forward_mb"]
    print(
        f"  ours / baseline: speed {r['speed_ratio']:.2f}× "
        f"{verdict(r['speed_ratio'], GOALS['speed_ratio'], '≥')} (bound: a free method "
        f"{r['speed_ratio_bound']:.2f}×), memory {r['memory_ratio']:.3f} "
        f"{verdict(r['memory_ratio'], GOALS['memory_ratio'], '≤')} "
        f"[{r['memory_ratio_default_malloc']:.3f} with glibc's defaults]; beyond a forward "
        f"pass {extra['ours']:.1f} ÷ {extra['baseline']:.1f} MB = {r['extra_ratio']:.3f}"
    )
    print(f"  exactness against two-pass Network Dissection ({a['units']} units):")
    for layer, row in a["layers"].items():
        print(
            f"    {layer}: thresholds {'bit for bit' if row['thresholds_equal'] else 'DIFFER'}"
            f" (max rel. diff {row['max_rel_threshold_diff']:.1e}; the baseline's "
            f"np.percentile {row['baseline_percentile_rel_diff']:.1e}), max |ΔIoU| "
            f"{row['max_iou_diff']:.1e}, best concept differs for {row['best_label_differs']}"
            f"/{row['units']} ({row['best_label_differs_clear']} with a runner-up > 1e-3 behind)"
        )


def print_threshold_errors(errors: dict) -> None:
    print(
        "\nthresholds against the exact 0.995 quantile at 28²: largest rank error, largest "
        "|ΔT|/range, median |ΔT|/|T|"
    )
    for layer, row in errors.items():
        for name, e in row.items():
            print(
                f"  {layer} {name:<24} {e['max_rank_error']:.1e}  {e['max_range_error']:.2%}  "
                f"{e['median_relative_error']:.2%}"
            )


if __name__ == "__main__":
    main()
