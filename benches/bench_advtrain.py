"""Benchmark: one consistency-training step against one standard training step.

On the default model (``resnet``, training mode) and one batch of ``--batch``
Fashion-MNIST training images (28×28, channels-last as the epoch loop feeds
them), one process times, alternately (order reversed every other round),
``--iters`` steps of each task, ``--rounds`` times:

- standard: forward, cross-entropy, backward into the parameters, SGD step;
- consistency: :func:`advinterp.advtrain.adv_step` (forward of the clean batch,
  its input gradient, forward of the FGSM batch, the eq. 5–9 loss with φ the
  penultimate features), backward into the parameters, SGD step;

each with the conv weights in NCHW layout (what ``advinterp train`` runs) and
in channels-last layout (what ``advinterp advtrain`` runs on the CPU). Reported:
the ratio consistency ÷ standard in the same layout (the algorithm's cost;
goal ≤ 2.3) and as the two commands run (advtrain's step ÷ train's), each the
median over the rounds of that round's ratio.

Two forward and two backward passes would make ≈ 2; with β > 0 the clean
graph is walked backward twice (once for the FGSM direction, input gradient
only, once in the loss's backward, since φ(x) is paired with φ(x_fgsm)), so
the floor is ≈ (2F + B_input + 2B) ÷ (F + B) ≈ 2.3 when a backward pass costs
two forwards. Weights are random: speed does not depend on them. Stores the
result under ``"advtrain"`` in ``benches/results.json``. Not part of the tests::

    .venv/bin/python -m benches.bench_advtrain [--batch 128] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from advinterp.advtrain import AdvTrainConfig, FeatureTap, adv_step, draw_eps
from advinterp.data import open_dataset
from advinterp.models import create_model
from advinterp.train import sgd

try:
    from benches.common import interleave, machine, median, pick_device, save_results, set_threads
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import interleave, machine, median, pick_device, save_results, set_threads

GOAL = 2.3
LAYOUTS = {"nchw": "NCHW weights", "cl": "channels-last weights"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)
    device = pick_device(args.device)

    data = open_dataset("fashion-mnist", "train", limit=args.batch)
    x = (data.images.float() / 255).to(device).contiguous(memory_format=torch.channels_last)
    y = data.labels.to(device)
    cfg = AdvTrainConfig(init="-")  # the defaults: α = 0.5, β = 1, ε ∈ [4, 16]/255, φ penultimate
    eps = draw_eps(len(y), cfg.eps_min, cfg.eps_max, torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    model = create_model("resnet").to(device).train()

    def layout(name):
        m = copy.deepcopy(model)
        return m.to(memory_format=torch.channels_last) if name == "cl" else m

    tasks = {}
    for name in LAYOUTS:
        tasks[f"standard_{name}"] = standard_steps(layout(name), x, y, args.iters)
        tasks[f"consistency_{name}"] = consistency_steps(layout(name), x, y, eps, cfg, args.iters)
    for task in tasks.values():  # warm-up: allocator and oneDNN kernels for these shapes
        task()
    info = machine(device)
    print(
        f"advtrain: batch {args.batch}, {args.iters} steps × {args.rounds} rounds, "
        f"{info['device']} ({info['device_name']}), {info['threads']} thread(s), "
        f"torch {info['torch']}",
        flush=True,
    )

    def progress(r: int, t: dict[str, float]) -> None:
        parts = [
            f"{name} {t[f'standard_{name}'] / args.iters * 1e3:.0f}/"
            f"{t[f'consistency_{name}'] / args.iters * 1e3:.0f} ms "
            f"(×{t[f'consistency_{name}'] / t[f'standard_{name}']:.2f})"
            for name in LAYOUTS
        ]
        print(f"  round {r + 1}: standard/consistency per step: " + ", ".join(parts), flush=True)

    times, _ = interleave(tasks, args.rounds, device, progress)
    med = {k: median(v) / args.iters for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        # Median of the per-round ratios: the two runs of a round are seconds apart, so a
        # neighbour's load that comes and goes between rounds cancels.
        return median([ta / tb for ta, tb in zip(times[a], times[b], strict=True)])

    ratios = {name: ratio(f"consistency_{name}", f"standard_{name}") for name in LAYOUTS}
    # What the commands run: train keeps NCHW weights, advtrain (CPU) channels-last ones.
    as_run = "consistency_cl" if device.type == "cpu" else "consistency_nchw"
    ratio_as_run = ratio(as_run, "standard_nchw")
    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_advtrain", *sys.argv[1:]]
        ),
        "machine": info,
        "settings": {
            "batch": args.batch,
            "iters": args.iters,
            "rounds": args.rounds,
            "model": "resnet (random weights)",
            "data": f"fashion-mnist/train[:{args.batch}]",
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "phi": cfg.phi,
        },
        "goal": GOAL,
        "s_per_step": med,
        "ratio": ratios,
        "ratio_as_run": ratio_as_run,
        "times_s": times,
        "elapsed_s": elapsed,
    }
    print(
        f"\nOne training step, batch {args.batch}, median of {args.rounds} interleaved rounds "
        "(conv weights NCHW | channels-last); ratios: median of the rounds' ratios"
    )
    for what in ("standard", "consistency"):
        cells = " | ".join(f"{med[f'{what}_{name}'] * 1e3:6.1f} ms" for name in LAYOUTS)
        print(f"  {what:<12} {cells}")
    for name in LAYOUTS:
        ok = "ok" if ratios[name] <= GOAL else "MISSED"
        print(
            f"  consistency ÷ standard, {LAYOUTS[name]}: {ratios[name]:.2f} (goal ≤ {GOAL}, {ok})"
        )
    print(f"  as the commands run (advtrain ÷ train): {ratio_as_run:.2f}")
    if not args.no_save:
        path = save_results("advtrain", result)
        print(f"\nwrote {path} (key 'advtrain'); {elapsed:.0f} s in all")


# -- what is timed ---------------------------------------------------------------------------


def standard_steps(model, x, y, iters):
    """``iters`` steps of standard training on one batch."""
    opt = sgd(model, 0.01, 0.9, 5e-5)
    params = [p for p in model.net.parameters() if p.requires_grad]

    def run():
        for _ in range(iters):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
        return loss

    return run


def consistency_steps(model, x, y, eps, cfg, iters):
    """``iters`` steps of consistency training on one batch, as ``advtrain`` runs them."""
    opt = sgd(model, 0.01, 0.9, 5e-5)
    params = [p for p in model.net.parameters() if p.requires_grad]
    tap = FeatureTap(model, cfg.phi)

    def run():
        for _ in range(iters):
            loss, _, _ = adv_step(model, tap, x, y, eps, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
        return loss

    return run


if __name__ == "__main__":
    main()
