"""Adversarial sets on disk: exact float images with labels, targets and predictions.

A set is a folder: ``shards/NNNNN.safetensors`` (one per chunk, written
atomically, so a killed run resumes at the first missing chunk) and
``attack.json`` (method, settings and stats), written last.

:class:`AdversarialSet` is the one reader of that format: it keeps the small
per-image tensors (labels, targets, predictions, indices, distances) in memory
and streams the images from the shards a batch at a time, so reading a set
needs the memory of one batch however many images it holds.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from advinterp.errors import UserError
from advinterp.io import read_json

KEYS = ("images", "labels", "targets", "clean_preds", "preds", "indices", "l2", "linf")
# Everything but the images: a few numbers an image, read whole when a set is opened.
SMALL_KEYS = KEYS[1:]
_CLASS_KEYS = ("labels", "targets", "clean_preds", "preds", "indices")
# A chunk (one shard) holds about this many bytes of float images: the attack keeps a
# chunk and its adversarial copy in memory, whatever the size of the set.
CHUNK_BYTES = 1 << 28


def default_chunk(image_shape: Sequence[int]) -> int:
    """Images per chunk for images of ``image_shape`` (C×H×W): about :data:`CHUNK_BYTES`
    of float32, and between 100 and 2,000 (2,000 for 28×28 images, 445 at 3×224×224)."""
    return max(100, min(2000, CHUNK_BYTES // (4 * math.prod(image_shape))))


class AdversarialSet:
    """An adversarial set written by ``advinterp attack``, read lazily from its shards.

    The small per-image tensors are attributes: ``labels``, ``targets`` (−1 when
    untargeted), ``clean_preds``, ``preds``, ``indices`` into the source dataset
    (all int64), ``l2`` and ``linf`` (float); ``meta`` is ``attack.json``. The
    images (float, [0, 1]) stay on disk: :meth:`batches` yields them in position
    order and :meth:`images_at` reads chosen positions. Each read opens its shard
    (memory-mapped) only for as long as it copies the rows it needs, so the pages
    of a set never pile up in memory.

    Raises :class:`UserError` when the folder is incomplete or a shard is not an
    adversarial-set shard. ``meta`` given stands in for ``attack.json`` (while the
    set is being written).

    Example::

        adv = AdversarialSet("runs/resnet-opt")
        for images, positions in adv.batches(256):
            logits = model(images)            # compare with adv.targets[positions]
    """

    def __init__(self, path: str | os.PathLike, meta: dict | None = None):
        self.path = Path(path)
        self.meta = dict(read_json(self.path / "attack.json") if meta is None else meta)
        self._shards = sorted((self.path / "shards").glob("*.safetensors"))
        if len(self._shards) != self.meta.get("shards"):
            raise UserError(
                f"{self.path} is incomplete ({len(self._shards)} of {self.meta.get('shards')} "
                "shards): rerun the attack with --resume"
            )
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in SMALL_KEYS}
        sizes, shapes = [], set()
        for shard in self._shards:
            with _open_shard(shard) as f:
                missing = [k for k in KEYS if k not in f.keys()]
                if missing:
                    raise UserError(
                        f"{shard} lacks {', '.join(missing)}; it is not an adversarial-set shard "
                        "of this version: rerun advinterp attack"
                    )
                for k in SMALL_KEYS:
                    parts[k].append(f.get_tensor(k))
                shape = f.get_slice("images").get_shape()
            sizes.append(shape[0])
            shapes.add(tuple(shape[1:]))
            if any(len(p[-1]) != shape[0] for p in parts.values()):
                raise UserError(
                    f"{shard} holds {shape[0]} images but not as many labels: the shard is "
                    "corrupt; rerun advinterp attack"
                )
        if len(shapes) > 1:
            raise UserError(
                f"{self.path} mixes images of shapes {sorted(shapes)}: its shards come from "
                "different runs; remove the folder and rerun advinterp attack"
            )
        self.image_shape: tuple[int, ...] = shapes.pop() if shapes else ()
        self._starts = [0, *itertools.accumulate(sizes)]
        self._memory: torch.Tensor | None = None
        self._set_small({k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict) -> AdversarialSet:
        """A set held in memory: ``tensors`` has every key of :data:`KEYS` (``l2`` and
        ``linf`` may be left out), one row per image. For sets built in a notebook or a test;
        sets on disk are opened with ``AdversarialSet(path)``."""
        missing = [k for k in KEYS if k not in tensors and k not in ("l2", "linf")]
        if missing:
            raise UserError(f"an adversarial set needs {', '.join(missing)}")
        self = cls.__new__(cls)
        images = tensors["images"]
        self.path = None
        self.meta = dict(meta)
        self._shards = []
        self._starts = [0, len(images)]
        self._memory = images
        self.image_shape = tuple(images.shape[1:])
        nan = torch.full((len(images),), math.nan)
        self._set_small({k: tensors.get(k, nan) for k in SMALL_KEYS})
        return self

    def _set_small(self, small: Mapping[str, torch.Tensor]) -> None:
        for k in SMALL_KEYS:
            value = small[k].to(torch.int64) if k in _CLASS_KEYS else small[k]
            if len(value) != self._starts[-1]:
                raise UserError(
                    f"the adversarial set has {self._starts[-1]} images but {len(value)} {k}"
                )
            setattr(self, k, value)

    def __len__(self) -> int:
        return self._starts[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The small per-image tensors by name (every key of :data:`KEYS` but ``images``)."""
        return {k: getattr(self, k) for k in SMALL_KEYS}

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, positions)`` batches in position order, ``batch_size`` images each (the
        last may be smaller); a batch may span two shards."""
        if batch_size < 1:
            raise UserError(f"the batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self.rows(start, stop), torch.arange(start, stop)

    def images_at(self, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The images at ``positions`` (any order, repeats allowed), stacked ``N×C×H×W``."""
        pos = torch.as_tensor(positions, dtype=torch.int64).flatten().cpu()
        if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= len(self)):
            bad = int(pos.min()) if int(pos.min()) < 0 else int(pos.max())
            raise UserError(f"position {bad} is outside the adversarial set (0..{len(self) - 1})")
        if self._memory is not None:
            return self._memory[pos]
        out = torch.empty(len(pos), *self.image_shape)
        shard_of = torch.bucketize(pos, torch.tensor(self._starts[1:]), right=True)
        for s in shard_of.unique().tolist():
            rows = (shard_of == s).nonzero()[:, 0].tolist()
            with _open_shard(self._shards[s]) as f:
                images = f.get_slice("images")
                for r in rows:
                    local = int(pos[r]) - self._starts[s]
                    out[r] = images[local : local + 1][0]
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start`` to ``stop`` (exclusive), read from the shards that hold them."""
        if self._memory is not None:
            return self._memory[start:stop]
        parts = []
        s = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            end = min(stop, self._starts[s + 1])
            with _open_shard(self._shards[s]) as f:
                parts.append(f.get_slice("images")[start - self._starts[s] : end - self._starts[s]])
            start, s = end, s + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _open_shard(path: Path):
    """``safe_open`` on a shard, a corrupt file being a :class:`UserError`."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError …
        raise UserError(
            f"cannot read {path} ({type(e).__name__}: {e}); the shard is corrupt: remove it and "
            "rerun the attack with --resume"
        ) from None


