"""The embedded dissection probe: Fashion-MNIST items on textured backgrounds, in Broden's layout.

Network Dissection needs images with pixel masks of concepts. Offline, with no
Broden download, we make them: each probe image is a Fashion-MNIST test item,
shrunk to a random size and placed at a random spot on a procedurally drawn
texture. Three categories are annotated per pixel:

- ``object``: the item's class (10 labels) over its silhouette (the item's
  pixels above 0.1, holes filled);
- ``texture``: the background's family (12 labels: stripes at 0°, 90°, 45° and
  135°, checks, dots, grid, crosshatch, zigzag, waves, blotches, noise) over the
  textured part of the background, a random rectangle at least half the image
  wide and high, in low-contrast greys (the rest stays black). Half of the
  images keep Fashion-MNIST's plain black background and have no texture
  label: the model also sees the data it was trained on, so that its object
  units are not drowned by texture responses;
- ``color``: the image is grey, so four intensity bands (black, dark-grey,
  light-grey, white: the quartiles of [0, 1]) over every pixel.

The folder is written in Broden's own layout (``index.csv``, ``label.csv``,
``category.csv``, ``c_<category>.csv``, ``images/``; segmentation PNGs hold the
label in ``R + 256·G``) and read back by :class:`advinterp.data.broden.BrodenProbe`,
the same loader a real Broden download goes through. The same seed gives the
same probe, byte for byte.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from advinterp.data.fashion import CLASSES as FASHION_CLASSES
from advinterp.data.fashion import load_fashion_mnist
from advinterp.errors import UserError
from advinterp.io import cache_dir, read_json, write_json
from advinterp.progress import progress as tqdm

__all__ = ["COLORS", "TEXTURES", "draw_texture", "fashion_broden", "write_fashion_broden"]

NAME = "fashion-broden"
FORMAT = 2
COLORS = ("black", "dark-grey", "light-grey", "white")
TEXTURES = (
    "striped-horizontal",
    "striped-vertical",
    "striped-diagonal",
    "striped-antidiagonal",
    "checkered",
    "dotted",
    "grid",
    "crosshatch",
    "zigzag",
    "waves",
    "blotchy",
    "noise",
)
OBJECTS = tuple(name for name, _ in FASHION_CLASSES)
_SILHOUETTE = 0.1
# Share of images left on a plain black background, as Fashion-MNIST's own.
_PLAIN = 0.5


def _label_numbers() -> dict[str, dict[str, int]]:
    numbers, n = {}, 1
    for category, names in (("color", COLORS), ("object", OBJECTS), ("texture", TEXTURES)):
        numbers[category] = {}
        for name in names:
            numbers[category][name] = n
            n += 1
    return numbers


def draw_texture(kind: str, size: int, gen: torch.Generator) -> torch.Tensor:
    """A ``size×size`` texture of family ``kind`` in [0, 1], period, phase and contrast
    drawn from ``gen``."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    period = randint(4, 7)
    phase = randint(0, period - 1)
    if kind == "striped-horizontal":
        on = (yy + phase) % period < period / 2
    elif kind == "striped-vertical":
        on = (xx + phase) % period < period / 2
    elif kind == "striped-diagonal":
        on = (xx + yy + phase) % period < period / 2
    elif kind == "striped-antidiagonal":
        on = (xx - yy + phase) % period < period / 2
    elif kind == "checkered":
        cell = randint(3, 5)
        on = ((xx + phase) // cell + (yy + phase) // cell) % 2 == 0
    elif kind == "dotted":
        dy, dx = (yy + phase) % period - period / 2, (xx + phase) % period - period / 2
        on = dy * dy + dx * dx <= (period / 3.5) ** 2 + 0.5
    elif kind == "grid":
        on = ((yy + phase) % period == 0) | ((xx + phase) % period == 0)
    elif kind == "crosshatch":
        on = ((xx + yy + phase) % period == 0) | ((xx - yy + phase) % period == 0)
    elif kind == "zigzag":
        tooth = (xx % (2 * period) - period).abs()
        on = (yy + tooth + phase) % (period + 2) < (period + 2) / 2
    elif kind == "waves":
        wave = 2.0 * torch.sin(2 * torch.pi * xx / (2 * period + 2))
        on = (yy + wave + phase) % period < period / 2
    elif kind == "blotchy":
        coarse = torch.rand(1, 1, size // 4 + 1, size // 4 + 1, generator=gen)
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        on = smooth[0, 0] > 0.5
    elif kind == "noise":
        on = None
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {', '.join(TEXTURES)}")
    lo = 0.15 * float(torch.rand((), generator=gen))
    hi = 0.3 + 0.3 * float(torch.rand((), generator=gen))
    if on is None:
        return lo + (hi - lo) * torch.rand(size, size, generator=gen)
    return torch.where(on, hi, lo).float()


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill enclosed holes of boolean ``N×H×W`` masks: background is what the
    border reaches through non-mask pixels."""
    free = ~mask
    reach = torch.zeros_like(mask)
    reach[:, 0, :], reach[:, -1, :], reach[:, :, 0], reach[:, :, -1] = (
        free[:, 0, :],
        free[:, -1, :],
        free[:, :, 0],
        free[:, :, -1],
    )
    while True:
        grown = F.max_pool2d(reach[:, None].float(), 3, 1, 1)[:, 0].bool() & free
        if torch.equal(grown, reach):
            return ~reach
        reach = grown


def compose(
    items: torch.Tensor, classes: torch.Tensor, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Composite uint8 ``N×1×28×28`` items onto textures: ``(images N×size×size
    float, {category: N×size×size label masks})``."""
    numbers = _label_numbers()
    n = len(items)
    images = torch.empty(n, size, size)
    object_mask = torch.zeros(n, size, size, dtype=torch.int64)
    texture_mask = torch.zeros(n, size, size, dtype=torch.int64)
    kinds = torch.randint(len(TEXTURES), (n,), generator=gen)
    plain = torch.rand(n, generator=gen)
    scales = torch.randint(2 * size // 3, size + 1, (n,), generator=gen)
    for i in range(n):
        s = int(scales[i])
        item = F.interpolate(
            items[i : i + 1].float() / 255, size=(s, s), mode="bilinear", antialias=True
        )[0, 0]
        silhouette = _fill_holes((item > _SILHOUETTE)[None])[0]
        oy = int(torch.randint(0, size - s + 1, (1,), generator=gen))
        ox = int(torch.randint(0, size - s + 1, (1,), generator=gen))
        kind = TEXTURES[int(kinds[i])]
        # The texture fills a random rectangle of at least half the side; the rest
        # stays black, as Fashion-MNIST's own background.
        th, tw = (int(v) for v in torch.randint(size // 2, size + 1, (2,), generator=gen))
        ty = int(torch.randint(0, size - th + 1, (1,), generator=gen))
        tx = int(torch.randint(0, size - tw + 1, (1,), generator=gen))
        region = torch.zeros(size, size, dtype=torch.bool)
        region[ty : ty + th, tx : tx + tw] = bool(plain[i] >= _PLAIN)
        canvas = torch.where(region, draw_texture(kind, size, gen), 0.0)
        window = canvas[oy : oy + s, ox : ox + s]
        window[silhouette] = item[silhouette]
        images[i] = canvas
        placed = torch.zeros(size, size, dtype=torch.bool)
        placed[oy : oy + s, ox : ox + s] = silhouette
        object_mask[i][placed] = numbers["object"][OBJECTS[int(classes[i])]]
        texture_mask[i][region & ~placed] = numbers["texture"][kind]
    images = (images * 255).round().clamp(0, 255) / 255  # what the 8-bit PNG will hold
    band = (images * len(COLORS)).long().clamp(max=len(COLORS) - 1)
    color_mask = band + numbers["color"][COLORS[0]]
    return images, {"color": color_mask, "object": object_mask, "texture": texture_mask}


def _label_png(mask: torch.Tensor) -> Image.Image:
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    m = mask.numpy()
    rgb[..., 0] = m % 256
    rgb[..., 1] = m // 256
    return Image.fromarray(rgb, "RGB")


def write_fashion_broden(
    out: str | os.PathLike,
    n: int = 3000,
    seed: int = 0,
    size: int = 28,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write the probe (``n`` images of ``size×size``) to ``out`` in Broden's layout.

    The folder appears whole or not at all (written beside ``out``, then renamed).
    ``root`` is Fashion-MNIST's folder (default: Debian's).
    """
    if n < 1:
        raise UserError(f"the probe needs at least one image (got {n})")
    if size < 16:
        raise UserError(f"probe images must be at least 16 pixels wide (got {size})")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists")
    items, labels = load_fashion_mnist("test", root)
    gen = torch.Generator().manual_seed(seed)
    pick = (
        torch.randperm(len(labels), generator=gen)[:n]
        if n <= len(labels)
        else torch.randint(len(labels), (n,), generator=gen)
    )
    images, masks = compose(items[pick], labels[pick], size, gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_layout(tmp, images, masks, progress)
        write_json(
            tmp / "probe.json",
            {"name": NAME, "format": FORMAT, "n": n, "seed": seed, "size": size},
        )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_layout(folder: Path, images, masks, progress: bool) -> None:
    numbers = _label_numbers()
    n, size = images.shape[0], images.shape[-1]
    (folder / "images" / "fashion").mkdir(parents=True)
    index = []
    pixels = {cat: torch.zeros(max(v.values()) + 1) for cat, v in numbers.items()}
    images_with = {cat: torch.zeros(max(v.values()) + 1) for cat, v in numbers.items()}
    for i in tqdm(range(n), desc="fashion-broden: writing", disable=not progress):
        stem = f"fashion/{i:05d}"
        Image.fromarray((images[i] * 255).round().byte().numpy(), "L").save(
            folder / "images" / f"{stem}.png"
        )
        row = {"image": f"{stem}.png", "split": "train", "ih": size, "iw": size}
        row.update({"sh": size, "sw": size})
        for cat in ("color", "object", "part", "material", "scene", "texture"):
            row[cat] = ""
        for cat, mask in masks.items():
            _label_png(mask[i]).save(folder / "images" / f"{stem}_{cat}.png")
            row[cat] = f"{stem}_{cat}.png"
            counts = torch.bincount(mask[i].flatten(), minlength=len(pixels[cat])).float()
            pixels[cat] += counts[: len(pixels[cat])]
            images_with[cat] += (counts[: len(pixels[cat])] > 0).float()
        index.append(row)
    _write_csv(folder / "index.csv", list(index[0]), index)
    label_rows, category_rows = [], []
    for cat, names in numbers.items():
        rows = []
        for code, (name, number) in enumerate(names.items(), start=1):
            freq = int(images_with[cat][number])
            coverage = float(pixels[cat][number]) / (n * size * size)
            label_rows.append(
                {
                    "number": number,
                    "name": name,
                    "category": f"{cat}({freq})",
                    "frequency": freq,
                    "coverage": f"{coverage:.6f}",
                    "syns": name,
                }
            )
            rows.append(
                {
                    "code": code,
                    "number": number,
                    "name": name,
                    "frequency": freq,
                    "coverage": f"{coverage:.6f}",
                }
            )
        _write_csv(folder / f"c_{cat}.csv", list(rows[0]), rows)
        category_rows.append(
            {
                "name": cat,
                "first": min(names.values()),
                "last": max(names.values()),
                "count": len(names),
                "frequency": n,
            }
        )
    _write_csv(folder / "label.csv", list(label_rows[0]), label_rows)
    _write_csv(folder / "category.csv", list(category_rows[0]), category_rows)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def fashion_broden(n: int = 3000, seed: int = 0, size: int = 28, progress: bool = True) -> Path:
    """The embedded probe's folder in the cache, written on first use."""
    folder = cache_dir() / f"{NAME}-v{FORMAT}-n{n}-seed{seed}-{size}px"
    marker = folder / "probe.json"
    if marker.is_file():
        meta = read_json(marker)
        if meta.get("n") == n and meta.get("seed") == seed and meta.get("size") == size:
            return folder
        raise UserError(f"{folder} holds another probe: remove it")
    if folder.exists():
        raise UserError(f"{folder} is an incomplete probe (no probe.json): remove it")
    try:
        return write_fashion_broden(folder, n=n, seed=seed, size=size, progress=progress)
    except OSError:
        if marker.is_file():  # another process wrote it first
            return folder
        raise
