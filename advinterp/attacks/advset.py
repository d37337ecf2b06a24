"""Adversarial sets on disk: exact float images with labels, targets and predictions.

A set is a folder: ``shards/NNNNN.safetensors`` (one per chunk, written
atomically, so a killed run resumes at the first missing chunk) and
``attack.json`` (method, settings and stats), written last.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict

KEYS = ("images", "labels", "targets", "clean_preds", "preds", "indices", "l2", "linf")


def load_adversarial_set(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a set written by ``advinterp attack``: ``(tensors, attack.json contents)``.

    ``tensors`` holds ``images`` (float, [0,1]), ``labels``, ``targets`` (−1 when
    untargeted), ``clean_preds``, ``preds`` and ``indices`` into the source dataset.
    """
    path = Path(path)
    meta = read_json(path / "attack.json")
    shards = sorted((path / "shards").glob("*.safetensors"))
    if len(shards) != meta.get("shards"):
        raise UserError(
            f"{path} is incomplete ({len(shards)} of {meta.get('shards')} shards): rerun the attack with --resume"
        )
    parts = [read_state_dict(s) for s in shards]
    for s, p in zip(shards, parts, strict=True):
        missing = [k for k in KEYS if k not in p]
        if missing:
            raise UserError(
                f"{s} lacks {', '.join(missing)}; it is not an adversarial-set shard of this version: rerun advinterp attack"
            )
    return {k: torch.cat([p[k] for p in parts]) for k in KEYS}, meta


def build_adversarial_set(
    model,
    dataset,
    out: Path,
    method: str = "opt",
    eps: float | None = None,
    targeted: bool = True,
    target: str | int = "least-likely",
    seed: int = 0,
    batch_size: int = 250,
    chunk: int = 2000,
    resume: bool = False,
    model_spec: str | None = None,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Attack every image of ``dataset`` and write the set to ``out`` (see module doc).

    Chunk ``i`` is attacked with seed ``seed + i``, so a resumed run gives the
    same set as an uninterrupted one. Under ``torchrun`` (``torch.distributed``
    initialised, N processes) process ``r`` attacks the chunks ``i`` with
    ``i % N == r``: the same shards as one process, N at a time; process 0
    writes ``settings.json`` and ``attack.json`` and shows the progress bar.
    Returns the contents of ``attack.json``.
    """
    from tqdm.auto import tqdm

    from advinterp.attacks import make_attack
    from advinterp.data import batches
    from advinterp.io import save_tensors, write_json

    out = Path(out)
    settings = {
        "method": method,
        "eps": eps,
        "targeted": targeted,
        "target": target,
        "seed": seed,
        "model": model_spec,
        "dataset": getattr(dataset, "name", None),
        "n": len(dataset),
        "chunk": chunk,
        **kwargs,
    }
    shard_dir = out / "shards"
    world = _current_world()
    if (out / "attack.json").exists() or shard_dir.exists():
        if not resume:
            raise UserError(
                f"{out} already holds an adversarial set: pass --resume or choose another --out"
            )
        started = out / "settings.json"
        if started.exists() and read_json(started) != settings:
            raise UserError(f"{out} was started with other settings; resume with the same options")
    # Every process has checked the folder before any of them writes to it.
    world.barrier()
    if world.is_main:
        write_json(out / "settings.json", settings)
    n_chunks = -(-len(dataset) // chunk)
    mine = [i for i in range(n_chunks) if i % world.size == world.rank]
    total = sum(min(chunk, len(dataset) - i * chunk) for i in mine)
    bar = tqdm(
        total=total, desc=f"attack {method}", unit="img", disable=not (progress and world.is_main)
    )
    # Image folders are decoded by every process (the chunks' boundaries must agree); in-memory
    # sets are only sliced.
    for i, (x, y, idx) in enumerate(batches(dataset, chunk)):
        if i % world.size != world.rank:
            continue
        path = shard_dir / f"{i:05d}.safetensors"
        if path.exists():
            bar.update(len(y))
            continue
        attack = make_attack(method, model, eps=eps, targeted=targeted, seed=seed + i, **kwargs)
        with torch.inference_mode():
            clean_logits = torch.cat([model(b) for b in x.split(batch_size)])
        tgt = torch.full_like(y, -1)
        if targeted:
            tgt = choose_targets(target, clean_logits, y, torch.Generator().manual_seed(seed + i))
        x_adv = attack.run(
            x, y, target=tgt if targeted else None, batch_size=batch_size, progress=False
        )
        with torch.inference_mode():
            preds = torch.cat([model(b).argmax(1) for b in x_adv.split(batch_size)])
        clean = clean_logits.argmax(1)
        delta = (x_adv - x).flatten(1)
        save_tensors(
            path,
            {
                "images": x_adv,
                "labels": y,
                "targets": tgt,
                "clean_preds": clean,
                "preds": preds,
                "indices": idx,
                "l2": delta.norm(dim=1),
                "linf": delta.abs().amax(dim=1),
            },
        )
        bar.update(len(y))
    bar.close()
    world.barrier()  # all shards written
    n_written = len(list(shard_dir.glob("*.safetensors")))
    meta = {**settings, "shards": n_written}
    if n_written != n_chunks:
        raise UserError(
            f"{out}: expected {n_chunks} shards, found {n_written}; remove the folder and rerun"
        )
    # Stats from the shards' small tensors: the images themselves are never reloaded.
    small = [k for k in KEYS if k != "images"]
    meta["stats"] = set_stats(
        {
            k: torch.cat([_read(p, k) for p in sorted(shard_dir.glob("*.safetensors"))])
            for k in small
        }
    )
    if world.is_main:
        write_json(out / "attack.json", meta)
    world.barrier()  # no process returns before the set is complete
    return meta


def _current_world():
    """The :class:`~advinterp.distributed.World` of an initialised process group, else one process."""
    import torch.distributed as dist

    from advinterp.distributed import World

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    cuda = dist.get_backend() == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def choose_targets(
    target: str | int, clean_logits: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Target classes: ``least-likely`` of the clean prediction, ``random`` (≠ label), or one class."""
    from advinterp.attacks.base import least_likely_targets, random_targets

    if isinstance(target, int):
        return torch.full_like(labels, target)
    if target == "least-likely":
        return least_likely_targets(clean_logits)
    if target == "random":
        return random_targets(labels, clean_logits.shape[1], gen)
    raise UserError(f"unknown target {target!r}: use least-likely, random or a class index")


def _read(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def set_stats(tensors: dict[str, torch.Tensor]) -> dict:
    """Success rate, mean L2 / L∞ distance, and the clean and adversarial accuracy."""
    targeted = bool((tensors["targets"] >= 0).all())
    if targeted:
        success = tensors["preds"] == tensors["targets"]
    else:
        success = tensors["preds"] != tensors["labels"]
    return {
        "success_rate": float(success.float().mean()),
        "mean_l2": float(tensors["l2"].mean()),
        "mean_linf": float(tensors["linf"].mean()),
        "clean_top1": 100 * float((tensors["clean_preds"] == tensors["labels"]).float().mean()),
        "adversarial_top1": 100 * float((tensors["preds"] == tensors["labels"]).float().mean()),
    }
