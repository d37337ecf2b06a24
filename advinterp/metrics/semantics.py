"""LC, CS1 and CS2 per unit: the paper's eq. 11–13 (§4.2) and Fig. 10.

For a unit, let its top 1% real images (by response over the whole set) have
class distribution ``p`` (``p[j]`` = share of those images whose true class is
``j``), its top 1% adversarial images have true-class distribution ``q`` and
target-class distribution ``q̃``. With the class similarity matrix ``C`` of
eq. 10 (:func:`advinterp.metrics.wordnet.similarity_matrix`):

- eq. 11: ``LC = ‖p‖²_C = pᵀ C p`` — level and consistency of what the unit
  detects (high: a few related classes).
- eq. 12: ``CS1 = ⟨p, q⟩_C / (‖p‖_C ‖q‖_C) = pᵀCq / (√(pᵀCp) √(qᵀCq))`` — do the
  adversarial images that excite the unit show what the real ones show?
- eq. 13: ``CS2`` likewise with ``q̃`` — do they excite it because the model
  is pushed towards the real images' classes?

Every function works on all units at once (rows of ``U×K`` tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from advinterp.errors import UserError

__all__ = [
    "class_distribution",
    "lc",
    "cs",
    "semantics",
    "unit_semantics",
    "fig10_bins",
]


def class_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per unit, the normalised histogram of the classes of its top images.

    ``labels`` is ``U×k`` (the class of each unit's top-k images); entries < 0
    (a top-k store not yet full, or images left out) are ignored. Returns ``U×K``
    float64 rows summing to 1, or all zeros for a unit with no valid image.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.dim() == 1:
        labels = labels[None]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise UserError(
            f"class index {int(labels.max())} out of range for {num_classes} classes: "
            "the labels do not match the similarity matrix"
        )
    valid = labels >= 0
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels.clamp(min=0), valid.to(torch.float64))
    total = counts.sum(1, keepdim=True)
    return counts / total.clamp(min=1)


def _c_inner(a: torch.Tensor, b: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    # Row-wise aᵀ C b for U×K matrices a, b. Only classes that some row of a or b holds
    # contribute: with ImageNet's 1000 classes and a few top images per unit, the dense
    # U×K×K product would cost ~1 GFLOP per layer for mostly zeros.
    used = ((a != 0).any(0) | (b != 0).any(0)).nonzero().flatten()
    if len(used) < C.shape[0]:
        a, b, C = a[:, used], b[:, used], C[used][:, used]
    return ((a @ C) * b).sum(1)


def _check(C: torch.Tensor, *dists: torch.Tensor) -> torch.Tensor:
    C = torch.as_tensor(C, dtype=torch.float64)
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square K×K matrix, got {tuple(C.shape)}")
    for d in dists:
        if d.shape[-1] != C.shape[0]:
            raise UserError(
                f"class distributions have {d.shape[-1]} classes but C has {C.shape[0]}: "
                "build C from the same class list"
            )
    return C


def lc(p: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``LC = pᵀ C p`` for each row of ``p`` (``U×K``); returns ``U`` values.

    Example::

        lc(torch.tensor([[0.5, 0.5, 0.0]]), C)    # = (1 + C[0, 1]) / 2
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    C = _check(C, p)
    return _c_inner(p, p, C)


def cs(p: torch.Tensor, q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Eq. 12/13: ``⟨p, q⟩_C / (‖p‖_C ‖q‖_C) = pᵀCq / (√(pᵀCp) √(qᵀCq))`` per row.

    ``q`` is the adversarial images' true-class distribution for CS1, their
    target-class distribution for CS2. NaN where ``p`` or ``q`` is all zero.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    C = _check(C, p, q)
    norm = (_c_inner(p, p, C) * _c_inner(q, q, C)).sqrt()
    value = _c_inner(p, q, C) / norm
    return torch.where(norm > 0, value, torch.full_like(value, math.nan))


def semantics(
    p: torch.Tensor, q: torch.Tensor, q_target: torch.Tensor, C: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{"lc", "cs1", "cs2"}`` per unit from the distributions ``p``, ``q``, ``q̃`` (each ``U×K``)."""
    return {"lc": lc(p, C), "cs1": cs(p, q, C), "cs2": cs(p, q_target, C)}


def unit_semantics(
    real_top: torch.Tensor,
    real_labels: torch.Tensor,
    adv_top: torch.Tensor,
    adv_labels: torch.Tensor,
    adv_targets: torch.Tensor,
    C: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """LC, CS1, CS2 per unit from top-k image indices (e.g. ``TopK.result()[1]``).

    ``real_top`` (``U×k``) indexes ``real_labels`` (true class of each real
    image); ``adv_top`` indexes ``adv_labels`` and ``adv_targets`` (true and
    target class of each adversarial image). Index −1 (an unfilled slot) and
    target −1 (an untargeted image) are left out of the distributions.
    Returns ``{"lc", "cs1", "cs2", "p", "q", "q_target"}``.
    """
    num_classes = C.shape[0]

    def gather(top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        top = torch.as_tensor(top, dtype=torch.int64)
        labels = torch.as_tensor(labels, dtype=torch.int64).to(top.device)
        picked = labels[top.clamp(min=0)]
        return torch.where(top >= 0, picked, torch.full_like(picked, -1))

    p = class_distribution(gather(real_top, real_labels), num_classes)
    q = class_distribution(gather(adv_top, adv_labels), num_classes)
    q_target = class_distribution(gather(adv_top, adv_targets), num_classes)
    C = C.to(p.device)
    return {**semantics(p, q, q_target, C), "p": p, "q": q, "q_target": q_target}


def fig10_bins(
    lc: torch.Tensor,
    cs1: torch.Tensor,
    cs2: torch.Tensor,
    bins: int | Sequence[float] = 10,
) -> list[dict]:
    """Fig. 10: mean CS1 and CS2 of the units whose LC falls in each bin.

    ``bins`` is a count of equal-width bins over [0, 1] (LC of a distribution
    lies in (0, 1] since C's entries do), or the bin edges, ascending; the last
    bin includes its right edge. Empty bins are dropped. Each entry is
    ``{"lc": mean LC of its units, "cs1", "cs2", "n_units", "lc_lo", "lc_hi"}``;
    units whose CS is NaN are left out of that mean (``None`` if all are).
    """
    lc_, cs1_, cs2_ = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (lc, cs1, cs2))
    if not lc_.shape == cs1_.shape == cs2_.shape:
        raise ValueError("lc, cs1 and cs2 need one value per unit each")
    if isinstance(bins, int):
        if bins < 1:
            raise UserError(f"need at least one LC bin, got {bins}")
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    else:
        edges = torch.as_tensor(list(bins), dtype=torch.float64)
        if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
            raise UserError("LC bin edges must be at least two increasing numbers")

    def mean(v: torch.Tensor) -> float | None:
        v = v[~v.isnan()]
        return float(v.mean()) if v.numel() else None

    out = []
    last = len(edges) - 2
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        inside = (lc_ >= lo) & ((lc_ <= hi) if b == last else (lc_ < hi))
        n = int(inside.sum())
        if n == 0:
            continue
        out.append(
            {
                "lc": float(lc_[inside].mean()),
                "cs1": mean(cs1_[inside]),
                "cs2": mean(cs2_[inside]),
                "n_units": n,
                "lc_lo": float(lo),
                "lc_hi": float(hi),
            }
        )
    return out
