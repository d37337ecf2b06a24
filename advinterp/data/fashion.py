"""Fashion-MNIST read from IDX files (Debian's ``dataset-fashion-mnist``), no download."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from advinterp.errors import UserError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Class index -> (name, WordNet 3.0 noun synset id).
CLASSES: list[tuple[str, str]] = [
    ("T-shirt/top", "n03595614"),  # jersey, T-shirt, tee shirt
    ("Trouser", "n04489008"),
    ("Pullover", "n04021028"),
    ("Dress", "n03236735"),
    ("Coat", "n03057021"),
    ("Sandal", "n04133789"),
    ("Shirt", "n04197391"),
    ("Sneaker", "n03472535"),  # gym shoe, sneaker, tennis shoe
    ("Bag", "n02774152"),
    ("Ankle boot", "n02872752"),
]

# Pixel statistics of the training split (images in [0, 1]).
MEAN, STD = (0.2860,), (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_INSTALL_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass --data-root to a folder holding the IDX files"
)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}[.gz] not found in {root}: {_INSTALL_HINT}")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) of unsigned bytes, checking its header."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} is truncated or not a valid gzip file ({e}); reinstall it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path} has a truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UserError(
            f"{path} is truncated or corrupt: header announces {expected} bytes of data "
            f"for shape {shape}, file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: str = "test", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``N×1×28×28`` and int64 ``N``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000).
    """
    if split not in _FILES:
        raise UserError(f"unknown split {split!r}: choose 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST folder {root} does not exist: {_INSTALL_HINT}")
    img_stem, lbl_stem, _ = _FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(
            f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, labels {labels.shape}"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise UserError(f"Fashion-MNIST {split} labels in {root} hold a class ≥ {len(CLASSES)}")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
