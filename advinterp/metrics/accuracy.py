"""Top-1/top-5 accuracy, clean and under FGSM: the paper's Table 2.

:func:`table2` is one pass over the images counting hits
(:class:`~advinterp.stats.counts.Counts`) through :class:`~advinterp.tally.Tally`:
under ``torchrun --nproc-per-node N -m advinterp evaluate …`` each process
evaluates its share of the batches and the counts are summed (the same
integers as one process), process 0 prints and writes ``table2.json``; with
``--out`` the counts are checkpointed in ``OUT/table2.partial`` every chunk of
images, so the same command run again after a kill resumes from there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from advinterp.data import batches
from advinterp.device import model_device
from advinterp.distributed import World
from advinterp.progress import progress as tqdm
from advinterp.stats.counts import Counts
from advinterp.tally import Tally, numbered_batches, weights_fingerprint


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
    *,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
) -> dict:
    """The paper's Table 2 row: clean and FGSM (untargeted, true labels) top-1/top-5 in %.

    ``eps`` are fractions of the pixel range; ``fgsm_top1``/``fgsm_top5`` are at
    ``eps[0]`` (the paper's 4/255) and ``fgsm`` holds every ε, keyed in 0–255 units.
    Each batch moves once to the model's device, where its FGSM copies are made; an
    image folder is decoded by ``workers`` processes.

    ``world`` (:func:`advinterp.distributed.joined`): each process evaluates the batches
    of its share of every chunk (:class:`~advinterp.tally.Tally`), and every process returns the row of
    all the images. ``partial``: a file the hit counts are checkpointed into every
    ``chunk`` images; the same call after a kill resumes from it. The caller removes
    it once the row is written.
    """
    from advinterp.attacks.fgsm import FGSM, fgsm_step

    world = world or World()
    attacks = [FGSM(model, eps=e) for e in eps]
    ks = [k for k in (1, 5) if k <= model.num_classes]

    def make() -> dict[str, Counts]:
        # Top-k hits, clean then at each ε: (1 + len(eps)) × len(ks) counters.
        return {"hits": Counts((1 + len(eps)) * len(ks))}

    fingerprint = {
        "pass": "table 2",
        "model": weights_fingerprint(model),
        "dataset": _dataset_fingerprint(dataset),
        "eps": [float(e) for e in eps],
        "ks": ks,
    }
    tally = Tally(
        make,
        len(dataset),
        batch_size,
        chunk=chunk,
        world=world,
        partial=partial,
        fingerprint=fingerprint,
        progress=progress,
        desc="table 2",
    )
    bar = tqdm(
        total=tally.remaining(),
        desc="table 2",
        unit="batch",
        disable=not (progress and world.is_main),
    )
    model.eval()
    device = model_device(model)
    pin = device.type == "cuda"
    for numbers in tally.chunks():
        fresh = make()
        for x, y, _ in numbered_batches(dataset, batch_size, numbers, workers, pin):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.inference_mode():
                hits = _correct_topk(model(x), y, ks)
            # ∇ₓL is the same for every ε: one backward pass serves them all (eq. 1).
            grad = attacks[0].loss_grad(x, y, None)
            with torch.inference_mode():
                for attack in attacks:
                    hits += _correct_topk(model(fgsm_step(x, grad, attack.eps)), y, ks)
            fresh["hits"].add(torch.tensor(hits), len(y))
            bar.update()
        tally.commit(fresh)
    bar.close()
    hits, n = tally.stats["hits"], tally.stats["hits"].count
    pct = (100.0 * hits.counts.double() / max(n, 1)).view(1 + len(eps), len(ks)).tolist()
    row = {f"clean_top{k}": pct[0][i] for i, k in enumerate(ks)}
    row.update({f"fgsm_top{k}": pct[1][i] for i, k in enumerate(ks)})
    row["fgsm"] = {
        f"{e * 255:g}": {f"top{k}": pct[j + 1][i] for i, k in enumerate(ks)}
        for j, e in enumerate(eps)
    }
    row["n"] = n
    return row


def _dataset_fingerprint(dataset) -> str:
    """The set's name, size and labels, hashed: which images a checkpoint counted."""
    h = hashlib.sha256(f"{getattr(dataset, 'name', None)}:{len(dataset)}".encode())
    labels = getattr(dataset, "labels", None)
    samples = getattr(dataset, "samples", None)
    if torch.is_tensor(labels):
        h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    elif samples is not None:
        h.update(repr(list(samples)).encode())
    return h.hexdigest()[:16]


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
