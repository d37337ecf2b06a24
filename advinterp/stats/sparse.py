"""The few elements of a tensor above a level, found fast on CPUs.

On a CPU, numpy's comparison and ``flatnonzero`` are several times faster than
torch's (vectorised, one pass); elsewhere torch's own run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["above", "sparse_nonzero"]


def above(
    values: torch.Tensor, limits: torch.Tensor, order: Sequence[int] | None = None
) -> torch.Tensor:
    """Flat indices (int64, ascending) of the elements of ``values`` greater than ``limits``
    (broadcast against it), counted in the layout ``values.permute(order)`` when ``order``
    is given."""
    if values.device.type == "cpu":
        mask = np.greater(values.numpy(), limits.numpy())
        if order is not None:
            mask = mask.transpose(order)
        return torch.from_numpy(np.flatnonzero(mask))
    mask = values > limits
    if order is not None:
        mask = mask.permute(*order)
    return mask.reshape(-1).nonzero().squeeze(1)


def sparse_nonzero(mask: torch.Tensor, share: float | None = None) -> torch.Tensor | None:
    """Flat indices of the True elements of a contiguous boolean tensor, ascending; or
    ``None`` when more than ``share`` of its 8-element words hold one (then it is not
    sparse, and ``nonzero`` is as fast).

    ``nonzero`` reads every element twice; reading the tensor as int64 words first and
    only the few nonzero words bit by bit is several times faster on a sparse mask."""
    flat = mask.reshape(-1)
    bulk = flat.numel() // 8 * 8
    words = flat[:bulk].view(torch.int64).nonzero().squeeze(1)
    if share is not None and words.numel() > share * max(1, bulk // 8):
        return None
    word, bit = flat[:bulk].view(-1, 8)[words].nonzero(as_tuple=True)
    tail = flat[bulk:].nonzero().squeeze(1) + bulk
    return torch.cat([words[word] * 8 + bit, tail])
