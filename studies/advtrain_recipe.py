"""The -Adv fine-tuning recipe: β, the consistency term's scale and the learning rate.

Trains the normal model as ``advinterp reproduce`` does (4 epochs, seed 0), then
fine-tunes it once per setting of a grid (β × learning rate, the relative
consistency term, plus β = 0, the ``-AT`` baseline, and the paper's summed term at
β = 1) with reproduce's budget (2 epochs over 30,000 images), and measures each
model on the whole test set: clean top-1, FGSM top-1 at ε = 4/255 (Table 2's
first ε) and PGD-20 at ε = 4/255 on the first 1,000 test images. Every change
against the normal model comes with a 95% bootstrap interval over the test
images (the same images for both models, resampled together).

Writes ``OUT/recipe.json`` and ``OUT/recipe.md`` (the table) and
``OUT/recipe.png`` (clean top-1 against FGSM top-1, one curve per learning
rate and scale, labelled by β). Models are cached in ``OUT``; a rerun only
evaluates. ``--device cuda`` trains on one GPU.

    python -m studies.advtrain_recipe --out runs/recipe            # 2 CPU cores: about 1 h
    python -m studies.advtrain_recipe --out runs/recipe --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch

#: (consistency scale, β) pairs; β = 0 is -AT whatever the scale.
GRID = [("relative", 0.0)] + [("relative", b) for b in (0.3, 1.0, 3.0, 10.0, 30.0)]
GRID_SUM = [("sum", 1.0)]  # the paper's term as written, β = 1 (the old default)
LRS = (0.01, 0.003)
EPS = 4 / 255
PGD_IMAGES = 1000


def _one_process_group(device: str) -> None:
    """A group of one process, so that training runs on ``device`` (cuda:0)."""
    if device != "cuda" or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def _train(out: Path, arch: str, epochs: int, limit: int | None) -> Path:
    from advinterp.train import TrainConfig, train

    folder = out / arch
    if not (folder / "model.safetensors").is_file():
        train(TrainConfig(arch=arch, epochs=epochs, limit=limit, seed=0), folder, progress=True)
    return folder / "model.safetensors"


def _advtrain(out: Path, init: Path, name: str, scale: str, beta: float, lr: float, args):
    from advinterp.advtrain import AdvTrainConfig, advtrain

    folder = out / name
    if not (folder / "model.safetensors").is_file():
        cfg = AdvTrainConfig(
            init=str(init),
            epochs=args.adv_epochs,
            limit=args.adv_limit,
            beta=beta,
            consistency=scale,
            lr=lr,
            seed=0,
            eval_limit=1000,
        )
        advtrain(cfg, folder, progress=True)
    return folder / "model.safetensors"


def _correct(path: Path, device: torch.device, eval_limit: int | None) -> dict[str, torch.Tensor]:
    """Per test image, top-1 right or not: clean, FGSM and (first images) PGD-20, ε = 4/255."""
    from advinterp.attacks import FGSM, make_attack
    from advinterp.attacks.fgsm import fgsm_step
    from advinterp.data import batches, open_dataset
    from advinterp.models import load_model

    model = load_model(str(path)).to(device).eval()
    data = open_dataset("fashion-mnist", "test", limit=eval_limit)
    attack = FGSM(model, eps=EPS)
    clean, fgsm = [], []
    for x, y, _ in batches(data, 500):
        x, y = x.to(device), y.to(device)
        with torch.inference_mode():
            clean.append((model(x).argmax(1) == y).cpu())
        grad = attack.loss_grad(x, y, None)
        with torch.inference_mode():
            fgsm.append((model(fgsm_step(x, grad, EPS)).argmax(1) == y).cpu())
    n = min(PGD_IMAGES, len(data))
    x, y = data.images[:n].float().div(255).to(device), data.labels[:n].to(device)
    x_adv = make_attack("pgd", model, eps=EPS, steps=20, seed=0).run(x, y, batch_size=500)
    with torch.inference_mode():
        pgd = (model(x_adv.to(device)).argmax(1) == y).cpu()
    return {"clean": torch.cat(clean), "fgsm": torch.cat(fgsm), "pgd20": pgd}


def _change(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus that of ``b`` in points, with a 95% paired bootstrap interval."""
    from advinterp.stats.bootstrap import percentile_interval, resample_counts, weighted_mean

    diff = a.double() - b.double()
    reps = 100 * weighted_mean(resample_counts(len(diff), seed=seed), diff)
    low, high = percentile_interval(reps)
    return 100 * diff.mean().item(), float(low), float(high)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    normal = next(r for r in rows if r["beta"] is None)
    ax.scatter(
        [normal["fgsm"]], [normal["clean"]], marker="*", s=120, c="k", label="normal", zorder=3
    )
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["beta"] is not None:
            curves.setdefault((r["scale"] if r["beta"] else "relative", r["lr"]), []).append(r)
    for (scale, lr), pts in sorted(curves.items()):
        pts.sort(key=lambda r: r["beta"])
        style = "o-" if scale == "relative" else "s"
        ax.plot(
            [p["fgsm"] for p in pts], [p["clean"] for p in pts], style, label=f"{scale}, lr {lr}"
        )
        for p in pts:
            ax.annotate(
                f"β={p['beta']:g}",
                (p["fgsm"], p["clean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(normal["clean"] - 5, color="grey", ls=":", lw=1, label="normal − 5 points")
    ax.set_xlabel("FGSM top-1 at ε = 4/255 (%)")
    ax.set_ylabel("clean top-1 (%)")
    ax.set_title("-Adv fine-tuning: clean against FGSM accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.advtrain_recipe", description=__doc__)
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--arch", default="resnet")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--adv-epochs", type=int, default=2)
    p.add_argument("--adv-limit", type=int, default=30000)
    p.add_argument("--eval-limit", type=int, help="test images measured (default: all 10,000)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--betas", type=float, nargs="+", help="relative-scale β values (default grid)")
    args = p.parse_args(argv)
    _one_process_group(args.device)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    out = Path(args.out) / args.arch
    out.mkdir(parents=True, exist_ok=True)
    grid = GRID if args.betas is None else [("relative", b) for b in args.betas]
    start = time.perf_counter()
    init = _train(out, args.arch, args.train_epochs, args.train_limit)
    models = {"normal": (init, None, None, None)}
    for lr in args.lrs:
        for scale, beta in grid + GRID_SUM:
            name = f"{args.arch}-{'AT' if not beta else 'Adv'}-{scale}-b{beta:g}-lr{lr:g}"
            if not beta:
                name = f"{args.arch}-AT-lr{lr:g}"
            path = _advtrain(out, init, name, scale, beta, lr, args)
            models[name] = (path, scale, beta, lr)
    correct = {name: _correct(m[0], device, args.eval_limit) for name, m in models.items()}
    base = correct["normal"]
    rows = []
    for name, (_, scale, beta, lr) in models.items():
        c = correct[name]
        row = {"model": name, "scale": scale, "beta": beta, "lr": lr}
        for measure in ("clean", "fgsm", "pgd20"):
            row[measure] = 100 * c[measure].double().mean().item()
            if name != "normal":
                row[f"{measure}_change"] = _change(c[measure], base[measure])
        rows.append(row)
    seconds = time.perf_counter() - start
    device_name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    )
    meta = {
        "arch": args.arch,
        "device": device_name,
        "seconds": seconds,
        "eps": 4,
        "test_images": len(base["clean"]),
        "pgd_images": len(base["pgd20"]),
        "args": vars(args),
    }
    (out / "recipe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"`python -m studies.advtrain_recipe --arch {args.arch}` on {device_name}, "
        f"{seconds / 60:.1f} min; {meta['test_images']} test images (PGD-20: the first "
        f"{meta['pgd_images']}), ε = 4/255; changes against the normal model with 95% "
        "bootstrap intervals over the test images.",
        "",
        "| model | scale | β | lr | clean top-1 | clean change | FGSM top-1 | FGSM change "
        "| PGD-20 top-1 | PGD-20 change |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(ch):
        return "" if ch is None else f"{ch[0]:+.1f} [{ch[1]:+.1f}, {ch[2]:+.1f}]"

    for r in rows:
        beta = "" if r["beta"] is None else format(r["beta"], "g")
        lr = "" if r["lr"] is None else format(r["lr"], "g")
        lines.append(
            f"| {r['model']} | {r['scale'] or ''} | {beta} | {lr} | {r['clean']:.2f} "
            f"| {fmt(r.get('clean_change'))} | {r['fgsm']:.2f} | {fmt(r.get('fgsm_change'))} "
            f"| {r['pgd20']:.1f} | {fmt(r.get('pgd20_change'))} |"
        )
    (out / "recipe.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "recipe.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