def load_adversarial_set(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a set written by ``advinterp attack`` whole: ``(tensors, attack.json contents)``.

    ``tensors`` holds ``images`` (float, [0,1]), ``labels``, ``targets`` (−1 when
    untargeted), ``clean_preds``, ``preds`` and ``indices`` into the source dataset.
    Every image is in memory at once: meant for small sets and tests; the analysis
    streams sets through :class:`AdversarialSet`.
    """
    adv = AdversarialSet(path)
    return {"images": adv.rows(0, len(adv)), **adv.tensors()}, adv.meta


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
    chunk: int | None = None,
    resume: bool = False,
    model_spec: str | None = None,
    progress: bool = True,
    workers: int = 0,
    **kwargs,
) -> dict:
    """Attack every image of ``dataset`` and write the set to ``out`` (see module doc).

    The images are read ``chunk`` at a time (default :func:`default_chunk` of the
    model's input: 2,000 images at 28×28, 445 at 3×224×224), an image folder
    decoded by ``workers`` processes; each chunk is attacked in batches of
    ``batch_size`` on the model's device and written as one shard, so memory
    does not grow with the number of images. Chunk ``i`` is attacked with seed
    ``seed + i``, so a resumed run gives the same set as an uninterrupted one, and only
    the chunks without a shard are read again. Under ``torchrun``
    (``torch.distributed`` initialised, N processes) process ``r`` reads and attacks
    the chunks ``i`` with ``i % N == r``: the same shards as one process, N at a time;
    process 0 writes ``settings.json`` and ``attack.json`` and shows the progress bar.
    Returns the contents of ``attack.json``.
    """
    from advinterp.attacks import make_attack
    from advinterp.device import model_device
    from advinterp.io import save_tensors, write_json
    from advinterp.progress import progress as tqdm

    out = Path(out)
    if chunk is None:
        size = getattr(model, "input_size", None)
        chunk = default_chunk((getattr(model, "in_chans", 3), size, size)) if size else 2000
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
    from advinterp.distributed import current_world

    world = current_world()
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

    def size(i: int) -> int:
        return min(chunk, len(dataset) - i * chunk)

    todo = [i for i in mine if not (shard_dir / f"{i:05d}.safetensors").exists()]
    bar = tqdm(
        total=sum(size(i) for i in mine),
        initial=sum(size(i) for i in mine if i not in todo),
        desc=f"attack {method}",
        unit="img",
        disable=not (progress and world.is_main),
    )
    # Only this process's unfinished chunks are read (decoded, for an image folder).
    on_cuda = model_device(model).type == "cuda"
    chunks = _read_chunks(dataset, todo, chunk, workers, on_cuda)
    for i, (x, y, idx) in zip(todo, chunks, strict=True):
        path = shard_dir / f"{i:05d}.safetensors"
        if not len(y):
            raise UserError(
                f"images {i * chunk}–{i * chunk + size(i) - 1} of {getattr(dataset, 'name', '')} "
                "could not be decoded, not one of them: check the folder"
            )
        attack = make_attack(method, model, eps=eps, targeted=targeted, seed=seed + i, **kwargs)
        # The model's outputs come back to the CPU, where the chunk and its shard live.
        with torch.inference_mode():
            clean_logits = torch.cat([model(b).float().cpu() for b in x.split(batch_size)])
        tgt = torch.full_like(y, -1)
        if targeted:
            tgt = choose_targets(target, clean_logits, y, torch.Generator().manual_seed(seed + i))
        x_adv = attack.run(
            x, y, target=tgt if targeted else None, batch_size=batch_size, progress=False
        )
        with torch.inference_mode():
            preds = torch.cat([model(b).argmax(1).cpu() for b in x_adv.split(batch_size)])
        clean = clean_logits.argmax(1)
        l2, linf = _distances(x_adv, x, batch_size)
        save_tensors(
            path,
            {
                "images": x_adv,
                "labels": y,
                "targets": tgt,
                "clean_preds": clean,
                "preds": preds,
                "indices": idx,
                "l2": l2,
                "linf": linf,
            },
        )
        bar.update(size(i))
        # Freed before the next chunk is read: never two chunks in memory at once.
        del x, x_adv
    bar.close()
    world.barrier()  # all shards written
    n_written = len(list(shard_dir.glob("*.safetensors")))
    meta = {**settings, "shards": n_written}
    if n_written != n_chunks:
        raise UserError(
            f"{out}: expected {n_chunks} shards, found {n_written}; remove the folder and rerun"
        )
    # Stats from the shards' small tensors: the images themselves are never reloaded.
    meta["stats"] = set_stats(AdversarialSet(out, meta=meta).tensors())
    if world.is_main:
        write_json(out / "attack.json", meta)
    world.barrier()  # no process returns before the set is complete
    return meta


def _read_chunks(
    dataset, numbers: list[int], chunk: int, workers: int, pin_memory: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images, labels, indices)`` of chunks ``numbers`` (chunk ``i``: items ``i·chunk …``):
    an in-memory set sliced, an image folder decoded by ``workers`` processes, its
    undecodable images left out (a warning counts them at the end, as
    :func:`advinterp.data.batches`)."""
    from advinterp.data import TensorImageSet, decoded_batches

    n = len(dataset)
    if isinstance(dataset, TensorImageSet):
        for i in numbers:
            rows = slice(i * chunk, min(n, (i + 1) * chunk))
            yield (
                dataset.images[rows].float().div_(255),
                dataset.labels[rows],
                torch.arange(n)[rows],
            )
        return
    index = [list(range(i * chunk, min(n, (i + 1) * chunk))) for i in numbers]
    skipped = 0
    for x, y, idx, bad in decoded_batches(dataset, index, workers, pin_memory):
        skipped += bad
        yield x, y, idx
    if skipped:
        dataset.skipped = skipped
        warnings.warn(f"skipped {skipped} image(s) that could not be decoded", stacklevel=2)


def _distances(
    x_adv: torch.Tensor, x: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the L2 and L∞ distance, batch by batch: no third chunk-sized tensor."""
    l2, linf = [], []
    for a, b in zip(x_adv.split(batch_size), x.split(batch_size), strict=True):
        delta = (a - b).flatten(1)
        l2.append(delta.norm(dim=1))
        linf.append(delta.abs().amax(dim=1))
    return torch.cat(l2), torch.cat(linf)


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


def set_stats(tensors: dict[str, torch.Tensor]) -> dict:
    """Success rate, mean L2 / L∞ distance, and the clean and adversarial accuracy."""
    from advinterp.attacks.base import attack_succeeded

    success = attack_succeeded(tensors["preds"], tensors["labels"], tensors["targets"])
    return {
        "attacked": len(success),
        "success_rate": float(success.float().mean()),
        "mean_l2": float(tensors["l2"].mean()),
        "mean_linf": float(tensors["linf"].mean()),
        "clean_top1": 100 * float((tensors["clean_preds"] == tensors["labels"]).float().mean()),
        "adversarial_top1": 100 * float((tensors["preds"] == tensors["labels"]).float().mean()),
    }
