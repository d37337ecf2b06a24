"""Benchmark: building an ``opt`` adversarial set on 1 and on 2 ``torchrun`` processes.

For each process count in ``--ranks``, ``torchrun --standalone --nproc-per-node N``
starts this module in worker mode: every process (one torch thread each) loads
the default model (random weights: speed does not depend on them) and the first
``--images`` Fashion-MNIST test images, warms up on one batch, waits for the others,
then runs :func:`advinterp.attacks.advset.build_adversarial_set` (``opt``,
``--steps`` Adam steps, least-likely targets, chunks of ``--chunk``), which gives
process ``r`` the chunks ``i % N == r``. Timed on process 0 from the barrier to the
set's completion, so start-up (imports, joining the group) is left out. Reported:
images/second per process count, the speed-up over one process, and whether the
sets are bit-identical (goal: ≥ 1.7× on 2 cores). The analysis passes (semantics,
dissect) are measured by ``benches.bench_scaling_passes``. Stored under ``"scaling_ranks"`` in
``benches/results.json``. Not part of the tests::

    .venv/bin/python -m benches.bench_scaling [--images 512] [--ranks 1,2] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from advinterp.attacks.advset import build_adversarial_set, load_adversarial_set

try:
    from benches.common import machine, run_processes, save_results
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import machine, run_processes, save_results

GOAL = 1.7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="opt's Adam steps")
    parser.add_argument("--chunk", type=int, default=64, help="images per chunk (shard)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the set's folder, under torchrun
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    passed = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("images", "steps", "chunk", "batch_size")
    ]
    points, sets = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in ranks:
            out = Path(tmp) / f"ranks{n}"
            seconds = run_processes("benches.bench_scaling", n, passed, out)
            points.append({"ranks": n, "threads": 1, "s": seconds, "ips": args.images / seconds})
            print(f"  {n} process(es): {seconds:.1f} s, {args.images / seconds:.1f} img/s")
            sets[n], _ = load_adversarial_set(out)
    first = sets[ranks[0]]
    identical = all(torch.equal(first[k], other[k]) for other in sets.values() for k in first)
    speedup = points[-1]["ips"] / points[0]["ips"]
    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_scaling", *sys.argv[1:]]
        ),
        "machine": {**machine(torch.device("cpu")), "threads": 1},  # per process
        "settings": {
            "method": "opt",
            "steps": args.steps,
            "images": args.images,
            "chunk": args.chunk,
            "batch_size": args.batch_size,
            "model": "resnet (random weights)",
            "data": f"fashion-mnist/test[:{args.images}]",
            "launcher": "torchrun --standalone, gloo",
        },
        "points": points,
        "speedup": speedup,
        "cpu_count": os.cpu_count(),
        "identical": identical,
        "goal": GOAL,
        "elapsed_s": elapsed,
    }
    print(
        f"\nopt over {args.images} images: "
        + ", ".join(f"{p['ranks']} process(es) {p['ips']:.1f} img/s" for p in points)
        + f"; speed-up {speedup:.2f}× (goal ≥ {GOAL}) on {os.cpu_count()} cores; "
        f"sets identical: {identical}"
    )
    if not args.no_save:
        path = save_results("scaling_ranks", result)
        print(f"\nwrote {path} (key 'scaling_ranks'); {elapsed:.0f} s in all")


def worker(args) -> None:
    """One process of ``torchrun``: build the set, process 0 writes the time it took."""
    from advinterp.attacks import make_attack
    from advinterp.data import open_dataset
    from advinterp.distributed import joined
    from advinterp.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    data = open_dataset("fashion-mnist", "test", limit=args.images)
    kw = dict(method="opt", steps=args.steps, chunk=args.chunk, batch_size=args.batch_size)
    with joined() as world:
        # Warm-up (kernels, allocator) on one batch.
        x, y = data.images[: args.batch_size].float() / 255, data.labels[: args.batch_size]
        make_attack("opt", model, steps=2).run(x, y, progress=False)
        world.barrier()
        t0 = time.perf_counter()
        build_adversarial_set(model, data, Path(args.worker), progress=False, **kw)
        seconds = time.perf_counter() - t0
        if world.is_main:
            (Path(args.worker) / "timing.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
