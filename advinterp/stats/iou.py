"""Streaming IoU counts between unit masks and concept masks (Network Dissection).

For a unit ``u`` with threshold ``T_u`` and a concept ``c`` of category ``k``
(Bau et al. 2017, §2.2):

    IoU(u, c) = Σ |M_u ∩ L_c| / Σ |M_u ∪ L_c|,   M_u = upsample(map_u) > T_u,

both sums over the images where category ``k`` is annotated. Only three
counts are needed, and they add up batch by batch: the intersections
``units × labels``, each label's area, and each unit's mask area over the
images where each category is annotated (``units × categories``); the union is
``area(M_u) + area(L_c) − |M_u ∩ L_c|``. No mask is ever stored.

With ``per_image=True`` the same three counts are also kept image by image (the
intersections sparse, as a unit's mask covers a few pixels), so the IoU of any
weighting of the images — a bootstrap resample — is a product of matrices
(:meth:`IoUCounts.resampled`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from advinterp.errors import UserError
from advinterp.stats.sparse import above, sparse_nonzero

__all__ = ["Concepts", "DeferredIoU", "IoUCounts", "unit_masks"]

# Elements of the upsampled N×H×W×U mask held at once; larger batches are cut into
# chunks of images so memory stays bounded whatever the batch size.
_CHUNK_ELEMENTS = 1 << 24
# Masks are counted from the coordinates of the pixels inside them when at most this share of
# their 8-byte words (8 units at a pixel) holds one: dissection's top-0.5% thresholds leave
# ~0.1-0.2% of the pixels inside. Denser masks are counted pixel by pixel (about the CPU's
# break-even).
_SPARSE = 1 / 32


def unit_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``N×U×h×w`` maps → ``N×H×W×U`` boolean masks: bilinear upsampling to ``size``, then ``> T``.

    Channels last (contiguous), so each pixel's units are one row."""
    maps = maps.float().contiguous(memory_format=torch.channels_last)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    up = up.permute(0, 2, 3, 1)
    return up > thresholds.to(up.device, up.dtype)


