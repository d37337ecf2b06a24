"""Benchmark: our streaming Network Dissection against a NetDissect-Lite-style baseline.

On the embedded ``fashion-broden`` probe (``--probe-size`` images, 28×28, pixel
masks for color, object and texture), one process dissects the default model's
``layer2`` (32×14×14) and ``layer3`` (64×7×7) with

- ours: :func:`advinterp.metrics.dissect.dissect`, two streaming passes (a KLL
  quantile sketch per unit, then IoU counts), no activation or mask kept;
- the baseline: :func:`netdissect_lite`, NetDissect-Lite's algorithm
  (``feature_operation.py``): every activation in one float64 array, thresholds
  by ``np.percentile``, then a Python loop over images and units;

and a plain forward pass over the probe (the floor: ours makes two, the
baseline one), alternately (order reversed every other round), ``--rounds``
times each, on the same probe batches decoded once into memory (PNG decoding
is timed for neither). Reported: images/second (median round) and the ratio
(goal: ours ≥ 3× the baseline); each run's peak memory above the process's
memory at its start, from its RSS sampled every 2 ms (goal: ours ≤ 1/10 of the
baseline), in one more untimed run of each with glibc made to return freed
memory at once, so that the RSS is the live allocations, and, for reference,
in the timed runs with glibc's defaults (see :class:`PeakRSS`); the agreement
of thresholds and IoUs; and what each would hold at Broden's scale. Then, unless
``--no-scaling``, how our cost grows (one run each, same preloaded probe, layer2 and
layer3 unless stated): at batch sizes 32…512; on the first 500, 1000, 2000 and all
images (images/s should stay flat: cost linear in images); and with layer1, layer2,
layer3 alone or all three (time per image per unit), under ``"scaling"``. Dissection
is measured in one process (it is not sharded over ranks). Timings on
a shared machine are noisy: compare only ratios from one run. The model is the
demo run's (``runs/demo/resnet``) when it exists, else the default architecture
with random weights (speed does not depend on them). Stored under
``"dissect"`` in ``benches/results.json``. Not part of the tests::

    .venv/bin/python -m benches.bench_dissect [--probe-size 3000] [--rounds 2] [--threads 1]
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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advinterp.data.broden import BrodenProbe, probe_batches
from advinterp.data.fashion_broden import fashion_broden
from advinterp.metrics.dissect import dissect, label_categories
from advinterp.models import create_model, load_model
from advinterp.stats import IoUCounts, Quantile

try:
    from benches.common import interleave, machine, median, save_results, set_threads
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import interleave, machine, median, save_results, set_threads

LAYERS = ["layer2", "layer3"]
QUANTILE = 0.995
RESOLUTION = 8192  # dissect's default sketch size
RANK_SIGMA = 1.4 / RESOLUTION  # the sketch's rank error, one standard deviation (quantile.py)
GOALS = {"speed_ratio": 3.0, "memory_ratio": 0.1}
DEMO_MODEL = Path(__file__).resolve().parents[1] / "runs" / "demo" / "resnet"
# NetDissect's Broden release and ResNet-18's layer4: what the baseline's array would hold.
BRODEN_IMAGES, BRODEN_UNITS, BRODEN_MAP = 63_305, 512, 7 * 7
MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe-size", type=int, default=3000, help="fashion-broden images")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the interleaved runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--model", help=f"checkpoint (default: {DEMO_MODEL} if it exists)")
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
    device = torch.device("cpu")  # the baseline is numpy, and peak memory is the process's RSS
    info = machine(device)

    torch.manual_seed(0)
    checkpoint = args.model or (str(DEMO_MODEL) if (DEMO_MODEL / "model.json").is_file() else None)
    model = (load_model(checkpoint) if checkpoint else create_model("resnet")).eval()
    probe = BrodenProbe(fashion_broden(n=args.probe_size), in_chans=1, input_size=28)
    batches = list(probe_batches(probe, args.batch_size))  # decoded once, shared by both
    n = len(probe)
    tasks = {
        "ours": lambda: dissect(model, LAYERS, batches, probe.categories, probe.labels, QUANTILE),
        "baseline": lambda: netdissect_lite(
            model, LAYERS, batches, probe.categories, probe.labels, QUANTILE
        ),
        "forward": lambda: forward(model, batches),
    }
    # Warm-up on two batches: oneDNN kernels, the allocator, numpy's first calls.
    dissect(model, LAYERS, batches[:2], probe.categories, probe.labels, QUANTILE)
    netdissect_lite(model, LAYERS, batches[:2], probe.categories, probe.labels, QUANTILE)
    if args.memory_only:  # the child of measure_memory
        peaks = {}
        for name, task in tasks.items():
            with PeakRSS() as rss:
                task()
            peaks[name] = rss.peak
        print(json.dumps(peaks))
        return

    shapes = layer_shapes(model, batches[0][0][:1])
    print(
        f"dissect: fashion-broden, {n} images 28×28, "
        + ", ".join(f"{k} {'×'.join(map(str, s))}" for k, s in shapes.items())
        + f", model {checkpoint or 'resnet (random weights)'}, {info['device']} "
        f"({info['device_name']}), {info['threads']} thread(s), {args.rounds} rounds",
        flush=True,
    )

    peaks: dict[str, list[float]] = {name: [] for name in tasks}

    def measured(name, fn):
        def run():
            with PeakRSS() as rss:
                out = fn()
            peaks[name].append(rss.peak)
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

    timed = {name: measured(name, task) for name, task in tasks.items()}
    times, last = interleave(timed, args.rounds, device, progress)
    med = {k: median(v) for k, v in times.items()}
    speed_ratio = med["baseline"] / med["ours"]
    # Were our statistics free, ours would take two forward passes and the baseline at least one
    # plus its own statistics: the best ratio a two-pass method can reach here.
    speed_bound = med["baseline"] / (2 * med["forward"])
    agreement = agree(last["ours"], last["baseline"], batches, probe)
    scale = broden_scale(args.batch_size)

    del last  # the baseline's arrays
    live = measure_memory()
    default = {k: max(v) for k, v in peaks.items()}
    memory_ratio = live["ours"] / live["baseline"]
    scale_rows = scaling(model, batches, probe) if args.scaling else None
    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_dissect", *sys.argv[1:]]
        ),
        "machine": info,
        "settings": {
            "probe": f"fashion-broden n={n} 28×28",
            "images": n,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "layers": {k: list(s) for k, s in shapes.items()},
            "model": checkpoint or "resnet (random weights)",
            "quantile": QUANTILE,
            "resolution": RESOLUTION,
            "baseline": "NetDissect-Lite feature_operation.py, float64 features in memory",
        },
        "goals": GOALS,
        "ours_ips": n / med["ours"],
        "baseline_ips": n / med["baseline"],
        "speed_ratio": speed_ratio,
        "speed_met": speed_ratio >= GOALS["speed_ratio"],
        "forward_ips": n / med["forward"],
        "speed_ratio_bound": speed_bound,
        "ours_peak_mb": live["ours"] / MB,
        "baseline_peak_mb": live["baseline"] / MB,
        "forward_peak_mb": live["forward"] / MB,
        "memory_ratio": memory_ratio,
        "memory_met": memory_ratio <= GOALS["memory_ratio"],
        "rss_peak_mb_default_malloc": {k: v / MB for k, v in default.items()},
        "memory_ratio_default_malloc": default["ours"] / default["baseline"],
        "agreement": agreement,
        "broden_scale": scale,
        "scaling": scale_rows,
        "times_s": times,
        "rss_peaks_mb_default_malloc": {k: [p / MB for p in v] for k, v in peaks.items()},
        "elapsed_s": elapsed,
    }
    print_table(result)
    if scale_rows:
        print_scaling(scale_rows)
    if not args.no_save:
        path = save_results("dissect", result)
        print(f"\nwrote {path} (key 'dissect'); {elapsed:.0f} s in all")


def forward(model, batches) -> None:
    """The floor: one plain forward pass over the probe (ours makes two, the baseline one)."""
    with torch.inference_mode():
        for images, _ in batches:
            model(images)


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


def scaling(model, batches, probe) -> dict:
    """Our dissection's seconds as the batch size, the number of images and of units change.

    One timed run per point, after the main comparison, on the same decoded probe; each
    point first runs on two batches (kernels and allocator for its shapes).
    """
    n = len(probe)
    shapes = layer_shapes(model, batches[0][0][:1], ["layer1", "layer2", "layer3"])

    def timed(layers, bs, k) -> float:
        data = rebatch(batches, k, bs)
        dissect(model, layers, data[:2], probe.categories, probe.labels, QUANTILE)
        t0 = time.perf_counter()
        dissect(model, layers, data, probe.categories, probe.labels, QUANTILE)
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
    print(f"\nscaling of ours ({default} unless stated; one run each):")
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


# -- the reference method --------------------------------------------------------------------


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
       and the labels under its mask counted (``np.bincount``) into ``tally_both``;
       label areas into ``tally_labels``; the mask's area into ``tally_units_cat``
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
            pixels_batch = np.concatenate([masks[c].numpy() for c in names], axis=1)  # N×S×H×W
            annotated_batch = np.stack(
                [masks[c].numpy().reshape(len(pixels_batch), -1).any(1) for c in names], axis=1
            )
            size = pixels_batch.shape[-2:]
            for pixels, annotated in zip(pixels_batch, annotated_batch, strict=True):
                tally_label = np.bincount(pixels.ravel(), minlength=num_labels)
                tally_label[0] = 0
                tally_labels += tally_label
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
                        tally_units_cat[unit] += len(indexes) * annotated
                index += 1
        # 4. IoU per unit and label, the union counted in the label's category.
        units_cat = tally_units_cat[:, label_category.clip(min=0)]
        iou = tally_both / (units_cat + tally_labels[None, :] - tally_both + 1e-10)
        iou[:, label_category < 0] = 0
        out[name] = {"thresholds": threshold, "iou": iou, "features": feats}
    return out


# -- memory ----------------------------------------------------------------------------------


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


# -- agreement -------------------------------------------------------------------------------


def agree(ours: dict, reference: dict, batches, probe) -> dict:
    """How far our thresholds and IoUs are from the baseline's, with asserted bounds.

    - Thresholds: the rank of ours among the unit's activations (from the baseline's
      array) must lie within 5σ of ``QUANTILE``, σ = 1.4/resolution the sketch's rank
      error (quantile.py); |ΔT| is printed relative to the unit's activation range.
    - IoU counting: :class:`IoUCounts` on the baseline's own features and exact
      thresholds must reproduce its IoU to 1e-6 (only the +1e-10 of Lite's
      denominator and float rounding differ).
    - IoU end to end: a threshold moved within its rank error moves a nested set of
      ``d`` pixels in or out of the unit's mask, with ``d = |A − A'|`` (A, A' the
      mask areas over the images annotated in the label's category, from the two
      thresholds). Then ``|ΔIoU| ≤ d / min(A, A')``: both intersection and union move
      by at most ``d`` and the union is at least the mask. That bound (plus one pixel
      of slack for float ties) is asserted per unit and label.
    """
    label_category = label_categories(probe.categories, len(probe.labels))
    names = list(probe.categories)
    index = {c: k for k, c in enumerate(names)}
    out = {"layers": {}}
    for layer, ref in reference.items():
        mine = ours[layer]
        feats = torch.from_numpy(ref["features"])
        values = feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1)  # U×(N·h·w)
        t_ours = mine.thresholds.double()
        t_ref = torch.from_numpy(ref["thresholds"])
        below = (values < t_ours[:, None]).double().mean(1)
        at_most = (values <= t_ours[:, None]).double().mean(1)
        rank_error = torch.clamp(torch.maximum(below - QUANTILE, QUANTILE - at_most), min=0)
        span = values.amax(1) - values.amin(1)
        rel_dt = ((t_ours - t_ref).abs() / span.clamp(min=1e-12)).max()
        del values

        counts = {}
        for key, thresholds in (("exact", t_ref.float()), ("sketch", mine.thresholds)):
            counts[key] = IoUCounts(feats.shape[1], len(probe.labels), label_category, len(names))
            start = 0
            for images, masks in batches:
                maps = feats[start : start + len(images)]
                start += len(images)
                counts[key].add(maps, thresholds, {index[c]: m for c, m in masks.items()})
        iou_ref = torch.from_numpy(ref["iou"])
        counting = (counts["exact"].result() - iou_ref).abs().max()
        replay = (counts["sketch"].result() - mine.iou).abs().max()
        area_ref = counts["exact"].unit_area[:, label_category.clamp(min=0)]
        area_ours = counts["sketch"].unit_area[:, label_category.clamp(min=0)]
        bound = ((area_ref - area_ours).abs() + 1) / torch.minimum(area_ref, area_ours).clamp(min=1)
        delta = (mine.iou - iou_ref).abs()
        best_differ = int((mine.iou.argmax(1) != iou_ref.argmax(1)).sum())
        row = {
            "units": feats.shape[1],
            "max_rank_error": float(rank_error.max()),
            "rank_error_bound": 5 * RANK_SIGMA,
            "max_rel_threshold_diff": float(rel_dt),
            "max_iou_diff": float(delta.max()),
            "max_iou_diff_over_bound": float((delta / bound).max()),
            "iou_counting_diff": float(counting),
            "best_label_differs": best_differ,
        }
        out["layers"][layer] = row
        assert row["max_rank_error"] <= 5 * RANK_SIGMA, (layer, row)
        assert counting <= 1e-6, (layer, row)
        assert replay <= 1e-6, (layer, float(replay))  # our run saw the same maps
        assert bool((delta <= bound).all()), (layer, row)
    rows = out["layers"].values()
    out["max_rank_error"] = max(r["max_rank_error"] for r in rows)
    out["max_rel_threshold_diff"] = max(r["max_rel_threshold_diff"] for r in rows)
    out["max_iou_diff"] = max(r["max_iou_diff"] for r in rows)
    out["best_label_differs"] = sum(r["best_label_differs"] for r in rows)
    out["units"] = sum(r["units"] for r in rows)
    return out


# -- Broden scale ----------------------------------------------------------------------------


def broden_scale(batch_size: int) -> dict:
    """What each method holds for ResNet-18's layer4 (512 × 7 × 7) on Broden's 63,305 images.

    The baseline: the float64 feature array. Ours: the quantile sketch, measured by
    streaming that many values (batches of ``batch_size`` images) through a one-unit
    :class:`Quantile` (all units share one level structure, so 512 units hold 512×
    its values) and taking the most it held between batches; plus the IoU counts (float64,
    ``U × labels`` and ``U × categories``: 4 kB per label for 512 units).
    """
    sketch = Quantile(1, resolution=RESOLUTION)
    gen = torch.Generator().manual_seed(0)
    most = 0
    rows = batch_size * BRODEN_MAP
    for start in range(0, BRODEN_IMAGES * BRODEN_MAP, rows):
        count = min(rows, BRODEN_IMAGES * BRODEN_MAP - start)
        sketch.add(torch.rand(count, 1, generator=gen))
        most = max(most, sum(level.numel() for level in sketch.levels))
    bytes_per_value = sketch.levels[0].element_size()
    return {
        "images": BRODEN_IMAGES,
        "units": BRODEN_UNITS,
        "map": BRODEN_MAP,
        "baseline_bytes": BRODEN_IMAGES * BRODEN_UNITS * BRODEN_MAP * np.dtype(float).itemsize,
        "sketch_values_per_unit": most,
        "sketch_bytes": most * BRODEN_UNITS * bytes_per_value,
        "iou_bytes_per_label": BRODEN_UNITS * 8,
    }


# -- the table -------------------------------------------------------------------------------


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


def print_table(r: dict) -> None:
    g, a, s = r["goals"], r["agreement"], r["broden_scale"]
    n = r["settings"]["images"]
    rss = r["rss_peak_mb_default_malloc"]
    print(f"\n{n} images; speed: median of {r['settings']['rounds']} rounds")
    print(f"  {'':<28}{'images/s':>9}{'peak memory':>14}{'(glibc defaults)':>19}")
    for key, name in (
        ("ours", "ours (streaming)"),
        ("baseline", "baseline (NetDissect-Lite)"),
        ("forward", "one forward pass"),
    ):
        print(
            f"  {name:<28}{r[key + '_ips']:>9.0f}{r[key + '_peak_mb']:>11.1f} MB"
            f"{rss[key]:>16.1f} MB"
        )
    print(
        f"  ours / baseline: speed {r['speed_ratio']:.2f}× "
        f"{verdict(r['speed_ratio'], g['speed_ratio'], '≥')}, "
        f"memory {r['memory_ratio']:.3f} {verdict(r['memory_ratio'], g['memory_ratio'], '≤')}"
        f" [{r['memory_ratio_default_malloc']:.3f} with glibc's defaults]"
    )
    print(
        f"  (two forward passes bound ours: with free statistics the ratio would be "
        f"{r['speed_ratio_bound']:.2f}×)"
    )
    print(f"\nagreement with the baseline ({a['units']} units):")
    for layer, row in a["layers"].items():
        print(
            f"  {layer}: max rank error {row['max_rank_error']:.1e} "
            f"(≤ {row['rank_error_bound']:.1e}), max |ΔT|/range {row['max_rel_threshold_diff']:.1e}"
            f", max |ΔIoU| {row['max_iou_diff']:.4f} ({row['max_iou_diff_over_bound']:.2f} of "
            f"its bound), IoU counting {row['iou_counting_diff']:.0e}, best label differs "
            f"{row['best_label_differs']}/{row['units']}"
        )
    print(
        f"\nat Broden's scale ({s['images']:,} images, {s['units']} units × {s['map']}): "
        f"baseline's array {s['baseline_bytes'] / 1e9:.1f} GB; our sketch "
        f"{s['sketch_bytes'] / MB:.1f} MB ({s['sketch_values_per_unit']:,} float32 values a "
        f"unit) + IoU counts {s['iou_bytes_per_label'] / 1e3:.1f} kB a label"
    )


if __name__ == "__main__":
    main()
