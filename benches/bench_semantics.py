"""Benchmark: the top-k + LC/CS pass of ``advinterp semantics`` against plain inference.

For the default model on the Fashion-MNIST test set (10,000 real images and as
many adversarial ones), prints the images/second of

- plain inference: ``model(x)`` under ``torch.inference_mode`` over both sets;
- the analysis: :func:`advinterp.analysis.model_semantics`, i.e. the same
  forward passes recording every conv layer (spatial max per unit), the
  per-unit top-1% stores, and LC, CS1, CS2 for every unit (over all and over
  the successful adversarial images);

measured alternately (order reversed every other round), ``--rounds`` times each;
the ratio (goal ≥ 0.8) of the best rounds, of the medians, and the median of the
rounds' ratios (the headline, stored under ``"semantics"`` in
``benches/results.json``). The adversarial set here is the real images plus fixed
noise, with random targets: speed does not depend on what the images show, and no
attack has to run first. Without ``--model`` the default architecture is used
untrained (its speed is that of the trained one). Not part of the tests::

    .venv/bin/python -m benches.bench_semantics [--model CKPT] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from advinterp.analysis import model_semantics
from advinterp.data import batches, open_dataset
from advinterp.metrics.wordnet import similarity_matrix
from advinterp.models import create_model, load_model

try:
    from benches.common import interleave, machine, noise_pairs, save_results
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import interleave, machine, noise_pairs, save_results

GOAL = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the untrained default model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, help="first N test images (default all 10,000)")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    model = (load_model(args.model) if args.model else create_model("resnet")).eval()
    data = open_dataset("fashion-mnist", "test", limit=args.limit)
    n, x = len(data), data.images.float() / 255
    pairs = noise_pairs(data)
    C = similarity_matrix(model.wnids)  # cached on disk after the first run

    def plain() -> None:
        with torch.inference_mode():
            for xb, _, _ in batches(data, args.batch_size):
                model(xb)
            for xb, _, _ in pairs.adversarial_batches(args.batch_size):
                model(xb)

    def analysis() -> None:
        model_semantics(model, pairs, C, layers="conv", batch_size=args.batch_size)

    # Warm-up (allocator, oneDNN kernels) on a slice.
    with torch.inference_mode():
        model(x[: args.batch_size])

    def progress(r: int, t: dict[str, float]) -> None:
        print(
            f"round {r + 1}: plain {2 * n / t['plain']:.0f} img/s, "
            f"analysis {2 * n / t['analysis']:.0f} img/s, ratio {t['plain'] / t['analysis']:.3f}",
            flush=True,
        )

    # Alternately, the order reversed every other round (benches.common.interleave).
    times, _ = interleave(
        {"plain": plain, "analysis": analysis}, args.rounds, torch.device("cpu"), progress
    )
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in model.net.modules())
    print(
        f"\n{2 * n} images ({n} real + {n} adversarial), {layers} conv layers, batch "
        f"{args.batch_size}, {torch.get_num_threads()} thread(s), {args.rounds} rounds:"
    )
    # Other processes only ever slow a round down: the best round is the cleanest
    # measurement; the median is printed beside it.
    ips = {}
    for label, pick in (("best", min), ("median", statistics.median)):
        plain_ips = 2 * n / pick(times["plain"])
        analysis_ips = 2 * n / pick(times["analysis"])
        ips[label] = (plain_ips, analysis_ips)
        print(
            f"  {label:<6}  plain inference {plain_ips:6.0f} img/s · top-k + LC/CS pass "
            f"{analysis_ips:6.0f} img/s · ratio {analysis_ips / plain_ips:.3f} (goal ≥ {GOAL})"
        )
    # The headline: the median of the rounds' ratios (the two runs of a round are seconds
    # apart, so a neighbour's load that comes and goes between rounds cancels).
    ratio = statistics.median(
        [tp / ta for tp, ta in zip(times["plain"], times["analysis"], strict=True)]
    )
    print(f"  median of the rounds' ratios {ratio:.3f} (goal ≥ {GOAL})")
    if args.no_save:
        return
    plain_ips, analysis_ips = ips["median"]
    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_semantics", *sys.argv[1:]]
        ),
        "machine": machine(torch.device("cpu")),
        "settings": {
            "images": 2 * n,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "conv_layers": layers,
            "model": args.model or "resnet (random weights)",
            "data": f"fashion-mnist/test[:{n}] + as many noisy copies",
        },
        "goal": GOAL,
        "plain_ips": plain_ips,
        "analysis_ips": analysis_ips,
        "ratio": ratio,
        "ratio_of_medians": analysis_ips / plain_ips,
        "met": ratio >= GOAL,
        "best": {"plain_ips": ips["best"][0], "analysis_ips": ips["best"][1]},
        "times_s": times,
        "elapsed_s": elapsed,
    }
    path = save_results("semantics", result)
    print(f"\nwrote {path} (key 'semantics'); {elapsed:.0f} s in all")


if __name__ == "__main__":
    main()
