"""Benchmark: the semantics pass (``advinterp semantics``) on 1 and on 2 ``torchrun`` processes.

For each process count ``torchrun --standalone --nproc-per-node N`` starts this
module in worker mode: every process (one torch thread each) builds the default
model (random weights: speed does not depend on them), the first ``--images``
Fashion-MNIST test images and as many noisy copies as their adversarial set
(random targets, as ``benches.bench_semantics``), warms up on one batch, then
``--repeats`` times waits for the others and runs
:func:`advinterp.analysis.model_semantics` over every unit (its default layers) with the
process group's :class:`~advinterp.distributed.World`: process ``r`` records the
batches ``i % N == r`` of each chunk, the top-k stores are merged after each
chunk, every process computes LC/CS1/CS2. Timed on process 0 from the barrier to
the result, so start-up (imports, joining the group, pairing) is left out.

The launches alternate (1, 2, 2, 1, …) for ``--rounds`` rounds; a round's ratio
is its 1-process median time over its 2-process median time, and the headline
is the median of the rounds' ratios (goal ≥ 1.7× on 2 cores), stored under
``"scaling_semantics"`` in ``benches/results.json``, with whether the per-unit
tables of 1 and 2 processes are bit-identical. Not part of the tests::

    .venv/bin/python -m benches.bench_scaling_semantics [--images 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benches.common import machine, noise_pairs, save_results
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import machine, noise_pairs, save_results

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=5000, help="real images (as many adversarial)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="launches per process count")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per launch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk", type=int, help="images between merges (default: the pass's)")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # output folder, under torchrun
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    passed = [f"--images={args.images}", f"--repeats={args.repeats}"]
    passed += [f"--batch-size={args.batch_size}"]
    passed += [f"--chunk={args.chunk}"] if args.chunk else []
    times: dict[int, list[list[float]]] = {1: [], 2: []}
    tables: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                out = Path(tmp) / f"r{r}-n{n}"
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc-per-node={n}",
                        "-m",
                        "benches.bench_scaling_semantics",
                        *passed,
                        f"--worker={out}",
                    ],
                    cwd=ROOT,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                    check=True,
                )
                seconds = json.loads((out / "timing.json").read_text())["seconds"]
                times[n].append(seconds)
                tables.setdefault(n, torch.load(out / "units.pt"))
                ips = 2 * args.images / statistics.median(seconds)
                print(
                    f"  round {r + 1}, {n} process(es): "
                    + ", ".join(f"{s:.2f}" for s in seconds)
                    + f" s; {ips:.0f} img/s",
                    flush=True,
                )
    ratios = [
        statistics.median(one) / statistics.median(two)
        for one, two in zip(times[1], times[2], strict=True)
    ]
    ratio = statistics.median(ratios)
    identical = all(
        torch.allclose(tables[1][layer][key], tables[2][layer][key], rtol=0, atol=0, equal_nan=True)
        for layer in tables[1]
        for key in tables[1][layer]
    )
    points = []
    for n in (1, 2):
        s = statistics.median([t for launch in times[n] for t in launch])
        points.append({"ranks": n, "threads": 1, "s": s, "ips": 2 * args.images / s})
    elapsed = time.perf_counter() - started
    print(
        f"\nsemantics over {args.images} real + {args.images} adversarial images: "
        + ", ".join(f"{p['ranks']} process(es) {p['ips']:.0f} img/s" for p in points)
        + f"; speed-up (median of the rounds' ratios) {ratio:.2f}× (goal ≥ {GOAL}) on "
        f"{os.cpu_count()} cores; tables identical: {identical}"
    )
    if args.no_save:
        return
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_scaling_semantics", *sys.argv[1:]]
        ),
        "machine": {**machine(torch.device("cpu")), "threads": 1},  # per process
        "settings": {
            "images": 2 * args.images,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "model": "resnet (random weights), model_semantics' default layers",
            "data": f"fashion-mnist/test[:{args.images}] + as many noisy copies",
            "launcher": "torchrun --standalone, gloo",
        },
        "goal": GOAL,
        "points": points,
        "ratio": ratio,
        "round_ratios": ratios,
        "met": ratio >= GOAL,
        "cpu_count": os.cpu_count(),
        "identical": identical,
        "times_s": {str(n): t for n, t in times.items()},
        "elapsed_s": elapsed,
    }
    path = save_results("scaling_semantics", result)
    print(f"\nwrote {path} (key 'scaling_semantics'); {elapsed:.0f} s in all")


def worker(args) -> None:
    """One process of ``torchrun``: run the pass ``--repeats`` times; process 0 writes the
    times and the per-unit table."""
    from advinterp.analysis import model_semantics
    from advinterp.data import open_dataset
    from advinterp.distributed import joined
    from advinterp.metrics.wordnet import similarity_matrix
    from advinterp.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    data = open_dataset("fashion-mnist", "test", limit=args.images)
    x = data.images.float() / 255
    pairs = noise_pairs(data)
    C = similarity_matrix(model.wnids)
    out = Path(args.worker)
    with joined() as world:
        with torch.inference_mode():  # warm-up (allocator, oneDNN kernels)
            model(x[: args.batch_size])
        seconds = []
        for _ in range(args.repeats):
            world.barrier()
            t0 = time.perf_counter()
            result = model_semantics(
                model, pairs, C, batch_size=args.batch_size, world=world, chunk=args.chunk
            )
            seconds.append(time.perf_counter() - t0)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(result.units, out / "units.pt")
            (out / "timing.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
