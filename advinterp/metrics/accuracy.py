"""Top-1/top-5 accuracy, clean and under FGSM: the paper's Table 2."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advinterp.data import batches
from advinterp.device import model_device
from advinterp.progress import progress as tqdm


def _correct_topk(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int]) -> list[int]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == y.to(top.device)[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


def accuracy(
    model,
    dataset,
    batch_size: int = 500,
    ks: Sequence[int] = (1, 5),
    progress: bool = False,
    workers: int = 0,
) -> dict[str, float]:
    """Clean top-k accuracy in % over ``dataset``: ``{"top1": …, "top5": …}``; an image
    folder is decoded by ``workers`` processes."""
    ks = [k for k in ks if k <= model.num_classes]
    model.eval()
    hits, n = [0] * len(ks), 0
    pin = model_device(model).type == "cuda"
    with torch.inference_mode():
        for x, y, _ in tqdm(
            batches(dataset, batch_size, workers=workers, pin_memory=pin),
            total=-(-len(dataset) // batch_size),
            desc="accuracy",
            disable=not progress,
            leave=False,
        ):
            hits = [a + b for a, b in zip(hits, _correct_topk(model(x), y, ks), strict=True)]
            n += len(y)
    return {f"top{k}": 100.0 * h / max(n, 1) for k, h in zip(ks, hits, strict=True)}


def table2(
    model,
    dataset,
    eps: Sequence[float] = (4 / 255,),
    batch_size: int = 250,
    progress: bool = False,
    workers: int = 0,
) -> dict:
    """The paper's Table 2 row: clean and FGSM (untargeted, true labels) top-1/top-5 in %.

    ``eps`` are fractions of the pixel range; ``fgsm_top1``/``fgsm_top5`` are at
    ``eps[0]`` (the paper's 4/255) and ``fgsm`` holds every ε, keyed in 0–255 units.
    Each batch moves once to the model's device, where its FGSM copies are made; an
    image folder is decoded by ``workers`` processes.
    """
    from advinterp.attacks.fgsm import FGSM, fgsm_step

    attacks = [FGSM(model, eps=e) for e in eps]
    ks = [k for k in (1, 5) if k <= model.num_classes]
    clean = [0] * len(ks)
    adv = [[0] * len(ks) for _ in eps]
    n = 0
    bar = tqdm(total=len(dataset), desc="table 2", unit="img", disable=not progress)
    model.eval()
    device = model_device(model)
    for x, y, _ in batches(dataset, batch_size, workers=workers, pin_memory=device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.inference_mode():
            clean = [a + b for a, b in zip(clean, _correct_topk(model(x), y, ks), strict=True)]
        # ∇ₓL is the same for every ε: one backward pass serves them all (eq. 1).
        grad = attacks[0].loss_grad(x, y, None)
        with torch.inference_mode():
            for j, attack in enumerate(attacks):
                x_adv = fgsm_step(x, grad, attack.eps)
                adv[j] = [
                    a + b for a, b in zip(adv[j], _correct_topk(model(x_adv), y, ks), strict=True)
                ]
        n += len(y)
        bar.update(len(y))
    bar.close()
    pct = [[100.0 * h / max(n, 1) for h in row] for row in [clean, *adv]]
    row = {f"clean_top{k}": pct[0][i] for i, k in enumerate(ks)}
    row.update({f"fgsm_top{k}": pct[1][i] for i, k in enumerate(ks)})
    row["fgsm"] = {
        f"{e * 255:g}": {f"top{k}": pct[j + 1][i] for i, k in enumerate(ks)}
        for j, e in enumerate(eps)
    }
    row["n"] = n
    return row


def format_table2(rows: dict[str, dict]) -> str:
    """A printed Table 2: one line per model, clean and FGSM top-1/top-5 at every ε."""
    eps_keys = list(next(iter(rows.values()))["fgsm"])
    head = f"{'model':<16} {'clean top-1':>11} {'top-5':>6}"
    for e in eps_keys:
        head += f" {'FGSM ε=' + e + ' top-1':>16} {'top-5':>6}"
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        line = f"{name:<16} {row['clean_top1']:>11.2f} {row.get('clean_top5', float('nan')):>6.2f}"
        for e in eps_keys:
            r = row["fgsm"][e]
            line += f" {r['top1']:>16.2f} {r.get('top5', float('nan')):>6.2f}"
        lines.append(line)
    return "\n".join(lines)
