"""Streaming per-unit top-k: the k strongest responses of every unit, with image indices.

In the style of davidbau/dissect's ``runningstats``: ``add`` a batch,
``result`` at the end, ``state_dict``/``set_state_dict`` to checkpoint and
resume, ``merge`` to combine shards (one per ``torchrun`` rank). Memory is
``units × k`` whatever the dataset size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from advinterp.errors import UserError
from advinterp.progress import progress as tqdm

__all__ = ["TopK", "k_for_fraction", "top_responses"]


def k_for_fraction(num_images: int, fraction: float = 0.01) -> int:
    """How many images the top ``fraction`` of ``num_images`` is (at least 1): the paper's
    top 1% of a dataset for LC/CS (§4.2)."""
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(num_images * fraction - 1e-9))


class TopK:
    """The ``k`` largest values of each of ``num_units`` units over a stream, with indices.

    ``add(values, indices)`` takes an ``N×U`` batch (row ``i`` is image
    ``indices[i]``); ``result()`` gives ``U×k`` values sorted descending and the
    matching image indices. Until ``k`` images have been seen the tail holds
    ``-inf`` with index ``-1``. Equal values are ranked by image index, smaller
    first, so the store depends only on the images seen: not on their order, on
    how they were cut into batches, or on how shards were merged (a pass split
    over ``torchrun`` ranks gives the one-process store bit for bit). Stored as
    float32 on the device of the first batch; indices must lie below 2³².

    Example::

        top = TopK(k=8, num_units=64)
        for x, _, idx in batches(dataset, 500):
            top.add(recorder(x)["layer3.0.conv2"], idx)
        values, images = top.result()        # 64×8 each
    """

    def __init__(self, k: int, num_units: int):
        if k < 1 or num_units < 1:
            raise UserError(
                f"top-k needs k ≥ 1 and at least one unit (got k={k}, units={num_units})"
            )
        self.k = int(k)
        self.num_units = int(num_units)
        self.count = 0
        self.values = torch.full((self.num_units, self.k), -math.inf)
        self.indices = torch.full((self.num_units, self.k), -1, dtype=torch.int64)
        self._placed = False

    def add(self, values: torch.Tensor, indices: torch.Tensor | Sequence[int]) -> None:
        """Fold in a batch: ``values`` is ``N×U`` (one row per image), ``indices`` its ``N`` image ids."""
        if values.dim() != 2 or values.shape[1] != self.num_units:
            raise ValueError(f"expected N×{self.num_units} values, got {tuple(values.shape)}")
        if not self._placed:
            self.to(values.device)
        indices = torch.as_tensor(indices, dtype=torch.int64, device=self.values.device)
        if indices.shape != (values.shape[0],):
            raise ValueError(f"expected {values.shape[0]} indices, got {tuple(indices.shape)}")
        if values.shape[0] == 0:
            return
        batch = values.detach().to(self.values.device, torch.float32).t()  # U×N
        self._keep(
            torch.cat([self.values, batch], dim=1),
            torch.cat([self.indices, indices.expand(self.num_units, -1)], dim=1),
        )
        self.count += values.shape[0]

    def _keep(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        top = _rank_keys(values, indices).topk(self.k, dim=1, sorted=True).indices
        self.values = values.gather(1, top)
        self.indices = indices.gather(1, top)

    def merge(self, other: TopK) -> None:
        """Fold in another store over other images (a shard): same result as one pass over both."""
        if (other.k, other.num_units) != (self.k, self.num_units):
            raise ValueError(
                f"cannot merge top-{other.k} of {other.num_units} units into "
                f"top-{self.k} of {self.num_units}"
            )
        self._keep(
            torch.cat([self.values, other.values.to(self.values.device)], dim=1),
            torch.cat([self.indices, other.indices.to(self.values.device)], dim=1),
        )
        self.count += other.count

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values U×k, indices U×k)``, each row sorted by value, largest first."""
        return self.values, self.indices

    def to(self, device) -> TopK:
        self.values = self.values.to(device)
        self.indices = self.indices.to(device)
        self._placed = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so ``advinterp.io.save_tensors`` can write it."""
        return {
            "values": self.values,
            "indices": self.indices,
            "count": torch.tensor(self.count, dtype=torch.int64),
        }

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            values, indices, count = state["values"], state["indices"], state["count"]
        except KeyError as e:
            raise UserError(f"top-k state lacks {e}; the checkpoint is not a top-k store") from None
        if tuple(values.shape) != (self.num_units, self.k) or values.shape != indices.shape:
            raise UserError(
                f"top-k state holds {tuple(values.shape)} values, expected "
                f"{(self.num_units, self.k)}: it was saved for another layer or k"
            )
        self.values = values.to(torch.float32).clone()
        self.indices = indices.to(torch.int64).clone()
        self.count = int(count)
        self._placed = False

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TopK:
        num_units, k = state["values"].shape
        top = cls(k, num_units)
        top.set_state_dict(state)
        return top


def _rank_keys(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One int64 per entry whose order is (value, then smaller index first): the float32's
    bits made order-preserving in the high half, the index's complement in the low half.
    ``torch.topk`` on the values alone breaks ties however its algorithm happens to."""
    bits = values.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negatives: flip the magnitude
    return (ordered << 32) | (~indices & 0xFFFFFFFF)


def top_responses(
    model,
    batches: Iterable,
    k: int,
    layers: str | Sequence[str] = "units",
    reduce: str = "max",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, TopK]:
    """One pass over ``batches``: every unit's top-``k`` responses per recorded layer.

    ``batches`` yields ``(x, …, idx)`` tuples (as :func:`advinterp.data.batches`;
    the first item is the images, the last their indices) or bare image tensors
    (numbered in order). Returns ``{layer: TopK}``.
    """
    from advinterp.record import Recorder

    tops: dict[str, TopK] = {}
    seen = 0
    model.eval()
    with Recorder(model, layers, reduce=reduce) as rec, torch.inference_mode():
        for item in tqdm(batches, total=total, desc="top-k", disable=not progress, leave=False):
            if torch.is_tensor(item):
                x, idx = item, torch.arange(seen, seen + len(item))
            else:
                x, idx = item[0], item[-1]
            seen += len(x)
            for name, resp in rec(x).items():
                if name not in tops:
                    tops[name] = TopK(k, resp.shape[1])
                tops[name].add(resp, idx)
    return tops
