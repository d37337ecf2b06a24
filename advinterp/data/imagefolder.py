"""ImageNet-style folders named by wnid (``val/n01440764/*.JPEG``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from advinterp.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class ImageFolderSet(torch.utils.data.Dataset):
    """Images under ``root/<wnid>/``, class index taken from the model's ``wnids``.

    Items are ``(image float C×H×W in [0,1], class index, item index)``; an image
    that cannot be decoded yields ``None`` in place of the tensor, and
    :func:`advinterp.data.batches` drops and counts it. Images are resized so
    the shorter side is ``input_size / 0.875`` and centre-cropped, the usual
    ImageNet evaluation transform. Items take the classes in turn (every class's
    first image, then every class's second, …); ``limit`` keeps the first
    ``limit`` of them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        wnids: Sequence[str],
        input_size: int = 224,
        in_chans: int = 3,
        limit: int | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist")
        index = {w: i for i, w in enumerate(wnids)}
        self.root = root
        self.wnids = list(wnids)
        self.classes = list(wnids)
        self.name = f"imagefolder:{root}"
        self.skipped = 0
        by_class: list[list[tuple[Path, int]]] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if sub.name not in index:
                raise UserError(
                    f"folder {sub} is not named by a wnid of the model's label set "
                    "(expected e.g. n01440764)"
                )
            files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            by_class.append([(f, index[sub.name]) for f in files])
        # Classes in turn (each one's first image, then each one's second, ...): the first N
        # images span the classes of a folder sorted by wnid, and an item's index is the same
        # whatever the limit, so a set made with --limit pairs with the whole folder.
        rounds = itertools.zip_longest(*by_class)
        self.samples: list[tuple[Path, int]] = [s for group in rounds for s in group if s]
        if not self.samples:
            raise UserError(f"no images found under {root} (expected {root}/<wnid>/<image>.JPEG)")
        self.samples = self.samples[:limit]
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(round(input_size / 0.875), antialias=True),
                v2.CenterCrop(input_size),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                x = self.transform(im.convert(self.mode))
        except (OSError, UnidentifiedImageError, ValueError):
            return None, label, i
        return x, label, i
