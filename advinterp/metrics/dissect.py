"""Network Dissection (Bau et al. 2017): which units' masks match a semantic concept.

For each unit ``u`` of a layer, over a probe with concept masks (a Broden-format dataset):

1. its threshold ``T_u`` = the ``quantile`` (0.995: top 0.5%) of its activations over
   every spatial position of every probe image;
2. ``IoU(u, c) = Σ|M_u ∩ L_c| / Σ|M_u ∪ L_c|`` with ``M_u`` the unit's map upsampled
   (bilinear) to the mask size and thresholded at ``T_u``, summed over the images where
   ``c``'s category is annotated (:class:`~advinterp.stats.IoUCounts`).

Both in one pass of the model over the probe: the thresholds are exact, from each unit's
largest activations kept as they come (:class:`~advinterp.stats.TopQuantile`, the same
numbers as ``torch.quantile`` over all of them), and the IoU counts are kept until the
thresholds are known (:class:`~advinterp.stats.DeferredIoU`): the pixels that may end
up inside a mask one by one (then the IoU is exact, as a second pass would count it),
past a memory budget in fine bins around each threshold (within ~1e-3). Counts kept image
by image cannot be binned: past their own budget the model runs a second pass over the
probe, counting them at the known thresholds. The passes go through a
:class:`~advinterp.tally.Tally` when the probe can be read by number: across ``torchrun``
processes and resumable from the last finished chunk of images.

A unit is *interpretable* when its best IoU exceeds ``iou_threshold`` and is
counted in its best concept's category, as in NetDissect's tally. The default
threshold is 0.04, Network Dissection's own; the paper we reproduce (Dong et
al. 2022, §4.2) writes 0.4, which would leave almost no unit interpretable —
pass ``iou_threshold=0.4`` to follow its text.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder
from advinterp.stats import DeferredIoU, IoUCounts, TopQuantile
from advinterp.stats.iou import Concepts
from advinterp.stats.quantile import tail_window
from advinterp.tally import Tally, weights_fingerprint

__all__ = ["Dissection", "UnitConcept", "dissect", "label_categories", "PER_IMAGE_PIXELS"]

#: With ``per_image``, the pixels the one pass may keep until the thresholds are known
#: (about 18 bytes each, so ≈ 2.4 GB); a probe expected to need more is dissected in two
#: passes, the second counting the IoU image by image at the thresholds of the first.
PER_IMAGE_PIXELS = 1 << 27

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


def _probe_images(batches) -> int | None:
    """How many images ``batches`` holds, when it says so without being read: a list of
    batches, a probe's batches (:func:`~advinterp.data.broden.probe_batches`, the
    adversarial side's), a ``DataLoader``; else None."""
    if isinstance(batches, (list, tuple)):
        return sum(len(images) for images, _ in batches)
    for name in ("adversarial", "probe", "dataset"):
        source = getattr(batches, name, None)
        if source is not None and hasattr(source, "__len__"):
            return len(source)
    return None


