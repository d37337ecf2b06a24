"""Benchmark: the analysis passes (semantics, dissect) on 1 and on 2 ``torchrun`` processes.

For each pass and process count ``torchrun --standalone --nproc-per-node N``
starts this module in worker mode: every process (one torch thread each) builds
the default model (random weights: speed does not depend on them) and its data,
warms up on one batch, then ``--repeats`` times waits for the others and runs the
pass with the process group's :class:`~advinterp.distributed.World`: each process
reads its share of the batches of each chunk, the statistics are merged after
each chunk (:class:`~advinterp.tally.Tally`). Timed on process 0 from the barrier
to the result, so start-up (imports, joining the group, building the data) is
left out.

- ``semantics``: :func:`advinterp.analysis.model_semantics` over every unit (its
  default layers) of the first ``--images`` Fashion-MNIST test images and as many
  noisy copies as their adversarial set (random targets, as
  ``benches.bench_semantics``); top-k stores merged, LC/CS1/CS2 on every process.
- ``dissect``: :func:`advinterp.analysis.dissection.dissect_model` on the embedded
  probe's first ``--probe-images`` images (its default layers); exact thresholds
  and IoU counts merged.

The launches alternate (1, 2, 2, 1, …) for ``--rounds`` rounds; a round's ratio
is its 1-process median time over its 2-process median time, and the headline
is the median of the rounds' ratios (goal ≥ 1.7× on 2 cores), stored under
``"scaling_<pass>"`` in ``benches/results.json``, with whether the results of 1
and 2 processes are bit-identical (the per-unit tables; the IoU and thresholds).
Attacks across processes are measured by ``benches.bench_scaling``. Not part of
the tests::

    .venv/bin/python -m benches.bench_scaling_passes [--passes semantics dissect] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benches.common import machine, noise_pairs, run_processes, save_results
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import machine, noise_pairs, run_processes, save_results

GOAL = 1.7


PASSES = ("semantics", "dissect")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument(
        "--images", type=int, default=5000, help="semantics: real images (as many adversarial)"
    )
    parser.add_argument(
        "--probe-images", type=int, default=3000, help="dissect: embedded probe images"
    )
    parser.add_argument("--rounds", type=int, default=2, help="launches per process count")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per launch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk", type=int, help="images between merges (default: the pass's)")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # output folder, under torchrun
    parser.add_argument("--pass", dest="pass_", help=argparse.SUPPRESS)  # the worker's pass
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for name in args.passes:
        measure(args, name)


def measure(args, name: str) -> None:
    """Time pass ``name`` on 1 and 2 processes, alternating launches; print and save."""
    started = time.perf_counter()
    passed = [f"--images={args.images}", f"--probe-images={args.probe_images}"]
    passed += [f"--repeats={args.repeats}", f"--batch-size={args.batch_size}", f"--pass={name}"]
    passed += [f"--chunk={args.chunk}"] if args.chunk else []
    images = 2 * args.images if name == "semantics" else args.probe_images
    times: dict[int, list[list[float]]] = {1: [], 2: []}
    results: dict[int, dict] = {}
    print(f"{name}:", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                out = Path(tmp) / f"r{r}-n{n}"
                seconds = run_processes("benches.bench_scaling_passes", n, passed, out)
                times[n].append(seconds)
                results.setdefault(n, torch.load(out / "result.pt"))
                ips = images / statistics.median(seconds)
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
    identical = results[1].keys() == results[2].keys() and all(
        torch.allclose(results[1][key], results[2][key], rtol=0, atol=0, equal_nan=True)
        for key in results[1]
    )
    points = []
    for n in (1, 2):
        s = statistics.median([t for launch in times[n] for t in launch])
        points.append({"ranks": n, "threads": 1, "s": s, "ips": images / s})
    elapsed = time.perf_counter() - started
    what = (
        f"semantics over {args.images} real + {args.images} adversarial images"
        if name == "semantics"
        else f"dissection of {args.probe_images} probe images"
    )
    print(
        f"\n{what}: "
        + ", ".join(f"{p['ranks']} process(es) {p['ips']:.0f} img/s" for p in points)
        + f"; speed-up (median of the rounds' ratios) {ratio:.2f}× (goal ≥ {GOAL}) on "
        f"{os.cpu_count()} cores; results identical: {identical}\n",
        flush=True,
    )
    if args.no_save:
        return
    settings = {
        "images": images,
        "batch_size": args.batch_size,
        "chunk": args.chunk,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "launcher": "torchrun --standalone, gloo",
    }
    if name == "semantics":
        settings["model"] = "resnet (random weights), model_semantics' default layers"
        settings["data"] = f"fashion-mnist/test[:{args.images}] + as many noisy copies"
    else:
        settings["model"] = "resnet (random weights), dissect's default layers"
        settings["data"] = f"fashion-broden, {args.probe_images} images"
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_scaling_passes", *sys.argv[1:]]
        ),
        "machine": {**machine(torch.device("cpu")), "threads": 1},  # per process
        "pass": name,
        "settings": settings,
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
    path = save_results(f"scaling_{name}", result)
    print(f"wrote {path} (key 'scaling_{name}'); {elapsed:.0f} s in all\n")


def worker(args) -> None:
    """One process of ``torchrun``: run the pass ``--repeats`` times; process 0 writes the
    times and the result's tensors."""
    from advinterp.distributed import joined
    from advinterp.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    if args.pass_ == "semantics":
        from advinterp.analysis import model_semantics
        from advinterp.data import open_dataset
        from advinterp.metrics.wordnet import similarity_matrix

        data = open_dataset("fashion-mnist", "test", limit=args.images)
        x = data.images[: args.batch_size].float() / 255
        pairs = noise_pairs(data)
        C = similarity_matrix(model.wnids)

        def run(world):
            result = model_semantics(
                model, pairs, C, batch_size=args.batch_size, world=world, chunk=args.chunk
            )
            return {
                f"{layer}/{key}": value
                for layer, table in result.units.items()
                for key, value in table.items()
            }
    else:
        from advinterp.analysis.dissection import dissect_model
        from advinterp.data.broden import open_probe

        probe = open_probe("fashion-broden", model, size=args.probe_images)
        x = torch.stack([probe.image(i) for i in range(args.batch_size)])

        def run(world):
            result = dissect_model(
                model,
                probe,
                batch_size=args.batch_size,
                world=world,
                chunk=args.chunk,
                progress=False,
            )
            return {
                f"{layer}/{key}": getattr(d, key)
                for layer, d in result.real.items()
                for key in ("iou", "thresholds")
            }

    out = Path(args.worker)
    with joined() as world:
        with torch.inference_mode():  # warm-up (allocator, oneDNN kernels)
            model(x)
        seconds = []
        for _ in range(args.repeats):
            world.barrier()
            t0 = time.perf_counter()
            result = run(world)
            seconds.append(time.perf_counter() - t0)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(result, out / "result.pt")
            (out / "timing.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