class IoUCounts:
    """Intersection and union counts of ``num_units`` unit masks with ``num_labels`` concepts.

    ``label_category`` gives each label's category (an index; ``-1`` for none);
    by default every label is in category 0; ``num_categories`` defaults to the
    largest index + 1. Label 0 means "no concept" and never
    scores. ``add`` takes one batch of unit maps and, per category, its label
    masks; ``result()`` is the ``U×L`` IoU. Counts are float64 on the device of
    the first batch (exact below 2**53 pixels).

    Example::

        counts = IoUCounts(512, len(labels), label_category)
        for x, masks in probe:                 # masks: {category: N×S×H×W labels}
            counts.add(recorder(x)[layer], thresholds, masks)
        iou = counts.result()                  # 512 × L
    """

    def __init__(
        self,
        num_units: int,
        num_labels: int,
        label_category: Sequence[int] | torch.Tensor | None = None,
        num_categories: int | None = None,
        per_image: bool = False,
    ):
        if num_units < 1 or num_labels < 1:
            raise UserError(
                f"IoU counts need at least one unit and one label "
                f"(got units={num_units}, labels={num_labels})"
            )
        self.num_units = int(num_units)
        self.num_labels = int(num_labels)
        if label_category is None:
            label_category = torch.zeros(self.num_labels, dtype=torch.int64)
        self.label_category = torch.as_tensor(label_category, dtype=torch.int64).clone()
        if self.label_category.shape != (self.num_labels,):
            raise UserError(
                f"label_category has {self.label_category.numel()} entries for {num_labels} labels"
            )
        self.label_category[0] = -1
        self.num_categories = max(
            int(self.label_category.max().clamp(min=0)) + 1, int(num_categories or 0)
        )
        self.intersection = torch.zeros(self.num_units, self.num_labels, dtype=torch.float64)
        self.label_area = torch.zeros(self.num_labels, dtype=torch.float64)
        self.unit_area = torch.zeros(self.num_units, self.num_categories, dtype=torch.float64)
        self.count = 0
        self._placed = False
        # Per image (per_image=True): the sparse intersections as (image, unit·L + label,
        # count) triples, each unit's mask area, each label's area, the annotated categories.
        self.per_image = bool(per_image)
        self._images: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("inter_index", "inter_value", "unit_area", "label_area", "annotated")
        }

    def add(
        self,
        maps: torch.Tensor,
        thresholds: torch.Tensor,
        labels: Mapping[int, torch.Tensor] | torch.Tensor,
        annotated: Mapping[int, torch.Tensor] | torch.Tensor | None = None,
    ) -> None:
        """Fold in a batch.

        Args:
            maps: ``N×U×h×w`` unit maps (any resolution).
            thresholds: ``U`` per-unit thresholds.
            labels: per category index, its labels: ``N×S×H×W`` (or ``N×H×W``)
                integer masks, ``S`` overlapping layers, 0 = none; or ``N×S``
                image-level labels (the concept covers the whole image). All
                pixel masks of a batch share one size ``H×W``. A bare tensor is
                category 0.
            annotated: per category, an ``N`` boolean of the images where it is
                annotated; by default, the images with any nonzero label in it.
        """
        if maps.dim() != 4 or maps.shape[1] != self.num_units:
            raise ValueError(f"expected N×{self.num_units}×h×w maps, got {tuple(maps.shape)}")
        if not self._placed:
            self.to(maps.device)
        n = maps.shape[0]
        pixel, image, size = _split_labels(
            labels, annotated, n, self.num_labels, self.num_categories, self.intersection.device
        )
        if size is None:
            size = tuple(maps.shape[-2:])
        per_image = max(1, _CHUNK_ELEMENTS // max(1, self.num_units * size[0] * size[1]))
        for start in range(0, n, per_image):
            rows = slice(start, start + per_image)
            self._add_chunk(
                maps[rows],
                thresholds,
                size,
                {k: (lab[rows], ann[rows]) for k, (lab, ann) in pixel.items()},
                {k: (lab[rows], ann[rows]) for k, (lab, ann) in image.items()},
                self.count + start,
            )
        self.count += n

    def _add_chunk(self, maps, thresholds, size, pixel, image, first: int = 0) -> None:
        masks = unit_masks(maps.to(self.intersection.device), thresholds, size)  # N×H×W×U
        n, height, width, units = masks.shape
        pixels, labels = height * width, self.num_labels
        inside = sparse_nonzero(masks, _SPARSE)
        if inside is not None:
            # Dissection keeps each unit's top 0.5% of activations: count the few
            # (image, pixel, unit) triples inside a mask from their coordinates.
            unit, which = inside % units, inside // units
            which, where = which // pixels, which % pixels
            area = torch.bincount(which * units + unit, minlength=n * units).view(n, units)

            def hits_of(layer):  # units × labels
                ids = layer.reshape(n, pixels)[which, where]
                hits = torch.bincount(unit * labels + ids, minlength=units * labels)
                return hits.view(units, labels)

            def image_hits_of(layer):  # per image, sparse: (image, unit·L + label), count
                ids = layer.reshape(n, pixels)[which, where]
                keys, hits = torch.unique((which * units + unit) * labels + ids, return_counts=True)
                return keys // (units * labels), keys % (units * labels), hits

        else:
            # Dense masks (a low threshold): one contiguous row add per pixel.
            # Float32 counts are exact within a chunk (< 2**24 pixels).
            flat = masks.reshape(-1, units).to(torch.float32)
            area = torch.bmm(flat.new_ones(n, 1, pixels), flat.view(n, pixels, units))[:, 0]

            def hits_of(layer):
                hits = torch.zeros(labels, units, device=flat.device)
                return hits.index_add_(0, layer.reshape(-1), flat).t()

            def image_hits_of(layer):
                hits = torch.zeros(n * labels, units, device=flat.device)
                keys = torch.arange(n, device=flat.device).repeat_interleave(pixels) * labels
                hits.index_add_(0, keys + layer.reshape(-1), flat)
                hits = hits.view(n, labels, units).transpose(1, 2).reshape(n, -1)
                img, key = hits.nonzero(as_tuple=True)
                return img, key, hits[img, key]

        area = area.double()  # N×U
        keep = self.per_image
        if keep:
            annotated = torch.zeros(n, self.num_categories, dtype=torch.bool)
            label_area = torch.zeros(n * labels, dtype=torch.float64, device=area.device)
            self._images["unit_area"].append(area.float().cpu())
        for category, (lab, ann) in {**pixel, **image}.items():
            self.unit_area[:, category] += area[ann].sum(0)
            lab = lab * ann.view(-1, *([1] * (lab.dim() - 1)))  # labels of unannotated images
            lab = _first_occurrence(lab)
            if keep:
                annotated[:, category] = ann.cpu()
            if lab.dim() == 4:
                for layer in lab.unbind(1):  # S overlapping masks: a handful
                    hits = hits_of(layer)
                    hits[:, 0] = 0  # label 0: the unlabelled pixels
                    self.intersection += hits
                    area_of = torch.bincount(layer.reshape(-1), minlength=labels).double()
                    area_of[0] = 0
                    self.label_area += area_of
                    if keep:
                        img, key, hits = image_hits_of(layer)
                        self._keep_hits(first + img, key, hits, labels)
                        rows = torch.arange(n, device=layer.device).repeat_interleave(pixels)
                        label_area.index_add_(
                            0,
                            rows * labels + layer.reshape(-1),
                            torch.ones(layer.numel(), dtype=torch.float64, device=layer.device),
                        )
            else:
                which_image, slot = lab.nonzero(as_tuple=True)
                ids = lab[which_image, slot]
                self.intersection.index_add_(1, ids, area[which_image].t())
                self.label_area.index_add_(
                    0, ids, torch.full_like(ids, pixels, dtype=torch.float64)
                )
                if keep:
                    # The concept covers the image: its intersection is the unit's area.
                    row, unit = area[which_image].nonzero(as_tuple=True)
                    hits = area[which_image][row, unit]
                    img = first + which_image[row]
                    self._keep_hits(img, unit * labels + ids[row], hits, labels)
                    label_area.index_add_(
                        0,
                        which_image * labels + ids,
                        torch.full_like(ids, pixels, dtype=torch.float64),
                    )
        if keep:
            label_area = label_area.view(n, labels)
            label_area[:, 0] = 0
            self._images["label_area"].append(label_area.float().cpu())
            self._images["annotated"].append(annotated)

    def _keep_hits(self, image, key, hits, labels) -> None:
        """Keep per-image intersections (image, unit·L + label) → pixels, label 0 left out."""
        scored = key % labels != 0
        self._images["inter_index"].append(
            torch.stack([image[scored], key[scored]]).to(torch.int64).cpu()
        )
        self._images["inter_value"].append(hits[scored].to(torch.float32).cpu())

    def resampled(self, weights: torch.Tensor) -> torch.Tensor:
        """``B×U×L`` IoU under ``B`` weightings of the images (``weights``, ``B×N``: e.g.
        bootstrap counts, :func:`~advinterp.stats.bootstrap.resample_counts`); a row of
        ones gives :meth:`result`. Needs ``per_image=True``."""
        if not self.per_image:
            raise UserError(
                "resampled IoU needs the counts kept per image: IoUCounts(per_image=True)"
            )
        if weights.dim() != 2 or weights.shape[1] != self.count:
            raise UserError(
                f"weights must be B×{self.count} (one column per image), got {tuple(weights.shape)}"
            )
        images = {
            k: torch.cat(v, dim=1 if k == "inter_index" else 0) if v else None
            for k, v in self._images.items()
        }
        units, labels, n = self.num_units, self.num_labels, self.count
        w = weights.to(torch.float64).cpu()
        index = images["inter_index"]
        if index is None:
            index = torch.zeros(2, 0, dtype=torch.int64)
            value = torch.zeros(0, dtype=torch.float64)
        else:
            value = images["inter_value"].double()
        inter = torch.sparse_coo_tensor(
            index, value, (n, units * labels), check_invariants=True
        ).coalesce()
        # (N × UL)ᵀ · (N × B) → UL × B: one sparse product for every resample.
        inter = torch.sparse.mm(inter.t(), w.t().contiguous()).t().reshape(-1, units, labels)
        label_area = (w @ images["label_area"].double()).unsqueeze(1)  # B×1×L
        annotated = images["annotated"].double()  # N×K
        unit_area = images["unit_area"].double()  # N×U
        # Σᵢ wᵢ·area(M_u, i)·[category k annotated in i]: B×U×K, one category at a time.
        unit_area = torch.stack(
            [w @ (unit_area * annotated[:, k : k + 1]) for k in range(annotated.shape[1])], 2
        )
        category = self.label_category.clamp(min=0).cpu()
        union = unit_area[:, :, category] + label_area - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), 0.0)
        iou[:, :, self.label_category.cpu() < 0] = 0
        return iou

    def result(self) -> torch.Tensor:
        """``U×L`` IoU; 0 where the union is empty and for label 0."""
        category = self.label_category.clamp(min=0).to(self.unit_area.device)
        union = self.unit_area[:, category] + self.label_area - self.intersection
        iou = torch.where(union > 0, self.intersection / union.clamp(min=1), 0.0)
        iou[:, self.label_category < 0] = 0
        return iou

    def merge(self, other: IoUCounts) -> None:
        """Fold in counts over other images (a shard): the same as one pass over both."""
        if (other.num_units, other.num_labels) != (self.num_units, self.num_labels) or not (
            torch.equal(other.label_category, self.label_category)
        ):
            raise ValueError("cannot merge IoU counts of another layer or label set")
        device = self.intersection.device
        self.intersection += other.intersection.to(device)
        self.label_area += other.label_area.to(device)
        self.unit_area += other.unit_area.to(device)
        if self.per_image:
            if not other.per_image:
                raise ValueError("cannot merge counts without per-image counts into ones with")
            for key, parts in other._images.items():
                if key == "inter_index":  # the other's images come after this one's
                    parts = [p + torch.tensor([[self.count], [0]]) for p in parts]
                self._images[key].extend(parts)
        self.count += other.count

    def to(self, device) -> IoUCounts:
        self.intersection = self.intersection.to(device)
        self.label_area = self.label_area.to(device)
        self.unit_area = self.unit_area.to(device)
        self._placed = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so ``advinterp.io.save_tensors`` can write it: the totals, and with
        ``per_image`` the counts of each image (``image_*``)."""
        state = {
            "intersection": self.intersection,
            "label_area": self.label_area,
            "unit_area": self.unit_area,
            "label_category": self.label_category,
            "count": torch.tensor(self.count, dtype=torch.int64),
        }
        if self.per_image:
            empty = {
                "inter_index": torch.zeros(2, 0, dtype=torch.int64),
                "inter_value": torch.zeros(0),
                "unit_area": torch.zeros(0, self.num_units),
                "label_area": torch.zeros(0, self.num_labels),
                "annotated": torch.zeros(0, self.num_categories, dtype=torch.bool),
            }
            for key, parts in self._images.items():
                dim = 1 if key == "inter_index" else 0
                state[f"image_{key}"] = torch.cat(parts, dim) if parts else empty[key]
        return state

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            inter, label_area, unit_area = (
                state["intersection"],
                state["label_area"],
                state["unit_area"],
            )
        except KeyError as e:
            raise UserError(f"IoU state lacks {e}; the checkpoint is not an IoU tally") from None
        if tuple(inter.shape) != (self.num_units, self.num_labels) or tuple(unit_area.shape) != (
            self.num_units,
            self.num_categories,
        ):
            raise UserError(
                f"IoU state holds {tuple(inter.shape)} counts, expected "
                f"{(self.num_units, self.num_labels)}: it was saved for another layer or probe"
            )
        self.intersection = inter.double().clone()
        self.label_area = label_area.double().clone()
        self.unit_area = unit_area.double().clone()
        self.count = int(state.get("count", 0))
        self._placed = False
        if "image_unit_area" in state:
            self.per_image = True
            self._images = {key: [state[f"image_{key}"].clone()] for key in self._images}


# DeferredIoU's bins beside the fine bins of the window, each twice as wide as the one
# before it: a few below (a threshold rarely lands under the window, and every bin there
# adds pixels to look at), more above (the last one open).
_BELOW, _ABOVE = 2, 6


def _edge_offsets(bins: int) -> torch.Tensor:
    """A unit's bin edges in fine-bin widths from the low end of its window: ``_BELOW`` bins
    below (widths 2, 1), ``bins`` across the window, ``_ABOVE`` above (1, 2, …, and an open
    one). Bins are ``(left, right]``."""
    below = [-(2.0 ** (k + 1) - 1) for k in reversed(range(_BELOW))]
    above = [bins + 2.0 ** (k + 1) - 1 for k in range(_ABOVE - 1)]
    return torch.tensor([*below, *range(bins + 1), *above, math.inf], dtype=torch.float64)


class DeferredIoU:
    """IoU counts of unit masks (:class:`IoUCounts`) at thresholds known only after the pass.

    Network Dissection's threshold is a quantile of all of a unit's activations, known once
    every image has been seen; to count the IoU in that same pass, this keeps what the
    counts would be at any threshold where it may land. With each batch the caller says
    where that is: a *window* per unit (:func:`~advinterp.stats.quantile.tail_window` of a
    :class:`~advinterp.stats.quantile.TopQuantile` fed the same maps), and a ``bound``
    no threshold will be below, when known. Pixels of the upsampled maps below the window
    (by more than a few bins) or at the bound can be in no mask: they are never looked at,
    nor are the maps of a unit that stay below it (most of them, at the top 0.5%).

    The pixels above are kept one by one (value, image, unit, the labels under them):
    :meth:`counts` then counts them at the final thresholds exactly, as a second pass of
    :class:`IoUCounts` would, per image too. They are 1.3–1.6 times the pixels inside the
    final masks (0.6 M on the embedded probe's 3,000 images). Past ``exact_pixels`` (unless
    ``per_image``, where memory grows with the images) they are binned, and later pixels
    too: per unit, ``bins`` fine bins across the window, bins of doubling width beside it
    (two below, six above, the last one open), and in each bin the pixels of each label
    (``U × bins × L``) and of each category's annotated images (``U × bins × K``). A window
    that leaves the fine bins, or shrinks to half of them, re-bins the counts onto itself,
    each old bin spread evenly over its range. :meth:`counts` then reads whole bins above a
    threshold and the bin holding it in proportion to the part of its values' range above
    it: on the embedded probe's 3,000 images within 3e-4 of the exact IoU
    (``tests/metrics/test_dissect.py`` holds it to 5e-3 on 400).

    ``merge`` folds in a shard (binned with another window: re-binned onto this one's);
    ``state_dict``/``set_state_dict`` carry everything (pixels, bins and window).
    :meth:`exact` says whether a unit's threshold fell below the values looked at.

    Example::

        top = TopQuantile(512, 0.995, total=len(probe) * 7 * 7)
        counts = DeferredIoU(512, len(labels), label_category)
        for x, masks in probe:
            maps = recorder(x)[layer]
            top.add(maps)
            counts.add(maps, masks, tail_window(top), bound=top.lower_bound())
        iou = counts.result(top.quantile())     # U × L
    """

    #: Pixels kept one by one (exact counts) before they are binned, by default: about 18
    #: bytes each, so ≈ 40 MB. The embedded probe's 3,000 images keep ≈ 0.6 M.
    EXACT_PIXELS = 1 << 21

    def __init__(
        self,
        num_units: int,
        num_labels: int,
        label_category: Sequence[int] | torch.Tensor | None = None,
        num_categories: int | None = None,
        bins: int = 64,
        per_image: bool = False,
        exact_pixels: int | None = None,
    ):
        if bins < 2:
            raise UserError(f"a deferred IoU needs at least 2 bins per window, got {bins}")
        # The shape checks and the label bookkeeping are IoUCounts'.
        shape = IoUCounts(num_units, num_labels, label_category, num_categories)
        self.num_units, self.num_labels = shape.num_units, shape.num_labels
        self.label_category, self.num_categories = shape.label_category, shape.num_categories
        self.bins = int(bins)
        self.offsets = _edge_offsets(self.bins)
        self.per_image = bool(per_image)
        if exact_pixels is None:
            exact_pixels = self.EXACT_PIXELS
        self.exact_pixels = None if per_image else exact_pixels
        cells = (self.num_units, len(self.offsets) - 1)
        self.inter = torch.zeros(*cells, self.num_labels, dtype=torch.float64)
        self.area = torch.zeros(*cells, self.num_categories, dtype=torch.float64)
        # The smallest and largest value in each bin: a bin's counts spread over that range.
        self.least = torch.full(cells, math.inf)
        self.most = torch.full(cells, -math.inf)
        self.label_area = torch.zeros(self.num_labels, dtype=torch.float64)
        self.low: torch.Tensor | None = None  # U: the window's low end; None until placed
        self.width = torch.ones(self.num_units)  # U: a fine bin's width
        self.top = torch.full((self.num_units,), -math.inf)  # the largest value seen
        # Values at or below this may be missing: a threshold below it is not exact.
        self.dropped = torch.full((self.num_units,), -math.inf)
        self.count = 0
        self.binned = False  # pixels binned (True) or kept one by one in self.parts
        self.parts: list[dict[str, torch.Tensor]] = []
        self._kept = 0  # pixels in self.parts
        self._pruned_at = 0  # self._kept after the last pruning
        self._device = torch.device("cpu")

    # -- the window ---------------------------------------------------------------------

    def floor(self) -> torch.Tensor:
        """``U``: the lowest value the bins reach; values at or below it are not looked at."""
        return self.low + float(self.offsets[0]) * self.width

    def place(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Span ``bins`` fine bins from ``low`` to a quarter of the window past ``high`` (``U``
        each), for the units whose window left the fine bins (below by more than a quarter
        of its width) or narrowed to less than half of them.

        The low end is an edge: a threshold at a tie (a ReLU unit's 0.995 quantile is often
        its zeros) sits on an edge, not inside a bin."""
        low = low.detach().float().to(self._device)
        high = torch.maximum(high.detach().float().to(self._device), low)
        span = high - low
        width = span * 1.25 / self.bins
        # A window of one value (ties): fine bins just above it.
        tiny = (low.abs() * 2.0**-16).clamp(min=2.0**-40) / self.bins
        width = torch.where(width > tiny, width, tiny)
        if self.low is None:
            self.low, self.width = low.clone(), width
            return
        old_high = self.low + self.bins * self.width
        move = (low < self.low - span / 4) | (high > old_high) | (width < self.width / 2)
        if bool(move.any()):
            self._rebin(move.nonzero().squeeze(1), low[move], width[move])

    def edges(self) -> torch.Tensor:
        """``U × (bins + 9)`` bin edges in activation values; bins end at the largest value
        seen (the open one, and a tie at the top, a ReLU6's 6, then sits on an edge too)."""
        offsets = self.offsets.to(self._device)
        edges = self.low.double()[:, None] + offsets[None, :-1] * self.width.double()[:, None]
        top = self.top.double()[:, None]
        edges = torch.cat([edges, torch.maximum(top, edges[:, -1:])], dim=1)
        return torch.minimum(edges, torch.maximum(top, edges[:, :1]))

    def _rebin(self, units: torch.Tensor, low: torch.Tensor, width: torch.Tensor) -> None:
        """Move ``units``' binned counts onto bins from ``low`` by ``width``."""
        old = self.edges()[units]
        self.low, self.width = self.low.clone(), self.width.clone()
        self.low[units], self.width[units] = low, width
        if self.binned:
            move = _spread(old, self.edges()[units])  # units × new bins × old bins
            self.inter[units] = torch.bmm(move, self.inter[units])
            self.area[units] = torch.bmm(move, self.area[units])
            self.least[units], self.most[units] = _ranges(
                move, self.least[units], self.most[units], self.edges()[units]
            )
        self.dropped = torch.maximum(self.dropped, self.floor())

    # -- counting -----------------------------------------------------------------------

    def add(
        self,
        maps: torch.Tensor,
        labels: Concepts | Mapping[int, torch.Tensor] | torch.Tensor,
        window: tuple[torch.Tensor, torch.Tensor] | None = None,
        annotated: Mapping[int, torch.Tensor] | torch.Tensor | None = None,
        bound: torch.Tensor | None = None,
    ) -> None:
        """Fold in a batch: ``maps`` (``N×U×h×w``) and ``labels``/``annotated`` as
        :meth:`IoUCounts.add` (or :class:`Concepts` made of them, once for all layers);
        ``window`` (``U`` lows, ``U`` highs) where the thresholds will lie, required with
        the first batch (:meth:`place`); ``bound`` (``U``), when known, values no
        threshold will be below (:meth:`~advinterp.stats.quantile.TopQuantile.lower_bound`)."""
        if maps.dim() != 4 or maps.shape[1] != self.num_units:
            raise ValueError(f"expected N×{self.num_units}×h×w maps, got {tuple(maps.shape)}")
        if self.low is None:
            self.to(maps.device)
        if window is not None:
            self.place(*window)
        if self.low is None:
            raise ValueError("the first batch needs a window: where the thresholds will lie")
        n = maps.shape[0]
        if not isinstance(labels, Concepts):
            labels = Concepts(labels, self.num_labels, self.num_categories, annotated, self._device)
        if labels.images != n:
            raise ValueError(f"{labels.images} images' labels for {n} maps")
        size = labels.size or tuple(maps.shape[-2:])
        floor = self.floor()
        if bound is not None:
            floor = torch.maximum(floor, bound.detach().float().to(self._device))
        self.dropped = torch.maximum(self.dropped, floor)
        self.label_area += labels.label_area(size).sum(0).to(self._device)
        per_chunk = max(1, _CHUNK_ELEMENTS // max(1, self.num_units * size[0] * size[1]))
        for start in range(0, n, per_chunk):
            rows = slice(start, min(n, start + per_chunk))
            part = self._pixels_of(maps[rows].to(self._device).float(), size, labels, rows, floor)
            part["first"] = torch.tensor(self.count + start)
            self._take(part)
        self.count += n

    def _pixels_of(self, maps, size, labels: Concepts, rows: slice, floor) -> dict:
        """A chunk's pixels above ``floor`` (value, image·U + unit, the labels under them),
        its images' annotated categories and image-level labels, and with ``per_image``
        their label areas."""
        units, pixels = maps.shape[1], size[0] * size[1]
        # Bilinear upsampling mixes the 4 nearest values, so a map whose largest value is
        # at or below the floor has no pixel above it: only the others are upsampled, as
        # the channels of one image (channels last: several times faster than maps apart).
        # (index_select: several times faster than indexing with a tensor, on CPUs)
        active = above(maps.amax(dim=(2, 3)), floor).to(maps.device)  # image·U + unit
        img, unit = active // units, active % units
        up = F.interpolate(
            maps.reshape(-1, *maps.shape[2:])
            .index_select(0, active)
            .float()
            .unsqueeze(0)
            .contiguous(memory_format=torch.channels_last),
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0].permute(1, 2, 0)  # H×W×A, contiguous
        flat = above(up, floor.index_select(0, unit)).to(up.device)
        value = up.reshape(-1).index_select(0, flat)
        where, row = flat // len(unit), flat % len(unit)
        img, unit = img.index_select(0, row), unit.index_select(0, row)
        if len(value):
            self.top = self.top.scatter_reduce(0, unit, value, "amax")
        # The labels under each pixel, one column per segmentation layer.
        first = (img + rows.start) * pixels + where
        ids = [plane.reshape(-1).index_select(0, first) for plane in labels.planes]
        code = torch.int16 if self.num_labels <= 2**15 else torch.int32
        part = {
            "images": torch.tensor(rows.stop - rows.start),
            "value": value,
            "where": img * units + unit,
            "labels": torch.stack(ids, 1).to(code) if ids else img.new_zeros(len(img), 0),
            "annotated": labels.annotated[rows],
            "whole": labels.whole[rows],
        }
        if self.per_image:
            part["label_area"] = labels.label_area(size)[rows].float()
        return part

    def _take(self, part: dict[str, torch.Tensor]) -> None:
        if self.binned:
            self._bin_part(part)
            return
        self.parts.append(part)
        self._kept += len(part["value"])
        # Pixels fallen below the values looked at are dropped each time they doubled (at
        # a cost linear in the pixels kept, all told) and when they fill the pixels kept
        # exactly; binned if they still do.
        limit = self.exact_pixels
        if self._kept > 2 * self._pruned_at + (1 << 18) or (limit and self._kept > limit):
            self._prune()
        if limit is not None and self._kept > limit:
            self._bin_all()

    def _prune(self) -> None:
        """Drop kept pixels at or below the values no longer looked at."""
        dropped = self.dropped
        for part in self.parts:
            keep = part["value"] > dropped[part["where"] % self.num_units]
            for key in ("value", "where", "labels"):
                part[key] = part[key][keep]
        self._kept = self._pruned_at = sum(len(p["value"]) for p in self.parts)

    def _bin_all(self) -> None:
        """From now on, bin: the pixels kept so far, then every later one."""
        self.binned = True
        for part in self.parts:
            self._bin_part(part)
        self.parts, self._kept, self._pruned_at = [], 0, 0

    def _bin_value(self, value: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Each value's bin among its unit's: ``(left, right]``."""
        x = (value - self.low[unit]) / self.width[unit]
        fine = self.bins
        below = _BELOW - 1 - torch.floor(torch.log2(1 - x.clamp(max=0)))
        above = _BELOW + fine - 1 + torch.ceil(torch.log2(1 + (x - fine).clamp(min=0)))
        middle = _BELOW - 1 + torch.ceil(x)
        b = torch.where(x <= 0, below, torch.where(x <= fine, middle, above))
        return b.clamp(0, _BELOW + fine + _ABOVE - 1).long()

    def _bin_part(self, part: dict[str, torch.Tensor]) -> None:
        units, labels = self.num_units, self.num_labels
        nbins = len(self.offsets) - 1
        keep = part["value"] > self.dropped[part["where"] % units]
        where, value = part["where"][keep], part["value"][keep]
        img, unit = where // units, where % units
        slot = unit * nbins + self._bin_value(value, unit)
        self.least = self.least.view(-1).scatter_reduce(0, slot, value, "amin").view_as(self.least)
        self.most = self.most.view(-1).scatter_reduce(0, slot, value, "amax").view_as(self.most)
        ones = torch.ones(len(slot), dtype=torch.float64, device=slot.device)
        inter = self.inter.view(-1, labels)
        for ids in part["labels"][keep].long().unbind(1):
            inter.view(-1).index_add_(0, slot * labels + ids, ones)
        annotated = part["annotated"]
        for k in range(self.num_categories):
            self.area[:, :, k] += torch.bincount(
                slot[annotated[img, k]], minlength=units * nbins
            ).view(units, nbins)
        whole = part["whole"]
        if whole.shape[1]:
            # An image-level label's intersection is the unit's area in the image.
            n = int(part["images"])
            per_image = torch.bincount(img * (units * nbins) + slot, minlength=n * units * nbins)
            per_image = per_image.view(n, units * nbins).double()
            which, s = whole.nonzero(as_tuple=True)
            inter.index_add_(1, whole[which, s], per_image[which].t())
        self.inter[:, :, 0] = 0

    # -- reading --------------------------------------------------------------------------

    def exact(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``U`` booleans: whether every value above a unit's threshold was looked at (the
        counts are then exact, or within a bin's share when binned)."""
        return (thresholds.to(self._device).float() >= self.dropped).cpu()

    def result(self, thresholds: torch.Tensor) -> torch.Tensor:
        """``U×L`` IoU at ``thresholds`` (:meth:`counts`)."""
        return self.counts(thresholds).result()

    def counts(self, thresholds: torch.Tensor) -> IoUCounts:
        """The :class:`IoUCounts` of the masks thresholded at ``thresholds`` (``U``): counted
        from the pixels kept, exactly (per image too, with ``per_image``), or read from
        the bins: those above a threshold whole, the one holding it in proportion to the
        part of its values' range above it (a gap at the threshold then splits it right)."""
        thresholds = thresholds.detach().float().to(self._device)
        if not self.binned:
            return self._counted(thresholds)
        out = IoUCounts(self.num_units, self.num_labels, self.label_category, self.num_categories)
        edges = self.edges()
        t = thresholds.double()[:, None]
        k = torch.searchsorted(edges[:, 1:].contiguous(), t).clamp(max=edges.shape[1] - 2)
        left = torch.maximum(edges.gather(1, k), self.least.gather(1, k).double())
        right = torch.minimum(edges.gather(1, k + 1), self.most.gather(1, k).double())
        span = right - left
        above = torch.where(span > 0, (right - t) / torch.where(span > 0, span, 1.0), 0.0)
        above = torch.where(span > 0, above, (t < left).double()).clamp(0, 1)

        def at_threshold(hist):  # U × bins × C → U × C
            tail = hist.flip(1).cumsum(1).flip(1)
            tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=1)
            index = k[:, :, None].expand(-1, 1, hist.shape[2])
            return tail.gather(1, index + 1)[:, 0] + above * hist.gather(1, index)[:, 0]

        out.to(self._device)
        out.intersection = at_threshold(self.inter).clamp(min=0)
        out.unit_area = at_threshold(self.area).clamp(min=0)
        out.label_area = self.label_area.clone()
        out.count = self.count
        return out

    def _counted(self, thresholds: torch.Tensor) -> IoUCounts:
        units, labels = self.num_units, self.num_labels
        out = IoUCounts(
            units, labels, self.label_category, self.num_categories, per_image=self.per_image
        ).to(self._device)
        for part in self.parts:
            n, first = int(part["images"]), int(part["first"])
            hot = part["value"] > thresholds[part["where"] % units]
            where = part["where"][hot]
            area = torch.bincount(where, minlength=n * units).view(n, units).double()
            out.unit_area += area.t() @ part["annotated"].double()
            if not self.per_image:
                unit = where % units
                for ids in part["labels"][hot].unbind(1):
                    out.intersection += torch.bincount(
                        unit * labels + ids.long(), minlength=units * labels
                    ).view(units, labels)
                for ids in part["whole"].unbind(1):  # the unit's area in the image, per label
                    out.intersection.index_add_(1, ids, area.t())
                continue
            keys = [where * labels + ids.long() for ids in part["labels"][hot].unbind(1)]
            keys = torch.cat(keys) if keys else where[:0]
            keys = keys[keys % labels != 0]  # (image·U + unit)·L + label
            values = [torch.ones(len(keys), dtype=torch.float64, device=keys.device)]
            whole = part["whole"]
            which, s = whole.nonzero(as_tuple=True)
            row, unit = area[which].nonzero(as_tuple=True)
            keys = torch.cat(
                [keys, (which[row] * units + unit) * labels + whole[which[row], s[row]]]
            )
            values.append(area[which[row], unit])  # the unit's area in the image, per label
            keys, slot = torch.unique(keys, return_inverse=True)
            hits = torch.zeros(len(keys), dtype=torch.float64, device=keys.device)
            hits.index_add_(0, slot, torch.cat(values))
            image, key = keys // (units * labels), keys % (units * labels)
            out.intersection.view(-1).index_add_(0, key, hits)
            out._images["inter_index"].append(torch.stack([image + first, key]).cpu())
            out._images["inter_value"].append(hits.float().cpu())
            out._images["unit_area"].append(area.float().cpu())
            out._images["label_area"].append(part["label_area"].cpu())
            out._images["annotated"].append(part["annotated"].cpu())
        out.intersection[:, 0] = 0
        out.label_area = self.label_area.clone()
        out.count = self.count
        return out

    # -- streaming --------------------------------------------------------------------------

    def merge(self, other: DeferredIoU) -> None:
        """Fold in counts over other images (a shard), as if this had seen them after its
        own; a shard binned over another window is re-binned onto this one's."""
        if (other.num_units, other.num_labels, other.bins) != (
            self.num_units,
            self.num_labels,
            self.bins,
        ) or not torch.equal(other.label_category, self.label_category):
            raise ValueError("cannot merge deferred IoU counts of another layer or label set")
        if self.per_image and other.binned:
            raise ValueError("cannot merge binned counts into ones kept per image")
        if other.low is None:
            self.label_area += other.label_area.to(self._device)
            self.count += other.count
            return
        if self.low is None:
            self.to(other._device)
            self.low, self.width = other.low.clone(), other.width.clone()
        self.top = torch.maximum(self.top, other.top.to(self._device))
        self.dropped = torch.maximum(self.dropped, other.dropped.to(self._device))
        if other.binned:
            if not self.binned:
                self._bin_all()
            theirs = other.edges().to(self._device)
            move = _spread(theirs, self.edges())
            self.inter += torch.bmm(move, other.inter.to(self._device))
            self.area += torch.bmm(move, other.area.to(self._device))
            least, most = _ranges(
                move, other.least.to(self._device), other.most.to(self._device), self.edges()
            )
            self.least, self.most = torch.minimum(self.least, least), torch.maximum(self.most, most)
        self.label_area += other.label_area.to(self._device)
        for part in other.parts:
            part = {k: v.to(self._device) for k, v in part.items()}
            part["first"] = part["first"] + self.count
            self._take(part)
        self.count += other.count

    def to(self, device) -> DeferredIoU:
        self._device = torch.device(device)
        for key in ("inter", "area", "least", "most", "label_area", "width", "top", "dropped"):
            setattr(self, key, getattr(self, key).to(device))
        if self.low is not None:
            self.low = self.low.to(device)
        self.parts = [{k: v.to(device) for k, v in part.items()} for part in self.parts]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``advinterp.io.save_tensors``): the window, the bins, and the
        pixels kept (as one part)."""
        state = {
            "inter": self.inter,
            "area": self.area,
            "least": self.least,
            "most": self.most,
            "label_area": self.label_area,
            "low": self.low if self.low is not None else torch.full_like(self.width, math.nan),
            "width": self.width,
            "top": self.top,
            "dropped": self.dropped,
            "binned": torch.tensor(self.binned),
            "label_category": self.label_category,
            "count": torch.tensor(self.count, dtype=torch.int64),
        }
        if self.parts:
            whole = max(p["whole"].shape[1] for p in self.parts)
            depth = max(p["labels"].shape[1] for p in self.parts)
            state |= {
                "pixel_value": torch.cat([p["value"] for p in self.parts]),
                "pixel_where": torch.cat(
                    [p["where"] + int(p["first"]) * self.num_units for p in self.parts]
                ),
                "pixel_labels": torch.cat([_pad(p["labels"], depth) for p in self.parts]),
                "image_annotated": torch.cat([p["annotated"] for p in self.parts]),
                "image_whole": torch.cat([_pad(p["whole"], whole) for p in self.parts]),
            }
            if self.per_image:
                state["image_label_area"] = torch.cat([p["label_area"] for p in self.parts])
        return state

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            inter, area = state["inter"], state["area"]
        except KeyError as e:
            raise UserError(f"deferred IoU state lacks {e}; the checkpoint is not one") from None
        if tuple(inter.shape) != tuple(self.inter.shape) or tuple(area.shape) != tuple(
            self.area.shape
        ):
            raise UserError(
                f"deferred IoU state holds {tuple(inter.shape)} counts, expected "
                f"{tuple(self.inter.shape)}: it was saved for another layer, probe or bins"
            )
        self.inter = inter.double().clone()
        self.area = area.double().clone()
        self.least = state["least"].float().clone()
        self.most = state["most"].float().clone()
        self.label_area = state["label_area"].double().clone()
        low = state["low"].float()
        self.low = None if bool(low.isnan().any()) else low.clone()
        self.width = state["width"].float().clone()
        self.top = state["top"].float().clone()
        self.dropped = state["dropped"].float().clone()
        self.binned = bool(state["binned"])
        self.count = int(state["count"])
        self._device = self.inter.device
        self.parts = []
        if "pixel_value" in state:
            self.parts = [
                {
                    "first": torch.tensor(0),
                    "images": torch.tensor(self.count),
                    "value": state["pixel_value"].float().clone(),
                    "where": state["pixel_where"].long().clone(),
                    "labels": state["pixel_labels"].clone(),
                    "annotated": state["image_annotated"].bool().clone(),
                    "whole": state["image_whole"].long().clone(),
                }
            ]
            if "image_label_area" in state:
                self.parts[0]["label_area"] = state["image_label_area"].float().clone()
        self._kept = self._pruned_at = sum(len(p["value"]) for p in self.parts)

    load_state_dict = set_state_dict


def _ranges(move, least, most, edges) -> tuple[torch.Tensor, torch.Tensor]:
    """Each new bin's smallest and largest value after re-binning by ``move`` (``U × new ×
    old``): the old bins' ranges that reach into it, clipped to its edges."""
    reach = move > 0
    inf = torch.tensor(math.inf, device=least.device)
    low = torch.where(reach, least[:, None, :], inf).amin(2)
    high = torch.where(reach, most[:, None, :], -inf).amax(2)
    low = torch.maximum(low, edges[:, :-1].float())
    high = torch.minimum(high, edges[:, 1:].float())
    empty = low > high
    return low.masked_fill(empty, math.inf), high.masked_fill(empty, -math.inf)


