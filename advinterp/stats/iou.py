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

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from advinterp.errors import UserError

__all__ = ["IoUCounts", "unit_masks"]

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
        if torch.is_tensor(labels):
            labels = {0: labels}
            annotated = None if annotated is None else {0: annotated}
        annotated = dict(annotated or {})
        if not self._placed:
            self.to(maps.device)
        n = maps.shape[0]
        pixel = {}
        image = {}
        for category, lab in labels.items():
            if not 0 <= category < self.num_categories:
                raise ValueError(f"category {category} is not in 0..{self.num_categories - 1}")
            lab = torch.as_tensor(lab, device=self.intersection.device).long()
            if lab.shape[0] != n:
                raise ValueError(f"category {category}: {lab.shape[0]} label masks for {n} images")
            if lab.dim() == 3:
                lab = lab.unsqueeze(1)
            if lab.dim() not in (2, 4):
                raise ValueError(f"category {category}: labels must be N×S×H×W or N×S")
            if (lab < 0).any() or (lab >= self.num_labels).any():
                raise ValueError(
                    f"category {category}: label numbers outside 0..{self.num_labels - 1}"
                )
            ann = annotated.get(category)
            ann = lab.flatten(1).ne(0).any(1) if ann is None else torch.as_tensor(ann).bool()
            (pixel if lab.dim() == 4 else image)[category] = (lab, ann.to(lab.device))
        sizes = {tuple(lab.shape[-2:]) for lab, _ in pixel.values()}
        if len(sizes) > 1:
            raise ValueError(f"pixel masks of one batch must share a size, got {sorted(sizes)}")
        size = sizes.pop() if sizes else tuple(maps.shape[-2:])
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
        inside = _sparse_nonzero(masks, _SPARSE)
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
        """Tensors only, so ``advinterp.io.save_tensors`` can write it (the totals: per-image
        counts are not saved)."""
        return {
            "intersection": self.intersection,
            "label_area": self.label_area,
            "unit_area": self.unit_area,
            "label_category": self.label_category,
            "count": torch.tensor(self.count, dtype=torch.int64),
        }

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


def _sparse_nonzero(mask: torch.Tensor, share: float) -> torch.Tensor | None:
    """Flat indices of the True elements of a contiguous boolean tensor, or ``None`` when
    more than ``share`` of its 8-element words hold one (then it is not sparse).

    ``nonzero`` reads every element twice; reading the tensor as int64 words first and
    only the few nonzero words bit by bit is several times faster on a sparse mask."""
    flat = mask.reshape(-1)
    bulk = flat.numel() // 8 * 8
    words = flat[:bulk].view(torch.int64).nonzero().squeeze(1)
    if words.numel() > share * max(1, bulk // 8):
        return None
    word, bit = flat[:bulk].view(-1, 8)[words].nonzero(as_tuple=True)
    tail = flat[bulk:].nonzero().squeeze(1) + bulk
    return torch.cat([words[word] * 8 + bit, tail])


def _first_occurrence(lab: torch.Tensor) -> torch.Tensor:
    """Zero a label repeated in a later layer at the same pixel (or image), so it counts once."""
    if lab.shape[1] < 2:
        return lab
    lab = lab.clone()
    for s in range(1, lab.shape[1]):
        repeated = (lab[:, s : s + 1] == lab[:, :s]).any(1)
        lab[:, s][repeated] = 0
    return lab
