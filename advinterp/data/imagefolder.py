"""ImageNet-style folders named by wnid (``val/n01440764/*.JPEG``)."""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
    ``limit`` of them. :meth:`augmented` gives the same images with ImageNet's
    training augmentation instead.
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
        self.input_size = input_size
        self.draws: tuple[int, int] | None = None  # (seed, epoch) of augmented()
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

    def augmented(self, seed: int, epoch: int, flip: bool = True) -> ImageFolderSet:
        """These images with ImageNet's training augmentation, for epoch ``epoch``.

        Each image is cropped to a random 8–100% of its area at an aspect ratio in
        [3/4, 4/3], resized to ``input_size`` (torchvision's ``RandomResizedCrop``),
        and with ``flip`` mirrored left-right with probability 1/2. The draws of
        item ``i`` come from a generator seeded by ``(seed, epoch, i)`` alone, so an
        image gets the same crop whichever process or DataLoader worker decodes it,
        and another one each epoch.
        """
        view = copy.copy(self)
        steps = [v2.ToImage(), v2.RandomResizedCrop(self.input_size, antialias=True)]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        view.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
        view.draws = (seed, epoch)
        return view

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if self.draws is None:
                    x = self.transform(im)
                else:
                    # torchvision's random transforms draw from the global generator:
                    # seed it for this item, and leave it as it was for the caller.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(item_seed(*self.draws, i))
                        x = self.transform(im)
        except (OSError, UnidentifiedImageError, ValueError):
            return None, label, i
        return x, label, i


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for the random draws of item ``index`` in epoch ``epoch`` of a run
    seeded ``seed`` (NumPy's ``SeedSequence`` mixes the three, so nearby items are unrelated)."""
    entropy = [seed % 2**64, epoch, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
