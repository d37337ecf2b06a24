"""Network Dissection (Bau et al. 2017): which units' masks match a semantic concept.

Two passes over a probe with concept masks (a Broden-format dataset):

1. each unit's threshold ``T_u`` = the ``quantile`` (0.995: top 0.5%) of its
   activations over every spatial position of every probe image, streamed
   through a :class:`~advinterp.stats.Quantile` sketch;
2. ``IoU(u, c) = Σ|M_u ∩ L_c| / Σ|M_u ∪ L_c|`` with ``M_u`` the unit's map
   upsampled (bilinear) to the mask size and thresholded at ``T_u``, summed over
   the images where ``c``'s category is annotated
   (:class:`~advinterp.stats.IoUCounts`).

A unit is *interpretable* when its best IoU exceeds ``iou_threshold`` and is
counted in its best concept's category, as in NetDissect's tally. The default
threshold is 0.04, Network Dissection's own; the paper we reproduce (Dong et
al. 2022, §4.2) writes 0.4, which would leave almost no unit interpretable —
pass ``iou_threshold=0.4`` to follow its text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from advinterp.errors import UserError
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder
from advinterp.stats import IoUCounts, Quantile

__all__ = ["Dissection", "UnitConcept", "dissect", "label_categories"]

# A probe batch: images N×C×H×W in [0, 1], and per category name its label masks
# (N×S×H×W or N×H×W pixel masks, or N×S image-level labels; 0 = none).
ProbeBatch = tuple[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class UnitConcept:
    """A unit's best-matching concept: one row of NetDissect's tally."""

    unit: int
    category: str
    label: str
    iou: float


@dataclass
class Dissection:
    """The result of :func:`dissect` for one layer."""

    layer: str
    thresholds: torch.Tensor  # U
    iou: torch.Tensor  # U×L (label 0 scores 0)
    labels: list[str]
    categories: list[str]
    label_category: torch.Tensor  # L, index into categories (-1: none)
    iou_threshold: float
    # The IoU counts, kept per probe image when dissect(per_image=True) (else None).
    counts: IoUCounts | None = field(default=None, repr=False)

    def best(self) -> list[UnitConcept]:
        """Per unit, its best concept (highest IoU over all labels of all categories)."""
        values, best = self.iou.max(dim=1)
        return [
            UnitConcept(
                unit,
                self.categories[int(self.label_category[label])] if label > 0 else "",
                self.labels[label],
                float(value),
            )
            for unit, (value, label) in enumerate(zip(values.tolist(), best.tolist(), strict=True))
        ]

    def interpretable(self) -> dict[str, float]:
        """Per category, the % of the layer's units whose best concept is in it with IoU above the
        threshold (Table 1)."""
        values, best = self.iou.max(dim=1)
        category = self.label_category[best]
        hit = (values > self.iou_threshold) & (category >= 0)
        units = self.iou.shape[0]
        return {
            name: 100.0 * float((hit & (category == k)).sum()) / units
            for k, name in enumerate(self.categories)
        }

    def interpretable_resampled(self, weights: torch.Tensor) -> torch.Tensor:
        """``B×K``: under each of ``B`` weightings of the probe images (``B×N``, e.g.
        bootstrap counts), how many of the layer's units are interpretable in each category;
        thresholds stay those of the whole probe. Needs ``dissect(..., per_image=True)``."""
        if self.counts is None or not self.counts.per_image:
            raise UserError(
                "resampling needs the IoU counts kept per image: dissect(per_image=True)"
            )
        values, best = self.counts.resampled(weights).max(dim=2)  # B×U
        category = self.label_category[best]
        hit = (values > self.iou_threshold) & (category >= 0)
        return torch.stack(
            [(hit & (category == k)).sum(1) for k in range(len(self.categories))], dim=1
        )


def label_categories(categories: Mapping[str, Sequence[int]], num_labels: int) -> torch.Tensor:
    """Each label's category index, from ``{category: label numbers}`` (the first listing wins)."""
    owner = torch.full((num_labels,), -1, dtype=torch.int64)
    for k, numbers in enumerate(categories.values()):
        for number in numbers:
            if not 0 < number < num_labels:
                raise UserError(
                    f"category {list(categories)[k]!r} lists label {number}, "
                    f"not in 1..{num_labels - 1}"
                )
            if owner[number] < 0:
                owner[number] = k
    return owner


