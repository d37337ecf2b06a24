"""Labelled image sets in pixel space [0, 1], each class carrying its WordNet synset.

``open_dataset("fashion-mnist", split)`` reads Debian's Fashion-MNIST files;
``open_dataset("imagefolder:PATH", wnids=model_wnids)`` reads ImageNet-style
folders named by wnid. :func:`batches` iterates either one in batches;
:func:`decoded_batches` decodes given batches of an image folder's items.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from advinterp.data.fashion import CLASSES as FASHION_CLASSES
from advinterp.data.fashion import load_fashion_mnist
from advinterp.data.imagefolder import ImageFolderSet
from advinterp.data.specs import DatasetSpec, check_model_fits, dataset_spec
from advinterp.errors import UserError

__all__ = [
    "DatasetSpec",
    "FASHION_CLASSES",
    "ImageFolderSet",
    "TensorImageSet",
    "batches",
    "check_model_fits",
    "dataset_spec",
    "decoded_batches",
    "open_dataset",
]


@dataclass
class TensorImageSet(torch.utils.data.Dataset):
    """An in-memory set: uint8 images ``N×C×H×W`` and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    wnids: list[str]
    name: str = "tensors"
    skipped: int = field(default=0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float().div_(255), int(self.labels[i]), i

    def subset(self, limit: int | None) -> TensorImageSet:
        """The first ``limit`` images (all of them when ``limit`` is None or larger)."""
        if limit is not None and limit < 1:  # a negative slice would drop the last images
            raise UserError(f"limit must be at least 1, got {limit}")
        if limit is None or limit >= len(self):
            return self
        return TensorImageSet(
            self.images[:limit], self.labels[:limit], self.classes, self.wnids, self.name
        )


def open_dataset(
    spec: str,
    split: str = "test",
    root: str | os.PathLike | None = None,
    wnids: Sequence[str] | None = None,
    input_size: int = 224,
    in_chans: int = 3,
    limit: int | None = None,
    model=None,
):
    """Open a labelled image set by name.

    Args:
        spec: ``"fashion-mnist"`` or ``"imagefolder:PATH"`` (see :mod:`advinterp.data.specs`).
        split: ``"train"`` or ``"test"`` (Fashion-MNIST only).
        root: folder of Fashion-MNIST's IDX files (default: Debian's).
        wnids: the model's class list, class index ↔ wnid (image folders only).
        input_size, in_chans: what the model eats (image folders only).
        limit: keep the first ``limit`` images (handy for quick runs).
        model: the model that will read the set: it is checked against the
            dataset's spec (channels, size, classes; one clear error before any
            work) and gives ``wnids``, ``input_size`` and ``in_chans``.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if spec == "imagenet":
        raise UserError(
            "ImageNet is not shipped: point at your copy laid out by wnid, "
            "e.g. --data imagefolder:/data/imagenet/val"
        )
    info = dataset_spec(spec)
    if model is not None:
        check_model_fits(model, info)
        wnids, input_size, in_chans = model.wnids, model.input_size, model.in_chans
    if spec == "fashion-mnist":
        x, y = load_fashion_mnist(split, root)
        return TensorImageSet(
            x, y, list(info.classes), list(info.wnids), f"fashion-mnist/{split}"
        ).subset(limit)
    if wnids is None:
        raise UserError(f"{spec} needs a model with a wnid label set (an ImageNet model)")
    return ImageFolderSet(
        spec.split(":", 1)[1], wnids, input_size=input_size, in_chans=in_chans, limit=limit
    )


def batches(
    dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images float [0,1], labels, dataset indices)`` batches.

    In-memory sets are sliced directly (no per-item Python work); image folders
    go through a DataLoader and drop undecodable images, warning once at the end
    with their count. For image folders, ``workers`` processes decode ahead of the
    model and ``pin_memory`` gives page-locked batches (set it when the model is
    on a GPU: the copy to it is then asynchronous).
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if isinstance(dataset, TensorImageSet):
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield dataset.images[idx].float().div_(255), dataset.labels[idx], idx
        return
    order = order.tolist()
    index_batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    skipped = 0
    for x, y, idx, bad in decoded_batches(dataset, index_batches, workers, pin_memory):
        skipped += bad
        if len(y):
            yield x, y, idx
    if skipped:
        dataset.skipped = skipped
        warnings.warn(f"skipped {skipped} image(s) that could not be decoded", stacklevel=2)


def decoded_batches(
    dataset,
    index_batches: Sequence[Sequence[int]],
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Decode the items ``index_batches`` lists of an image folder, batch by batch, in order.

    Yields ``(images, labels, item indices, undecodable)`` per batch: images that
    cannot be decoded are left out and counted (a batch may come out empty).
    ``workers`` processes decode ahead of the caller; ``pin_memory`` gives
    page-locked batches for an asynchronous copy to a GPU.
    """
    yield from torch.utils.data.DataLoader(
        dataset,
        batch_sampler=index_batches,
        num_workers=workers,
        collate_fn=_collate_decodable,
        pin_memory=pin_memory,
    )


def _collate_decodable(items):
    good = [it for it in items if it[0] is not None]
    bad = len(items) - len(good)
    if not good:
        return (
            torch.empty(0),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            bad,
        )
    x = torch.stack([it[0] for it in good])
    y = torch.tensor([it[1] for it in good], dtype=torch.long)
    idx = torch.tensor([it[2] for it in good], dtype=torch.long)
    return x, y, idx, bad
