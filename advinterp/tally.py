"""One pass over numbered batches feeding many statistics: on one process or many, resumable.

What every analysis pass shares, whatever it accumulates (davidbau/dissect's
``tally``): the ``n`` images are cut into batches of ``B`` (batch ``i`` is
images ``i·B … (i+1)·B − 1``, the last one shorter), and the batches into chunks
of consecutive batches. :class:`Tally` walks the chunks:

- **Processes.** Under ``torchrun --nproc-per-node N`` process ``r`` takes the
  ``r``-th of N runs of consecutive batches of each chunk (their lengths differ by
  at most one): the batches of one process, so every image meets the model in the
  same batch and gives the same numbers.
- **Merging.** At the end of each chunk every process's new statistics (their
  ``state_dict``, on the CPU) are gathered, and every process merges them, in
  rank order, into the statistics of the chunks before: the images come in the
  order one process reads them, so statistics kept image by image stay in it.
  Exact statistics (top-k stores, counts) come out bit for bit as from one
  process; a quantile sketch within its rank error.
- **Resuming.** Given a ``partial`` file, process 0 rewrites it after each chunk
  (atomically): the merged statistics' state dicts, the chunks and images done,
  and the pass's ``fingerprint`` (its settings, the model's weights). The same
  pass run again, on any number of processes, starts after the last finished
  chunk (a finished pass only reads the file); a pass with other settings
  starts over and replaces it. The caller removes the file once the outputs
  are written: a pass killed while writing them is not run again.

A statistic is any object with ``merge(other)``, ``state_dict()`` and
``set_state_dict(state)`` (:class:`~advinterp.stats.TopK`,
:class:`~advinterp.stats.Quantile`, :class:`~advinterp.stats.counts.Counts`,
:class:`~advinterp.stats.IoUCounts` totals); ``make()`` returns a fresh, empty
set of them by name, the same on every process.

Example::

    def make():
        return {"hits": Counts(2)}

    tally = Tally(make, len(data), 250, world=world, partial=out / "evaluate.partial")
    for numbers in tally.chunks():
        fresh = make()
        for x, y, _ in numbered_batches(data, 250, numbers):
            fresh["hits"].add(hits_of(model(x), y), len(y))
        tally.commit(fresh)
    hits = tally.stats["hits"]              # every process's images, on every process
    if world.is_main:                        # process 0 writes the outputs, then
        ...
        (out / "evaluate.partial").unlink()
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from advinterp.distributed import World
from advinterp.io import atomic_replace

__all__ = ["CHUNK_IMAGES", "Tally", "numbered_batches", "weights_fingerprint"]

#: Images between two merges and checkpoints, by default: a killed pass loses at most
#: this much work, and each chunk costs one gather of the statistics and one file write.
CHUNK_IMAGES = 4096
_FORMAT = "advinterp-tally-1"


class Tally:
    """Chunks of numbered batches for this process, and the statistics merged after each.

    Args:
        make: returns the pass's statistics, empty, by name.
        n_images: images in the pass; ``batch_size`` per batch.
        chunk: images per chunk (rounded up to whole batches; default :data:`CHUNK_IMAGES`).
        world: the processes (default one).
        partial: the file to checkpoint into and resume from (none: no checkpoints).
        fingerprint: JSON-able settings that make one pass's statistics another's; the
            batch size, image count and chunk size are added.
        progress: process 0 says on stderr when it resumes (``desc`` names the pass).

    ``stats`` holds the merged statistics of the finished chunks (all of them once
    :meth:`chunks` is exhausted), the same on every process; ``resumed_images`` the
    images a resumed pass found done.
    """

    def __init__(
        self,
        make: Callable[[], dict[str, object]],
        n_images: int,
        batch_size: int,
        *,
        chunk: int | None = None,
        world: World | None = None,
        partial: str | Path | None = None,
        fingerprint: Mapping | None = None,
        progress: bool = False,
        desc: str = "pass",
    ):
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        self.make = make
        self.n_images = int(n_images)
        self.batch_size = int(batch_size)
        self.n_batches = math.ceil(self.n_images / self.batch_size)
        self.chunk_batches = max(1, math.ceil((chunk or CHUNK_IMAGES) / self.batch_size))
        self.n_chunks = math.ceil(self.n_batches / self.chunk_batches)
        self.world = world or World()
        self.partial = Path(partial) if partial is not None else None
        self.fingerprint = json.dumps(
            {
                **dict(fingerprint or {}),
                "n_images": self.n_images,
                "batch_size": self.batch_size,
                "chunk_batches": self.chunk_batches,
            },
            sort_keys=True,
            default=str,
        )
        self.stats = make()
        self.chunks_done = self._resume()
        self.resumed_images = self.images_done
        if progress and self.world.is_main and self.resumed_images:
            print(
                f"{desc}: resuming after {self.resumed_images} of {self.n_images} images "
                f"({self.partial})",
                file=sys.stderr,
                flush=True,
            )

    @property
    def images_done(self) -> int:
        """Images in the finished chunks (every process's)."""
        return min(self.chunks_done * self.chunk_batches * self.batch_size, self.n_images)

    def span(self, i: int) -> tuple[int, int]:
        """Images ``start:stop`` of batch ``i``."""
        start = i * self.batch_size
        return start, min(start + self.batch_size, self.n_images)

    def _mine(self, c: int) -> list[int]:
        first = c * self.chunk_batches
        last = min(first + self.chunk_batches, self.n_batches)
        share = self.world.shard(last - first)
        return list(range(first + share.start, first + share.stop))

    def remaining(self) -> int:
        """Batches this process has left to run (a progress bar's total)."""
        return sum(len(self._mine(c)) for c in range(self.chunks_done, self.n_chunks))

    def chunks(self) -> Iterator[list[int]]:
        """This process's batch numbers in each unfinished chunk, in order (a list may be
        empty: :meth:`commit` must still follow, as every process takes part in it)."""
        for c in range(self.chunks_done, self.n_chunks):
            yield self._mine(c)

    def commit(self, fresh: Mapping[str, object]) -> None:
        """End a chunk: merge every process's ``fresh`` statistics (its images of the chunk)
        into :attr:`stats`, and process 0 checkpoints them."""
        if self.world.size == 1:
            for name, stat in fresh.items():
                self.stats[name].merge(stat)
        else:
            states = {name: _on_cpu(stat.state_dict()) for name, stat in fresh.items()}
            for rank_states in self.world.all_gather(states):
                others = self.make()
                for name, state in rank_states.items():
                    others[name].set_state_dict(state)
                    self.stats[name].merge(others[name])
        self.chunks_done += 1
        if self.partial is not None and self.world.is_main:
            self._save()

    def _save(self) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"{name}/{key}": t.detach().cpu().contiguous()
            for name, stat in self.stats.items()
            for key, t in stat.state_dict().items()
        }
        metadata = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "chunks_done": str(self.chunks_done),
            "images_done": str(self.images_done),
        }
        atomic_replace(self.partial, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def _resume(self) -> int:
        if self.partial is None:
            return 0
        found = None
        if self.world.is_main and self.partial.is_file():
            found = _read_partial(self.partial, self.fingerprint)
        found = self.world.broadcast(found)
        if found is None:
            return 0
        chunks_done, states = found
        if set(states) != set(self.stats) or not 0 < chunks_done <= self.n_chunks:
            return 0
        for name, stat in self.stats.items():
            stat.set_state_dict(states[name])
        return chunks_done


def _on_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: t.detach().cpu() for key, t in state.items()}