def dissect(
    model,
    layer: str | Sequence[str],
    batches: Iterable[ProbeBatch] | Callable[[], Iterable[ProbeBatch]],
    categories: Mapping[str, Sequence[int]],
    labels: Sequence[str],
    quantile: float = 0.995,
    iou_threshold: float = 0.04,
    resolution: int | None = None,
    progress: bool = False,
    per_image: bool = False,
    bins: int = 64,
    exact_pixels: int | None = DeferredIoU.EXACT_PIXELS,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
    fingerprint: Mapping | None = None,
    desc: str = "dissect",
    per_image_pixels: int = PER_IMAGE_PIXELS,
) -> Dissection | dict[str, Dissection]:
    """Dissect one layer (or several, in the same pass) of ``model`` on a probe.

    Args:
        model: a :class:`~advinterp.models.Classifier` or any module; ``layer``
            names one of its conv layers (as :class:`~advinterp.record.Recorder`),
            or a list of them.
        batches: ``(images, masks)`` pairs (or a function returning them), read once:
            ``masks`` maps a category name to ``N×S×H×W`` / ``N×H×W`` label masks or
            ``N×S`` image-level labels (0 = none); an image with no nonzero label in a
            category is not annotated in it. When their number of images shows without
            reading them (a list, :func:`~advinterp.data.broden.probe_batches`, a
            ``DataLoader``) the thresholds are exact in any order; else unless the probe
            comes in an order whose activations drift far (a warning then says so).
        categories: category name → its label numbers (the table's rows).
        labels: label names by number; ``labels[0]`` is "no concept".
        quantile: per-unit activation quantile for the threshold (0.995: top 0.5%).
        iou_threshold: best IoU above which a unit is interpretable (0.04, as
            NetDissect; the paper's text says 0.4).
        resolution: unused (the thresholds are exact); kept so older calls still run.
        per_image: keep the IoU counts image by image (``Dissection.counts``), so
            Table 1 can be recomputed on resamples of the probe
            (:meth:`Dissection.interpretable_resampled`); the counts are then exact
            (see :class:`~advinterp.stats.DeferredIoU`) and the pixels kept until the
            thresholds are known grow with the images: where more than
            ``per_image_pixels`` are expected (:data:`PER_IMAGE_PIXELS`) and the batches
            can be read again, the model runs twice, the second pass counting the IoU
            at the first one's thresholds.
        bins, exact_pixels: how the IoU counts are kept until the thresholds are known
            (:class:`~advinterp.stats.DeferredIoU`): up to ``exact_pixels`` pixels per
            layer one by one, so that the counts are exact (the embedded probe's 3,000
            images need a third of the default), then in ``bins`` bins around each
            unit's threshold.
        world, partial, chunk, fingerprint: with batches that can be read by number (a
            probe's, :func:`~advinterp.data.broden.probe_batches`, or the adversarial
            side's), the pass goes through a :class:`~advinterp.tally.Tally`: under
            ``torchrun`` each process (``world``) reads its share of every chunk of
            ``chunk`` images and the statistics are merged after each (the same
            thresholds and IoU as one process: exact, unless the counts were binned);
            ``partial`` is a file they are checkpointed into after each chunk, from
            which the same pass (``fingerprint``: what else makes it the same; its
            ``"model"``, when given, stands for the weights' digest) resumes.

    Returns a :class:`Dissection` for one layer name, ``{layer: Dissection}`` for a list.

    Example::

        result = dissect(model, "layer3.1.conv2", probe, {"object": [1, 2]}, ["-", "shirt", "bag"])
        result.interpretable()                 # {"object": 12.5}
    """
    del resolution
    if not 0 < quantile < 1:
        raise UserError(f"quantile must be in (0, 1), got {quantile}")
    world = world or World()
    batches = batches() if callable(batches) else batches
    images = _probe_images(batches)
    numbered = getattr(batches, "numbered", None)
    if numbered is None and (world.size > 1 or partial is not None):
        raise ValueError(
            "dissecting across processes or resumably needs batches read by number "
            "(probe_batches, adversarial_probe_batches)"
        )
    if images == 0:
        raise UserError("the probe is empty: no images to dissect")
    label_category = label_categories(categories, len(labels))
    names = list(categories)
    index = {name: k for k, name in enumerate(names)}
    layers = [layer] if isinstance(layer, str) else list(layer)
    model.eval()
    base_fingerprint = None
    if numbered is not None:
        base_fingerprint = {
            "labels": len(labels),
            "categories": {k: list(v) for k, v in categories.items()},
            "quantile": quantile,
            **dict(fingerprint or {}),
        }
        if "model" not in base_fingerprint:  # the caller's digest of the weights, else ours
            base_fingerprint["model"] = weights_fingerprint(model)
    with (
        Recorder(model, layers, reduce=None, keep_maps=layers, stop=True) as rec,
        torch.inference_mode(),
    ):
        # The layers' shapes and the masks' size, from the first batch (kept, as the pass's
        # first) or, when the pass is read by number, from its first image.
        if numbered is None:
            stream = iter(batches)
            first = next(stream, None)
            if first is None:
                raise UserError("the probe is empty: no images to dissect")
            rec(first[0])
        else:
            first = next(iter(numbered([0])))
            rec(first[0][:1])
        shapes = {name: tuple(rec.maps[name].shape[1:]) for name in rec.layers}
        for name, shape in shapes.items():
            if len(shape) != 3:
                raise UserError(
                    f"layer {name} gives {len(shape) + 1}-D output: dissect a conv layer"
                )
        mask_sizes = [tuple(m.shape[-2:]) for m in first[1].values() if m.dim() >= 3]
        # Kept per image until the thresholds are known: the pixels that may lie in a mask,
        # 1.3-1.6 times those that do. Per image, past a budget, a second pass counts them.
        pixels = math.prod(mask_sizes[0]) if mask_sizes else None
        expected = sum(
            1.6 * (1 - quantile) * (pixels or h * w) * units for units, h, w in shapes.values()
        ) * (images or 0)
        two_passes = per_image and expected > per_image_pixels
        if two_passes and numbered is None and iter(batches) is batches:
            two_passes = False  # a stream read once: keep the pixels
        bar_total = None if images is None else -(-images // _batch_size(batches, first))
        _check_memory(
            shapes,
            images,
            quantile,
            pixels,
            len(labels),
            len(names),
            bins,
            exact_pixels,
            per_image,
            two_passes,
            copies=1 if numbered is None else 2 + (world.size > 1),
            device=rec.maps[rec.layers[0]].device,
        )

        def masks_of(masks) -> _Masks:
            unknown = set(masks) - set(index)
            if unknown:
                raise UserError(f"probe masks name categories {sorted(unknown)} not among {names}")
            device = rec.maps[rec.layers[0]].device
            return _Masks({index[k]: v for k, v in masks.items()}, len(labels), len(names), device)

        def run(make, fold, what: str, suffix: str = ""):
            """One pass: ``fold(name, maps, masks, fresh, before, first_of_chunk)`` each
            layer of each batch into ``fresh``, in chunks through a Tally (the statistics
            merged after each; ``before``: the chunks before) when the batches are read by
            number, else at once; returns the statistics of every image."""
            label = f"{desc}{suffix}"

            def feed(stream, fresh, before, bar, recorded: bool = False) -> None:
                start = True
                for x, masks in stream:
                    if not recorded:
                        rec(x)
                    recorded = False
                    batch = masks_of(masks)
                    for name in rec.layers:
                        fold(name, rec.maps[name], batch, fresh, before, start)
                    start = False
                    bar.update()

            if numbered is None:
                stats = make()
                with tqdm(total=bar_total, desc=label, disable=not progress) as bar:
                    if suffix:  # a later pass: read the batches again
                        feed(iter(batches), stats, stats, bar)
                    else:
                        feed(itertools.chain([first], stream), stats, stats, bar, recorded=True)
                return stats
            tally = Tally(
                make,
                images,
                batches.batch_size,
                chunk=chunk,
                world=world,
                partial=None if partial is None else _partial_of(Path(partial), suffix),
                fingerprint={"pass": f"dissect {what}", "layers": list(rec.layers)}
                | base_fingerprint,
                progress=progress,
                desc=label,
            )
            with tqdm(
                total=tally.remaining(), desc=label, disable=not (progress and world.is_main)
            ) as bar:
                for numbers in tally.chunks():
                    fresh = make()
                    feed(numbered(numbers), fresh, tally.stats, bar)
                    tally.commit(fresh)
            return tally.stats

        def tops() -> dict[str, object]:
            return {
                f"top:{name}": TopQuantile(
                    units, quantile, total=None if images is None else images * h * w
                )
                for name, (units, h, w) in shapes.items()
            }

        if two_passes:
            # The thresholds first; then the IoU counted image by image at them.
            stats = run(
                tops,
                lambda name, maps, c, fresh, b, s: fresh[f"top:{name}"].add(maps),
                "thresholds",
            )
            thresholds = {name: stats[f"top:{name}"].quantile() for name in rec.layers}

            def counts() -> dict[str, object]:
                return {
                    f"iou:{name}": IoUCounts(
                        units, len(labels), label_category, len(names), per_image=True
                    )
                    for name, (units, _, _) in shapes.items()
                }

            def count(name, maps, masks, fresh, before, start) -> None:
                fresh[f"iou:{name}"].add(maps, thresholds[name].to(maps.device), masks.indexed)

            stats |= run(counts, count, "counts", suffix=" counts")
        else:

            def make() -> dict[str, object]:
                stats = tops()
                for name, (units, _, _) in shapes.items():
                    stats[f"iou:{name}"] = DeferredIoU(
                        units,
                        len(labels),
                        label_category,
                        len(names),
                        bins=bins,
                        per_image=per_image,
                        exact_pixels=exact_pixels,
                    )
                return stats

            looked: dict[str, int] = {}
            bounds: dict[str, torch.Tensor] = {}

            def fold(name, maps, masks, fresh, before, start) -> None:
                """Each unit's window comes from the thresholds' store of the chunks
                ``before`` (the same on every process), or in the first chunk from this
                one's values; it is read again each time the values grew by an eighth."""
                top, counts = fresh[f"top:{name}"], fresh[f"iou:{name}"]
                top.add(maps)
                guide = before[f"top:{name}"] if before[f"top:{name}"].count else top
                window = None
                if start:
                    looked[name] = 0
                if counts.low is None or guide.count >= looked[name] * 1.125:
                    window = tuple(t.to(maps.device) for t in tail_window(guide))
                    bounds[name] = guide.lower_bound().to(maps.device)
                    looked[name] = guide.count
                counts.add(maps, masks.concepts, window, bound=bounds[name])

            stats = run(make, fold, "one pass")
    results = {}
    for name in rec.layers:
        top = stats[f"top:{name}"]
        if top.count == 0:
            raise UserError("the probe is empty: no images to dissect")
        thresholds = top.quantile()
        if two_passes:
            tally_counts = stats[f"iou:{name}"]
            _warn_inexact(name, top.exact(), torch.ones_like(top.exact()))
        else:
            _warn_inexact(name, top.exact(), stats[f"iou:{name}"].exact(thresholds))
            tally_counts = stats[f"iou:{name}"].counts(thresholds)
        results[name] = Dissection(
            layer=name,
            thresholds=thresholds.cpu(),
            iou=tally_counts.result().cpu(),
            labels=list(labels),
            categories=names,
            label_category=label_category,
            iou_threshold=iou_threshold,
            counts=tally_counts if per_image else None,
        )
    return results[rec.layers[0]] if isinstance(layer, str) else results


class _Masks:
    """A batch's masks by category index, and laid out once for every layer's
    :class:`~advinterp.stats.DeferredIoU` (:class:`Concepts`) when asked."""

    def __init__(self, indexed, num_labels: int, num_categories: int, device):
        self.indexed = indexed
        self._args = (num_labels, num_categories)
        self._device = device
        self._concepts: Concepts | None = None

    @property
    def concepts(self) -> Concepts:
        if self._concepts is None:
            self._concepts = Concepts(self.indexed, *self._args, device=self._device)
        return self._concepts


def _check_memory(
    shapes, images, quantile, pixels, labels, categories, bins, exact_pixels, per_image,
    two_passes, copies, device,
) -> None:  # fmt: skip
    """Refuse, before any work, a dissection whose statistics would not fit in the memory of
    ``device`` (the largest of them held ``copies`` times: the merged ones, a chunk's, and
    across processes another process's being merged)."""
    if not images:
        return
    held = 0.0
    for units, h, w in shapes.values():
        values = images * h * w
        need = (1 - quantile) * values
        held += 4 * units * (need + 8 * math.sqrt(need) + 64)  # each unit's largest values
        kept = 1.6 * (1 - quantile) * (pixels or h * w) * units * images
        if two_passes:  # per image: each unit's and label's area, the sparse intersections
            held += copies * 4 * images * (units + labels)
        else:
            cells = bins + 8
            held += copies * units * cells * (8 * (labels + categories) + 8)  # the bins
            held += copies * 18 * (kept if per_image else min(kept, exact_pixels or 0))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where = f"{device}'s"
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        where = "this machine's"
    if held > 0.8 * total:
        units = sum(u for u, _, _ in shapes.values())
        raise UserError(
            f"dissecting {units} units on {images} probe images would hold about "
            f"{held / 2**30:.1f} GiB of statistics, more than {where} {total / 2**30:.0f} GiB "
            "allows: dissect fewer layers (the last two stages: stages) or fewer probe images"
        )


def _batch_size(batches, first) -> int:
    return getattr(batches, "batch_size", None) or len(first[0])


def _partial_of(partial: Path, suffix: str) -> Path:
    """The checkpoint of a pass: ``partial`` for the first, ``<stem>.counts.partial`` for the
    second pass of a two-pass dissection."""
    if not suffix:
        return partial
    return partial.with_name(f"{partial.stem}.{suffix.strip()}{partial.suffix}")


def _warn_inexact(layer: str, threshold_exact: torch.Tensor, counts_exact: torch.Tensor) -> None:
    """Say so when a threshold or a count is not exact: only a probe read in an order that
    drifts far, with its size unknown, gets here."""
    if not bool(threshold_exact.all()):
        warnings.warn(
            f"layer {layer}: the thresholds of {int((~threshold_exact).sum())} units are "
            "approximate (the probe's size was not known and its values came in a drifting "
            "order): pass the batches as a list or a probe's batches",
            stacklevel=3,
        )
    if not bool(counts_exact.all()):
        warnings.warn(
            f"layer {layer}: {int((~counts_exact).sum())} units' thresholds fell below the "
            "values counted for them; their IoU is approximate",
            stacklevel=3,
        )