def _pad(t: torch.Tensor, columns: int) -> torch.Tensor:
    """``t`` (rows × c) with zero columns added up to ``columns``."""
    return F.pad(t, (0, columns - t.shape[1])) if t.shape[1] < columns else t


def _spread(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``U × new bins × old bins``: the share of each old bin ``(a, b]`` inside each new bin,
    its counts taken as even over it; what lies below the first new edge is dropped, and a
    bin of no width (nothing above the largest value) carries nothing."""
    a, b = old[:, None, :-1], old[:, None, 1:]
    c, d = new[:, :-1, None], new[:, 1:, None]
    overlap = (torch.minimum(b, d) - torch.maximum(a, c)).clamp(min=0)
    span = b - a
    return torch.where(span > 0, overlap / torch.where(span > 0, span, 1.0), 0.0)


class Concepts:
    """A batch's concept masks, checked and laid out once for the counts of every layer.

    ``labels`` and ``annotated`` as :meth:`IoUCounts.add` takes them. Labels of an image
    not annotated in their category are zeroed, and a label repeated in a later layer of
    the same pixel (or image) too, so that it counts once. Holds ``planes`` (``N×H×W``
    pixel labels, one per segmentation layer of every pixel category), ``whole``
    (``N×S`` image-level labels of every image-level category), ``annotated`` (``N×K``),
    the masks' ``size`` (None: image-level labels only), and :meth:`label_area`.
    """

    def __init__(
        self,
        labels: Mapping[int, torch.Tensor] | torch.Tensor,
        num_labels: int,
        num_categories: int,
        annotated: Mapping[int, torch.Tensor] | torch.Tensor | None = None,
        device=None,
    ):
        first = labels if torch.is_tensor(labels) else next(iter(labels.values()), None)
        self.images = 0 if first is None else len(first)
        self.num_labels = num_labels
        device = device if device is not None else getattr(first, "device", "cpu")
        pixel, image, self.size = _split_labels(
            labels, annotated, self.images, num_labels, num_categories, device
        )
        self.annotated = torch.zeros(self.images, num_categories, dtype=torch.bool, device=device)
        self.planes: list[torch.Tensor] = []
        for category, (lab, ann) in pixel.items():
            lab = _first_occurrence(lab * ann.view(-1, 1, 1, 1))
            self.planes += [plane.contiguous() for plane in lab.unbind(1)]
            self.annotated[:, category] = ann
        whole = [torch.zeros(self.images, 0, dtype=torch.int64, device=device)]
        for category, (lab, ann) in image.items():
            whole.append(_first_occurrence(lab * ann.view(-1, 1)))
            self.annotated[:, category] = ann
        self.whole = torch.cat(whole, dim=1)
        self._areas: dict[tuple[int, int], torch.Tensor] = {}

    def label_area(self, size: tuple[int, int]) -> torch.Tensor:
        """``N×L`` float64: each image's pixels of each label (an image-level label covers
        ``size``); label 0 counts none."""
        size = tuple(size)
        if size not in self._areas:
            n, labels = self.images, self.num_labels
            rows = torch.arange(n, device=self.annotated.device)[:, None] * labels
            area = torch.zeros(n * labels, dtype=torch.float64, device=self.annotated.device)
            for plane in self.planes:
                area += torch.bincount((rows[:, :, None] + plane).reshape(-1), minlength=n * labels)
            area.index_add_(
                0,
                (rows + self.whole).reshape(-1),
                torch.full(
                    (self.whole.numel(),),
                    float(size[0] * size[1]),
                    dtype=torch.float64,
                    device=area.device,
                ),
            )
            area = area.view(n, labels)
            area[:, 0] = 0
            self._areas[size] = area
        return self._areas[size]


def _split_labels(labels, annotated, n: int, num_labels: int, num_categories: int, device):
    """A batch's labels checked and split: ``({category: (N×S×H×W labels, N annotated)}`` for
    pixel masks, the same with ``N×S`` for image-level labels, the pixel masks' size or None)."""
    if torch.is_tensor(labels):
        labels = {0: labels}
        annotated = None if annotated is None else {0: annotated}
    annotated = dict(annotated or {})
    pixel, image = {}, {}
    for category, lab in labels.items():
        if not 0 <= category < num_categories:
            raise ValueError(f"category {category} is not in 0..{num_categories - 1}")
        lab = torch.as_tensor(lab, device=device).long()
        if lab.shape[0] != n:
            raise ValueError(f"category {category}: {lab.shape[0]} label masks for {n} images")
        if lab.dim() == 3:
            lab = lab.unsqueeze(1)
        if lab.dim() not in (2, 4):
            raise ValueError(f"category {category}: labels must be N×S×H×W or N×S")
        least, most = torch.aminmax(lab) if lab.numel() else (0, 0)
        if least < 0 or most >= num_labels:
            raise ValueError(f"category {category}: label numbers outside 0..{num_labels - 1}")
        ann = annotated.get(category)
        ann = lab.flatten(1).ne(0).any(1) if ann is None else torch.as_tensor(ann).bool()
        (pixel if lab.dim() == 4 else image)[category] = (lab, ann.to(lab.device))
    sizes = {tuple(lab.shape[-2:]) for lab, _ in pixel.values()}
    if len(sizes) > 1:
        raise ValueError(f"pixel masks of one batch must share a size, got {sorted(sizes)}")
    return pixel, image, (sizes.pop() if sizes else None)


def _first_occurrence(lab: torch.Tensor) -> torch.Tensor:
    """Zero a label repeated in a later layer at the same pixel (or image), so it counts once."""
    if lab.shape[1] < 2:
        return lab
    lab = lab.clone()
    for s in range(1, lab.shape[1]):
        repeated = (lab[:, s : s + 1] == lab[:, :s]).any(1)
        lab[:, s][repeated] = 0
    return lab
