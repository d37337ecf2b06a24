"""Benchmark: the peak memory of each analysis pass does not grow with the number of images.

At ImageNet's size (3×224×224) on ``--images`` N and 4N synthetic images, with
the same batch size, each pass runs in a fresh process that reports its own
peak resident memory during the pass (``VmHWM``, reset after the imports), so the
numbers are independent:

- ``attack``: :func:`~advinterp.attacks.advset.build_adversarial_set` (FGSM) of
  an ImageNet-style folder of PNGs (``<wnid>/NNNNN.png``), shards of ``--chunk``;
- ``topk``: :func:`~advinterp.analysis.open_paired_sets` on that set and
  :func:`~advinterp.analysis.unit_galleries` (4 units by LC; activation maps, as the
  discrepancy maps' cost and memory are set by the gallery, not the set);
- ``semantics``: :func:`~advinterp.analysis.model_semantics` over every conv layer;
- ``dissect``: :func:`~advinterp.analysis.dissection.dissect_model` on a 224²
  probe in Broden's layout (colour masks, image-level object labels), then the
  same dissection of the probe's FGSM set read from its shards
  (:func:`~advinterp.analysis.dissection.adversarial_probe_batches`).

Printed per pass: peak RSS at N and 4N, and the ratio peak(4N) ÷ peak(N) (goal ≤
1.1: memory set by the batch and the chunk, not by the set). Each child starts
with glibc made to return freed memory at once (as ``bench_dissect``), and
decodes in its own process (``workers=0``: decoding processes would hold memory
its RSS does not count). The chunk is fixed (64 images) so that N already spans
several shards; the default (:func:`~advinterp.attacks.advset.default_chunk`,
445 images at 224²) gives the same flat curve from 445 images up. The model is
small and untrained (a three-convolution net at 224², 10 classes named by
Fashion-MNIST's wnids): the memory that could grow with N is the images', and a
cheap model lets N be large enough for a copy of a set to show (4N float images
at 224² are 2.4 MB × N: 147 MB at the default N = 64, beside ~0.7 GB of
resident libraries; the dissection's exact top-0.5% buffers grow with the number
of values, 0.5% of them, by design). Most of the time goes to writing and
decoding PNGs. Stored under ``"streaming"`` in ``benches/results.json``. Not part
of the tests::

    .venv/bin/python -m benches.bench_streaming [--images 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# Everything a pass uses is imported here: imports run before the peak is reset.
from advinterp.analysis import model_semantics, open_paired_sets, unit_galleries
from advinterp.analysis.dissection import adversarial_probe_batches, dissect_model
from advinterp.attacks.advset import build_adversarial_set
from advinterp.data import ImageFolderSet
from advinterp.data.broden import BrodenProbe
from advinterp.data.fashion import CLASSES as FASHION_CLASSES
from advinterp.data.specs import IMAGENET_MEAN, IMAGENET_STD
from advinterp.metrics.dissect import dissect
from advinterp.metrics.wordnet import similarity_matrix
from advinterp.models import Classifier

try:
    from benches.common import machine, save_results, set_threads
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import machine, save_results, set_threads

GOAL = 1.1
SIZE = 224
MASK_SIZE = 112
SCALES = (1, 4)
PASSES = ("attack", "topk", "semantics", "dissect")
MB = 2**20
# Colour bands (labels 1–4) and the ten object classes (5–14) of the probe.
COLORS = ("dark", "dim", "bright", "light")
OBJECT_BASE = len(COLORS) + 1


def build_model() -> Classifier:
    """The same untrained net in every process (seeded): three strided convolutions at 224²."""
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 16, 4, stride=4),
            relu=nn.ReLU(),
            layer1=nn.Sequential(
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()
            ),
            layer2=nn.Sequential(
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()
            ),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(64, 10),
        )
    )
    names, wnids = zip(*FASHION_CLASSES, strict=True)
    model = Classifier(net, IMAGENET_MEAN, IMAGENET_STD, SIZE, 10, classes=names, wnids=wnids)
    model.config = {"arch": "bench-streaming", "name": "bench-streaming"}
    return model.eval()


# -- data ------------------------------------------------------------------------------------


def synthetic_image(i: int) -> np.ndarray:
    """Image ``i``: smooth colour blobs (an 8×8 grid upsampled) plus a little noise, uint8."""
    gen = torch.Generator().manual_seed(i)
    low = torch.rand(1, 3, 8, 8, generator=gen)
    x = nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x[0] + 0.02 * torch.randn(3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def write_pool(work: Path, n: int) -> Path:
    """``work/pool``: images ``0..n-1`` as PNGs and their 112² colour-band label PNGs."""
    pool = work / "pool"
    done = pool / f"{n}.done"
    if done.is_file():
        return pool
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir(parents=True)
    for i in range(n):
        pixels = synthetic_image(i)
        Image.fromarray(pixels).save(pool / f"{i:05d}.png", compress_level=1)
        small = np.asarray(Image.fromarray(pixels).resize((MASK_SIZE, MASK_SIZE)))
        label = np.zeros((MASK_SIZE, MASK_SIZE, 3), np.uint8)
        label[..., 0] = np.digitize(small.mean(axis=2), (64, 128, 192)) + 1  # R + 256·G: 1..4
        Image.fromarray(label).save(pool / f"{i:05d}_color.png")
    done.touch()
    return pool


def write_data(work: Path, pool: Path, n: int) -> None:
    """``work/images-<n>/<wnid>/NNNNN.png`` (class ``i % 10``) and ``work/probe-<n>``, a
    Broden-format probe of the same images: per pixel a colour band, per image its class
    as an object label. Files are hard links into the pool."""
    wnids = [w for _, w in FASHION_CLASSES]
    images, probe = work / f"images-{n}", work / f"probe-{n}"
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(probe, ignore_errors=True)
    (probe / "images" / "p").mkdir(parents=True)
    rows = []
    for i in range(n):
        folder = images / wnids[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        os.link(pool / f"{i:05d}.png", folder / f"{i:05d}.png")
        for name in (f"{i:05d}.png", f"{i:05d}_color.png"):
            os.link(pool / name, probe / "images" / "p" / name)
        rows.append(
            [f"p/{i:05d}.png", "train", SIZE, SIZE, MASK_SIZE, MASK_SIZE]
            + [f"p/{i:05d}_color.png", str(OBJECT_BASE + i % 10)]
        )
    names = [n for n, _ in FASHION_CLASSES]
    labels = [(k + 1, c, "color") for k, c in enumerate(COLORS)]
    labels += [(OBJECT_BASE + k, c, "object") for k, c in enumerate(names)]
    _csv(probe / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", "color", "object"], rows)
    _csv(
        probe / "label.csv",
        ["number", "name", "category", "frequency", "coverage", "syns"],
        [[num, name, f"{cat}({n})", n, 0.1, name] for num, name, cat in labels],
    )
    _csv(
        probe / "category.csv",
        ["name", "first", "last", "count", "frequency"],
        [["color", 1, len(COLORS), len(COLORS), n], ["object", OBJECT_BASE, 14, 10, n]],
    )
    for cat in ("color", "object"):
        _csv(
            probe / f"c_{cat}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [
                [code, num, name, n, 0.1]
                for code, (num, name, _) in enumerate((x for x in labels if x[2] == cat), 1)
            ],
        )


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


class ProbeImages(torch.utils.data.Dataset):
    """A probe's images as ``(image, -1, row)`` items: what the attack reads (no class labels)."""

    def __init__(self, probe):
        self.probe, self.name = probe, probe.name

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        return self.probe.image(i), -1, i