def _read_partial(path: Path, fingerprint: str) -> tuple[int, dict] | None:
    """``(chunks done, {stat: state})`` from a checkpoint of the same pass, else None (a file
    of another pass or version, or unreadable: the pass starts over and replaces it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT or meta.get("fingerprint") != fingerprint:
                return None
            states: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                name, _, field = key.rpartition("/")
                states.setdefault(name, {})[field] = f.get_tensor(key)
            return int(meta["chunks_done"]), states
    except Exception:  # SafetensorError, OSError, a bad number: not a checkpoint to trust
        return None


def numbered_batches(
    dataset,
    batch_size: int,
    numbers: Iterable[int],
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``numbers`` (ascending) of ``dataset``, batch ``i`` being items
    ``i·B … (i+1)·B − 1``: ``(images, labels, indices)`` as :func:`advinterp.data.batches`
    yields them, and only those images read or decoded (an image folder's undecodable
    images are dropped from their batch, as there)."""
    from advinterp.data import TensorImageSet, batches

    numbers = list(numbers)
    n = len(dataset)
    if isinstance(dataset, TensorImageSet):
        for i in numbers:
            start, stop = i * batch_size, min((i + 1) * batch_size, n)
            images = dataset.images[start:stop].float().div_(255)
            yield images, dataset.labels[start:stop], torch.arange(start, stop)
        return
    if not numbers:
        return
    # This process's batches back to back: each is full but the set's last, so batches
    # of ``batch_size`` over them are exactly they.
    rows = [j for i in numbers for j in range(i * batch_size, min((i + 1) * batch_size, n))]
    subset = torch.utils.data.Subset(dataset, rows)
    yield from batches(subset, batch_size, workers=workers, pin_memory=pin_memory)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of ``model``'s weights and buffers: which model a checkpoint was made with."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