def _passes(batches: Iterable[ProbeBatch] | Callable[[], Iterable[ProbeBatch]]):
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise UserError(
            "dissection reads the probe twice: pass a list, a DataLoader or a function "
            "returning a fresh iterator, not a one-shot generator"
        )
    return lambda: batches


def dissect(
    model,
    layer: str | Sequence[str],
    batches: Iterable[ProbeBatch] | Callable[[], Iterable[ProbeBatch]],
    categories: Mapping[str, Sequence[int]],
    labels: Sequence[str],
    quantile: float = 0.995,
    iou_threshold: float = 0.04,
    resolution: int = 8192,
    progress: bool = False,
    per_image: bool = False,
) -> Dissection | dict[str, Dissection]:
    """Dissect one layer (or several, in the same two passes) of ``model`` on a probe.

    Args:
        model: a :class:`~advinterp.models.Classifier` or any module; ``layer``
            names one of its conv layers (as :class:`~advinterp.record.Recorder`),
            or a list of them.
        batches: ``(images, masks)`` pairs, re-iterable (or a function returning a
            fresh iterable): ``masks`` maps a category name to ``N×S×H×W`` /
            ``N×H×W`` label masks or ``N×S`` image-level labels (0 = none); an
            image with no nonzero label in a category is not annotated in it.
        categories: category name → its label numbers (the table's rows).
        labels: label names by number; ``labels[0]`` is "no concept".
        quantile: per-unit activation quantile for the threshold (0.995: top 0.5%).
        iou_threshold: best IoU above which a unit is interpretable (0.04, as
            NetDissect; the paper's text says 0.4).
        resolution: the quantile sketch's size (rank error ≈ 1.4/resolution).
        per_image: keep the IoU counts image by image (``Dissection.counts``), so
            Table 1 can be recomputed on resamples of the probe
            (:meth:`Dissection.interpretable_resampled`); memory grows with the images.

    Returns a :class:`Dissection` for one layer name, ``{layer: Dissection}`` for a list.

    Example::

        result = dissect(model, "layer3.1.conv2", probe, {"object": [1, 2]}, ["-", "shirt", "bag"])
        result.interpretable()                 # {"object": 12.5}
    """
    if not 0 < quantile < 1:
        raise UserError(f"quantile must be in (0, 1), got {quantile}")
    passes = _passes(batches)
    label_category = label_categories(categories, len(labels))
    names = list(categories)
    index = {name: k for k, name in enumerate(names)}
    layers = [layer] if isinstance(layer, str) else list(layer)
    model.eval()
    sketches: dict[str, Quantile] = {}
    counts: dict[str, IoUCounts] = {}
    with Recorder(model, layers, keep_maps=layers) as rec, torch.inference_mode():
        for images, _ in tqdm(passes(), desc="dissect: quantiles", disable=not progress):
            rec(images)
            for name in rec.layers:
                maps = rec.maps[name]
                if maps.dim() != 4:
                    raise UserError(
                        f"layer {name} gives {maps.dim()}-D output: dissect a conv layer"
                    )
                if name not in sketches:
                    sketches[name] = Quantile(maps.shape[1], resolution=resolution)
                sketches[name].add(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]))
        if not sketches:
            raise UserError("the probe is empty: no images to dissect")
        thresholds = {name: sketch.quantile(quantile) for name, sketch in sketches.items()}
        for name, sketch in sketches.items():
            counts[name] = IoUCounts(
                sketch.num_units, len(labels), label_category, len(names), per_image=per_image
            )
        sketches.clear()  # ~3 × resolution values a unit, not needed in the second pass
        for images, masks in tqdm(passes(), desc="dissect: IoU", disable=not progress):
            unknown = set(masks) - set(index)
            if unknown:
                raise UserError(f"probe masks name categories {sorted(unknown)} not among {names}")
            rec(images)
            by_index = {index[k]: v for k, v in masks.items()}
            for name in rec.layers:
                counts[name].add(rec.maps[name], thresholds[name], by_index)
    results = {
        name: Dissection(
            layer=name,
            thresholds=thresholds[name].cpu(),
            iou=counts[name].result().cpu(),
            labels=list(labels),
            categories=names,
            label_category=label_category,
            iou_threshold=iou_threshold,
            counts=counts[name] if per_image else None,
        )
        for name in rec.layers
    }
    return results[rec.layers[0]] if isinstance(layer, str) else results