def attack_probe(model, work: Path, n: int, batch_size: int, chunk: int) -> None:
    """The probe's FGSM set (``work/probe-adv-<n>``), once: the dissect pass reads it."""
    out = work / f"probe-adv-{n}"
    if (out / "attack.json").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    probe = BrodenProbe(work / f"probe-{n}", input_size=SIZE)
    build_adversarial_set(
        model,
        ProbeImages(probe),
        out,
        method="fgsm",
        eps=4 / 255,
        targeted=True,  # a probe has no class labels: least-likely targets, as dissect's
        batch_size=batch_size,
        chunk=chunk,
        progress=False,
    )


# -- one pass in this process ----------------------------------------------------------------


def run_pass(name: str, work: Path, n: int, batch_size: int, chunk: int) -> dict:
    """Run pass ``name`` on ``n`` images; its seconds and this process's peak RSS during it.

    The peak is the process's ``VmHWM``, reset once the imports and the model are done
    (``/proc/self/clear_refs``): the pass's own, the resident libraries included.
    ``ru_maxrss`` would not do: it keeps the parent's size from before ``exec``."""
    model = build_model()
    gc.collect()
    _reset_peak()
    start = _rss()
    t0 = time.perf_counter()
    if name == "attack":
        out = work / f"adv-{n}"
        shutil.rmtree(out, ignore_errors=True)
        data = ImageFolderSet(work / f"images-{n}", model.wnids, input_size=SIZE)
        build_adversarial_set(
            model,
            data,
            out,
            method="fgsm",
            eps=4 / 255,
            targeted=False,
            batch_size=batch_size,
            chunk=chunk,
            progress=False,
        )
    elif name == "topk":
        pairs = open_paired_sets(model, work / f"adv-{n}")
        unit_galleries(
            model, pairs, "layer2", count=4, saliency="activation", batch_size=batch_size
        )
    elif name == "semantics":
        pairs = open_paired_sets(model, work / f"adv-{n}")
        model_semantics(model, pairs, similarity_matrix(model.wnids), batch_size=batch_size)
    elif name == "dissect":
        probe = BrodenProbe(work / f"probe-{n}", input_size=SIZE)
        real = dissect_model(model, probe, batch_size=batch_size, progress=False)
        dissect(
            model,
            real.layers,
            adversarial_probe_batches(work / f"probe-adv-{n}", probe, batch_size),
            probe.categories,
            probe.labels,
        )
    else:
        raise ValueError(f"unknown pass {name!r}")
    return {
        "seconds": time.perf_counter() - t0,
        "start_mb": start / MB,
        "peak_mb": _peak() / MB,
    }


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, args, n: int) -> dict:
    """Pass ``name`` on ``n`` images in a fresh child process (glibc returning freed memory)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    argv = [sys.executable, "-m", "benches.bench_streaming", "--pass", name, "--n", str(n)]
    argv += ["--work", str(args.work), "--batch-size", str(args.batch_size)]
    argv += ["--chunk", str(args.chunk), "--threads", str(args.threads)]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"pass {name} on {n} images failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="N: the 1× scale (4N the other)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="images per shard of the sets")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/advinterp-bench-streaming"))
    parser.add_argument("--keep", action="store_true", help="keep the images and sets in --work")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    parser.add_argument("--pass", dest="one_pass", choices=PASSES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.one_pass:  # the child: one pass, one line of JSON
        print(json.dumps(run_pass(args.one_pass, args.work, args.n, args.batch_size, args.chunk)))
        return

    started = time.perf_counter()
    sizes = [s * args.images for s in SCALES]
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"writing {sizes} synthetic {SIZE}² images and probes into {args.work} ...", flush=True)
    model = build_model()
    pool = write_pool(args.work, max(sizes))
    for n in sizes:
        write_data(args.work, pool, n)
        attack_probe(model, args.work, n, args.batch_size, args.chunk)
    results: dict[str, dict[int, dict]] = {}
    for name in PASSES:
        results[name] = {}
        for n in sizes:
            results[name][n] = r = measure(name, args, n)
            print(
                f"  {name:<10} {n:>6} images: peak {r['peak_mb']:7.0f} MB "
                f"(at start {r['start_mb']:.0f} MB), {r['seconds']:.1f} s",
                flush=True,
            )
    small, large = sizes
    print(
        f"\npeak RSS of each pass in its own process, {SIZE}² images, batch {args.batch_size}, "
        f"shards of {args.chunk} images, {torch.get_num_threads()} thread(s):"
    )
    print(f"  {'pass':<10} {f'{small} img':>10} {f'{large} img':>10} {'ratio':>7} {'growth':>9}")
    ratios = {}
    for name, r in results.items():
        ratios[name] = r[large]["peak_mb"] / r[small]["peak_mb"]
        growth = r[large]["peak_mb"] - r[small]["peak_mb"]
        print(
            f"  {name:<10} {r[small]['peak_mb']:7.0f} MB {r[large]['peak_mb']:7.0f} MB "
            f"{ratios[name]:7.3f} {growth:+7.0f} MB"
        )
    worst = max(ratios.values())
    images_mb = large * 3 * SIZE * SIZE * 4 / MB
    print(
        f"  worst ratio {worst:.3f} (goal ≤ {GOAL}); for scale, {large} float images at "
        f"{SIZE}² are {images_mb:.0f} MB"
    )
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    if args.no_save:
        return
    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_streaming", *sys.argv[1:]]
        ),
        "machine": machine(torch.device("cpu")),
        "settings": {
            "images": sizes,
            "size": SIZE,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "model": "3-conv net at 224² (random weights)",
            "set_mb_at_4x": images_mb,
        },
        "goal": GOAL,
        "passes": {
            name: {
                "peak_mb": {str(n): r[n]["peak_mb"] for n in sizes},
                "start_mb": {str(n): r[n]["start_mb"] for n in sizes},
                "seconds": {str(n): r[n]["seconds"] for n in sizes},
                "ratio": ratios[name],
            }
            for name, r in results.items()
        },
        "ratio": worst,
        "met": worst <= GOAL,
        "elapsed_s": elapsed,
    }
    path = save_results("streaming", result)
    print(f"\nwrote {path} (key 'streaming'); {elapsed:.0f} s in all")


if __name__ == "__main__":
    main()
