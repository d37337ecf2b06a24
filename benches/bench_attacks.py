"""Benchmark: our attacks against torchattacks, foolbox and a bare forward+backward loop.

On the default model and ``--batch`` Fashion-MNIST test images, one process
runs, alternately (order reversed every other round) and ``--repeats`` times:

- the floor: a bare loop of forward + backward w.r.t. the input only
  (``x.requires_grad_()``, cross-entropy summed, ``torch.autograd.grad``) on
  the model as given; and the same loop with the conv weights in
  channels-last layout (what our attacks run on the CPU, see
  ``advinterp.attacks.base._channels_last``);
- FGSM, PGD (10 steps, random start) and MI-FGSM (10 steps, μ = 1), ε = 8/255,
  α = 2/255: ours (``attack(x, y)``), torchattacks' (``attack(x, y)``) and
  foolbox's (``attack.run(fmodel, x, y, epsilon=ε)``: the algorithm without
  the success check that ``attack(...)`` adds);
- ``opt`` (the paper's eq. 4, 20 Adam steps, least-likely targets);

then ``opt`` and the floor at batch sizes ``--scaling`` (each over at least
``--scaling-images`` images). Reported: images/second,
ratios of medians with their goals (issue 7), and max |Δ| between the outputs
where the algorithms are the same, on the first ``--agree`` images: FGSM; PGD
without random start (ours: BIM) against both libraries; MI-FGSM against
torchattacks (foolbox's L∞ MI-FGSM does not L1-normalise the gradient: timed,
not compared). The model's weights are random unless ``--model`` is given:
speed does not depend on them. Prints a table and stores it under ``"attacks"``
in ``benches/results.json``. Not part of the tests::

    .venv/bin/python -m benches.bench_attacks [--batch 256] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys
import time

import torch
import torch.nn.functional as F

from advinterp.attacks import make_attack
from advinterp.data import open_dataset
from advinterp.models import create_model, load_model

try:
    from benches.common import interleave, machine, median, pick_device, save_results, set_threads
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import interleave, machine, median, pick_device, save_results, set_threads

EPS, ALPHA, STEPS, OPT_STEPS = 8 / 255, 2 / 255, 10, 20
FLOOR_ITERS = 3  # floor iterations per timed run
ATTACKS = {"fgsm": 1, "pgd": STEPS, "mifgsm": STEPS}  # name: gradient steps
GOALS = {"torchattacks": 1.10, "foolbox": 1.00, "floor": 0.95, "opt_overhead": 1.15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the interleaved runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--model", help="checkpoint (default: the default model, random weights)")
    parser.add_argument(
        "--scaling", default="32,64,128,256,512", help="batch sizes for opt ('' to skip)"
    )
    parser.add_argument(
        "--scaling-images", type=int, default=256, help="images per scaling point (at least)"
    )
    parser.add_argument("--agree", type=int, default=128, help="images for the output agreement")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)
    device = pick_device(args.device)
    scaling = [int(b) for b in args.scaling.split(",") if b.strip()]

    torch.manual_seed(0)
    model = (load_model(args.model) if args.model else create_model("resnet")).eval().to(device)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    n = max([args.batch, args.agree, args.scaling_images, *scaling])
    data = open_dataset("fashion-mnist", "test", limit=n)
    x_all, y_all = (data.images.float() / 255).to(device), data.labels.to(device)
    x, y = x_all[: args.batch], y_all[: args.batch]
    libs = libraries(model, device)
    info = machine(device)
    print(
        f"attacks: batch {args.batch}, {args.repeats} rounds, {info['device']} "
        f"({info['device_name']}), {info['threads']} thread(s), torch {info['torch']}, "
        + ", ".join(f"{k} {v['version']}" for k, v in libs.items()),
        flush=True,
    )

    # -- the main comparison ---------------------------------------------------------------
    tasks = {
        "floor": floor(model, x, y, FLOOR_ITERS),
        "floor_cl": floor(model_cl, x, y, FLOOR_ITERS),
    }
    for name in ATTACKS:
        tasks[f"ours.{name}"] = ours(name, model, x, y)
        for lib, built in libs.items():
            tasks[f"{lib}.{name}"] = built["run"](name, x, y)
    opt = make_attack("opt", model, steps=OPT_STEPS)
    tasks["ours.opt"] = lambda: opt(x, y)
    warm_up(tasks, ("floor", "floor_cl", "ours.fgsm", *(f"{lib}.fgsm" for lib in libs)))

    def progress(r: int, t: dict[str, float]) -> None:
        it = t["floor"] / FLOOR_ITERS
        steps = {**ATTACKS, "opt": OPT_STEPS}
        parts = [f"{k} {t[k] / steps[k.split('.')[1]] / it:.2f}" for k in t if "." in k]
        print(f"  round {r + 1}: s/iteration ÷ floor's: " + ", ".join(parts), flush=True)

    times, _ = interleave(tasks, args.repeats, device, progress)
    med = {k: median(v) for k, v in times.items()}
    b = args.batch
    floor_it, floor_cl_it = med["floor"] / FLOOR_ITERS, med["floor_cl"] / FLOOR_ITERS
    rows = {}
    for name, steps in ATTACKS.items():
        row = {"steps": steps, "ours_ips": b / med[f"ours.{name}"]}
        for lib in libs:
            row[f"{lib}_ips"] = b / med[f"{lib}.{name}"]
            row[f"ratio_{lib}"] = med[f"{lib}.{name}"] / med[f"ours.{name}"]
        row["ratio_floor"] = floor_it * steps / med[f"ours.{name}"]
        row["ratio_floor_cl"] = floor_cl_it * steps / med[f"ours.{name}"]
        rows[name] = row
    opt_row = {
        "steps": OPT_STEPS,
        "ours_ips": b / med["ours.opt"],
        "overhead": med["ours.opt"] / (OPT_STEPS * floor_it),
        "overhead_cl": med["ours.opt"] / (OPT_STEPS * floor_cl_it),
    }

    # -- agreement of the outputs ----------------------------------------------------------
    xa, ya = x_all[: args.agree], y_all[: args.agree]
    # Ours as run (channels-last on the CPU) and with the caller's NCHW layout: the
    # algorithms are the same; the layout changes the rounding of the convolutions' sums,
    # which flips sign(∇) where a gradient is ~0, and an iterative attack carries that on.
    for name, row in rows.items():
        refs = {
            "": ours(name, model, xa, ya, random_start=False)(),
            "_nchw": ours(name, model, xa, ya, random_start=False, channels_last=False)(),
        }
        for suffix in refs:
            row["max_abs_diff" + suffix], row["frac_differ" + suffix] = {}, {}
        for lib, built in libs.items():
            if name not in built["same"]:
                continue
            out = built["run"](name, xa, ya, random_start=False)()
            for suffix, ref in refs.items():
                d = (out - ref).abs()
                row["max_abs_diff" + suffix][lib] = float(d.max())
                row["frac_differ" + suffix][lib] = float((d > 1e-6).float().mean())

    # -- scaling of opt --------------------------------------------------------------------
    # Each batch size attacks the same max(bs, --scaling-images) images (several batches when
    # small), so that every point is timed over about the same work.
    scale_rows = []
    for i, bs in enumerate(scaling):
        k = max(bs, args.scaling_images)
        xs, ys = x_all[:k], y_all[:k]
        pair = {
            "floor": floor(model, xs, ys, 2, batch=bs),
            "opt": lambda xs=xs, ys=ys, bs=bs: opt.run(xs, ys, batch_size=bs, progress=False),
        }
        floor(model, xs, ys, 1, batch=bs)()  # warm-up: allocator and kernels for this size
        t, _ = interleave(dict(reversed(pair.items())) if i % 2 else pair, 1, device)
        scale_rows.append(
            {
                "batch": bs,
                "images": k,
                "opt_ips": k / t["opt"][0],
                "floor_ips": 2 * k / t["floor"][0],
                "overhead": t["opt"][0] / (OPT_STEPS * t["floor"][0] / 2),
            }
        )

    elapsed = time.perf_counter() - started
    result = {
        "command": " ".join(
            [sys.executable.split("/")[-1], "-m", "benches.bench_attacks", *sys.argv[1:]]
        ),
        "machine": info,
        "libraries": {k: v["version"] for k, v in libs.items()},
        "settings": {
            "batch": b,
            "repeats": args.repeats,
            "eps": EPS,
            "alpha": ALPHA,
            "steps": STEPS,
            "opt_steps": OPT_STEPS,
            "model": args.model or "resnet (random weights)",
            "data": f"fashion-mnist/test[:{n}]",
            "agree_images": args.agree,
            "scaling_images": args.scaling_images,
        },
        "goals": GOALS,
        "floor_ips": b / floor_it,
        "floor_cl_ips": b / floor_cl_it,
        "attacks": rows,
        "opt": opt_row,
        "scaling": scale_rows,
        "times_s": times,
        "elapsed_s": elapsed,
    }
    print_table(result, libs)
    if not args.no_save:
        path = save_results("attacks", result)
        print(f"\nwrote {path} (key 'attacks'); {elapsed:.0f} s in all")


# -- what is timed ---------------------------------------------------------------------------


def floor(model, x, y, iters, batch=None):
    """``iters`` bare forward+backward passes w.r.t. the input: the physical floor of an attack.

    One pass covers all of ``x``, in batches of ``batch`` (default: one batch).
    """
    batch = batch or len(x)

    def run():
        for _ in range(iters):
            for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
                xg = xb.detach().requires_grad_(True)
                loss = F.cross_entropy(model(xg), yb, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xg)
        return grad

    return run


def ours(name, model, x, y, random_start=True, channels_last=None):
    if name == "pgd" and not random_start:  # PGD without its random start is BIM
        name = "bim"
    kwargs = {} if name == "fgsm" else {"alpha": ALPHA, "steps": STEPS}
    attack = make_attack(name, model, eps=EPS, **kwargs)
    attack.channels_last = channels_last
    return lambda: attack(x, y)


def libraries(model, device) -> dict:
    """The installed libraries: version, a task builder and the attacks whose algorithm is ours."""
    libs = {}
    try:
        import torchattacks as ta
    except ImportError:
        print("torchattacks is not installed (pip install torchattacks): skipped")
    else:

        def run_ta(name, x, y, random_start=True):
            attack = {
                "fgsm": lambda: ta.FGSM(model, eps=EPS),
                "pgd": lambda: ta.PGD(model, EPS, ALPHA, STEPS, random_start=random_start),
                "mifgsm": lambda: ta.MIFGSM(model, EPS, ALPHA, STEPS, decay=1.0),
            }[name]()
            return lambda: attack(x, y)

        libs["torchattacks"] = {
            "version": importlib.metadata.version("torchattacks"),
            "run": run_ta,
            "same": {"fgsm", "pgd", "mifgsm"},
        }
    try:
        import foolbox as fb
    except ImportError:
        print("foolbox is not installed (pip install foolbox): skipped")
    else:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)

        def run_fb(name, x, y, random_start=True):
            attack = {
                "fgsm": lambda: fb.attacks.LinfFastGradientAttack(random_start=False),
                "pgd": lambda: fb.attacks.LinfProjectedGradientDescentAttack(
                    abs_stepsize=ALPHA, steps=STEPS, random_start=random_start
                ),
                "mifgsm": lambda: fb.attacks.LinfMomentumIterativeFastGradientMethod(
                    abs_stepsize=ALPHA, steps=STEPS, momentum=1.0
                ),
            }[name]()
            return lambda: attack.run(fmodel, x, y, epsilon=EPS)

        libs["foolbox"] = {
            "version": importlib.metadata.version("foolbox"),
            "run": run_fb,
            "same": {"fgsm", "pgd"},
        }
    return libs


def warm_up(tasks, names) -> None:
    """One untimed run of the single-step tasks: allocator and oneDNN kernels for this shape."""
    for name in names:
        tasks[name]()


# -- the table -------------------------------------------------------------------------------


def print_table(r: dict, libs: dict) -> None:
    g, m, st = r["goals"], r["machine"], r["settings"]
    print(
        f"\nAttacks on {st['model']}, batch {st['batch']}, ε = 8/255, α = 2/255; {m['device']} "
        f"({m['device_name']}), {m['threads']} thread(s); median of {st['repeats']} "
        "interleaved rounds"
    )
    print(
        f"  floor: bare forward+backward w.r.t. the input   {r['floor_ips']:7.0f} img/s per iteration"
    )
    print(
        f"  the same, conv weights channels-last           {r['floor_cl_ips']:7.0f} img/s per iteration"
    )
    cols = ["attack", "ours img/s", *(f"{lib} img/s" for lib in libs)]
    cols += [*(f"ours/{lib}" for lib in libs), "ours/floor per iter.", "÷ cl floor"]
    widths = [17, 10, *(len(c) for c in cols[2 : 2 + len(libs)])]
    widths += [max(len(c), 22) for c in cols[2 + len(libs) : -1]] + [10]
    print(
        "\n  "
        + "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cols, widths, strict=True))
        )
    )
    for name, row in r["attacks"].items():
        cells = [f"{name} ({row['steps']} step{'s' if row['steps'] > 1 else ''})"]
        cells += [f"{row['ours_ips']:.0f}", *(f"{row[lib + '_ips']:.0f}" for lib in libs)]
        cells += [verdict(row["ratio_" + lib], g[lib], "≥") for lib in libs]
        cells += [verdict(row["ratio_floor"], g["floor"], "≥"), f"{row['ratio_floor_cl']:.2f}×"]
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    o = r["opt"]
    print(
        f"  {'opt (' + str(o['steps']) + ' steps)':<17}  {o['ours_ips']:>10.0f}   time per iteration ÷ "
        f"floor's: {verdict(o['overhead'], g['opt_overhead'], '≤')}; ÷ cl floor's: {o['overhead_cl']:.2f}×"
    )
    print(
        f"\n  max |Δ| between outputs on {st['agree_images']} images where the algorithms are "
        "the same (fraction of pixels differing by > 1e-6),\n  ours as run (conv weights "
        "channels-last on the CPU) | ours in the model's NCHW layout:"
    )
    for name, row in r["attacks"].items():
        what = "pgd, no random start (ours: bim)" if name == "pgd" else name
        parts = [
            f"{lib} {row['max_abs_diff'][lib]:.2g} ({row['frac_differ'][lib]:.2g}) | "
            f"{row['max_abs_diff_nchw'][lib]:.2g} ({row['frac_differ_nchw'][lib]:.2g})"
            for lib in row["max_abs_diff"]
        ]
        skipped = [lib for lib in libs if lib not in row["max_abs_diff"]]
        if skipped:
            parts.append(f"{', '.join(skipped)}: another algorithm, not compared")
        print(f"    {what:<33} " + "; ".join(parts))
    if r["scaling"]:
        print(
            f"\n  scaling of opt ({o['steps']} steps); overhead = time per iteration ÷ the floor's "
            f"at that batch size (goal ≤ {g['opt_overhead']:.2f}):"
        )
        print(
            f"  {'batch':>7}{'images':>8}{'opt img/s':>11}{'floor img/s/iter':>18}{'overhead':>10}"
        )
        for s in r["scaling"]:
            print(
                f"  {s['batch']:>7}{s['images']:>8}{s['opt_ips']:>11.0f}{s['floor_ips']:>18.0f}"
                f"{s['overhead']:>9.2f}×"
            )


def verdict(value: float, goal: float, op: str) -> str:
    ok = value >= goal if op == "≥" else value <= goal
    return f"{value:.2f}× ({op}{goal:.2f} {'ok' if ok else 'MISSED'})"


if __name__ == "__main__":
    main()
