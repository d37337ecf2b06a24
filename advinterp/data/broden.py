"""Probe data in Broden's layout (Bau et al. 2017), the input of Network Dissection.

A Broden folder (the ``broden1_224`` / ``broden1_227`` release, or the embedded
``fashion-broden`` probe, which is written in the same layout) holds:

- ``index.csv``: ``image, split, ih, iw, sh, sw`` then one column per category
  (``color, object, part, material, scene, texture``). A category cell lists,
  ``;``-separated, segmentation files (pixel labels) or label numbers
  (image-level labels: the concept covers the whole image).
- ``label.csv``: ``number, name, category, frequency, coverage, syns``; the
  ``category`` cell is ``color(120);object(3)``, the label's image count per
  category. A label is scored in its *primary* category, the one with the
  largest count (as NetDissect).
- ``category.csv``: ``name, first, last, count, frequency``; and
  ``c_<category>.csv``: ``code, number, name, frequency, coverage``.
- ``images/``: the images and segmentation PNGs; a pixel's label is
  ``R + 256·G``. A single-channel PNG (8-bit grey ``L``, or 16-bit ``I;16``)
  holds the label itself: it is read as R with G = 0 (a 16-bit value is the
  same number as ``R + 256·G``), never as the grey colour (v, v, v), which would
  give ``257·v``. A palette PNG is read through its palette's RGB colours.

:class:`BrodenProbe` reads it: items are ``(image, masks, index)``, ``masks``
mapping a category to an ``S×H×W`` stack of pixel labels (``S`` overlapping
segmentations) or an ``S`` vector of image-level labels. :func:`probe_batches`
batches it into the ``(images, masks)`` pairs that
:func:`advinterp.metrics.dissect.dissect` reads.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from advinterp.errors import UserError

__all__ = ["CATEGORIES", "BrodenProbe", "open_probe", "probe_batches", "collate_masks"]

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
INDEX_FIELDS = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*\((\d+)\)\s*$")


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path} not found: not a Broden-format probe folder")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in required if c not in fields]
        if missing:
            raise UserError(f"{path} lacks the column(s) {', '.join(missing)}")
        return list(reader)


def _int(value: str, path: Path, row: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"{path} row {row}: column {column} holds {value!r}, not an integer"
        ) from None


class BrodenProbe(torch.utils.data.Dataset):
    """A Broden-format probe folder (see the module doc).

    Args:
        root: the folder holding ``index.csv`` (or its parent, when that holds a
            single ``broden*`` folder).
        categories: which categories to read (default: every category of
            ``category.csv`` that has a column in ``index.csv``).
        split: keep only rows of this split (default: all rows).
        input_size, in_chans: the model's input; images are resized (bilinear,
            antialiased) to ``input_size`` and converted to grey or RGB.
        limit: keep the first ``limit`` images (after dropping rows with no
            annotation in the chosen categories).

    Attributes: ``labels`` (names by number; ``labels[0] = "-"``),
    ``categories`` (category → its primary label numbers), ``mask_size``
    (segmentations are resized, nearest, to the first row's ``sh×sw``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        categories: Sequence[str] | None = None,
        split: str | None = None,
        input_size: int | None = None,
        in_chans: int = 3,
        limit: int | None = None,
    ):
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UserError(
                f"probe {root} is a file: give the probe's folder (the one holding index.csv)"
            )
        if not root.is_dir():
            raise UserError(f"probe folder {root} does not exist")
        if not (root / "index.csv").is_file():
            inner = sorted(p for p in root.glob("broden*") if (p / "index.csv").is_file())
            if len(inner) != 1:
                raise UserError(
                    f"{root}/index.csv not found: not a Broden-format probe folder "
                    "(expected index.csv, label.csv, category.csv, c_*.csv, images/)"
                )
            root = inner[0]
        self.root = root
        self.name = f"broden:{root}"
        self._read_labels()
        category_rows = _read_csv(root / "category.csv", ("name",))
        index_path = root / "index.csv"
        rows = _read_csv(index_path, INDEX_FIELDS)
        if not rows:
            raise UserError(f"{index_path} lists no images (it has only a header)")
        columns = [c["name"] for c in category_rows if c["name"] in rows[0]]
        if categories is None:
            categories = columns
        unknown = [c for c in categories if c not in columns]
        if unknown:
            raise UserError(
                f"{root}: no category {', '.join(unknown)} in category.csv and index.csv "
                f"(it has {', '.join(columns) or 'none'})"
            )
        self.category_names = list(categories)
        for name in self.category_names:
            _read_csv(root / f"c_{name}.csv", ("code", "number", "name"))
        self.categories = {
            name: [n for n, primary in enumerate(self._primary) if primary == name]
            for name in self.category_names
        }
        self.rows: list[dict] = []
        for line, row in enumerate(rows, start=2):
            if split is not None and row["split"] != split:
                continue
            entry = {"image": row["image"], "line": line}
            for key in ("ih", "iw", "sh", "sw"):
                entry[key] = _int(row[key], index_path, line, key)
                if entry[key] < 1:
                    raise UserError(
                        f"{index_path} row {line}: column {key} holds {entry[key]}, "
                        "not a size of at least 1"
                    )
            annotated = False
            for name in self.category_names:
                items: list[int | str] = []
                for cell in (row.get(name) or "").split(";"):
                    cell = cell.strip()
                    if not cell:
                        continue
                    if cell.isdigit():
                        number = int(cell)
                        if not (0 < number < len(self.labels) and self._known[number]):
                            raise UserError(
                                f"{index_path} row {line}: {name} label {number} is not in "
                                f"label.csv (1..{len(self.labels) - 1})"
                            )
                        items.append(number)
                    else:
                        items.append(cell)
                entry[name] = items
                annotated |= bool(items)
            if annotated:
                self.rows.append(entry)
            if limit is not None and len(self.rows) >= limit:
                break
        if not self.rows:
            raise UserError(f"{index_path}: no image is annotated in {', '.join(categories)}")
        self.mask_size = (self.rows[0]["sh"], self.rows[0]["sw"])
        self.input_size = input_size or self.rows[0]["ih"]
        self.in_chans = in_chans
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((self.input_size, self.input_size), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def _read_labels(self) -> None:
        path = self.root / "label.csv"
        rows = _read_csv(path, ("number", "name", "category"))
        numbers = [_int(r["number"], path, line, "number") for line, r in enumerate(rows, 2)]
        size = max(numbers, default=0) + 1
        self.labels = ["-"] * size
        self._known = torch.zeros(size, dtype=torch.bool)
        self._known[0] = True
        self._primary: list[str | None] = [None] * size
        for line, (number, row) in enumerate(zip(numbers, rows, strict=True), start=2):
            if number < 1:
                raise UserError(f"{path} row {line}: label numbers start at 1 (0 means none)")
            self.labels[number] = row["name"]
            self._known[number] = True
            counts = []
            for part in (row["category"] or "").split(";"):
                if not part.strip():
                    continue
                match = _CATEGORY_COUNT.match(part)
                if match is None:
                    raise UserError(
                        f"{path} row {line}: category {part!r} is not of the form name(count)"
                    )
                counts.append((int(match.group(2)), match.group(1)))
            if counts:
                # The largest count wins; ties go to the first listed.
                self._primary[number] = max(counts, key=lambda c: c[0])[1]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as a float ``C×H×W`` tensor in [0, 1]."""
        path = self.root / "images" / self.rows[i]["image"]
        try:
            with Image.open(path) as im:
                return self.transform(im.convert(self.mode))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(
                f"{path} (index.csv row {self.rows[i]['line']}) cannot be read: {e}"
            ) from None

    def masks(self, i: int) -> dict[str, torch.Tensor]:
        """Image ``i``'s labels per category: ``S×H×W`` pixel labels when any
        segmentation is given (image-level labels then fill whole layers), else
        an ``S`` vector of image-level labels; empty (``S = 0``) when unannotated."""
        row = self.rows[i]
        out = {}
        for name in self.category_names:
            items = row[name]
            if any(isinstance(it, str) for it in items):
                layers = [
                    self._segmentation(it, row)
                    if isinstance(it, str)
                    else torch.full(self.mask_size, it, dtype=torch.int64)
                    for it in items
                ]
                out[name] = torch.stack(layers)
            else:
                out[name] = torch.tensor(items, dtype=torch.int64)
        return out

    def _segmentation(self, file: str, row: dict) -> torch.Tensor:
        path = self.root / "images" / file
        try:
            with Image.open(path) as im:
                if im.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
                    # A single channel is the label itself (R with G = 0; a 16-bit
                    # value equals R + 256·G), not a grey colour (v, v, v).
                    label = torch.from_numpy(np.array(im).astype(np.int64))
                else:
                    rgb = torch.from_numpy(np.array(im.convert("RGB")))
                    label = rgb[..., 0].long() + 256 * rgb[..., 1].long()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"{path} (index.csv row {row['line']}) cannot be read: {e}") from None
        if label.dim() != 2 or bool((label < 0).any()):
            raise UserError(
                f"{path} (index.csv row {row['line']}) is not a segmentation "
                "(expected one label per pixel, R + 256·G)"
            )
        present = label.unique()
        unknown = present[
            (present >= len(self.labels)) | ~self._known[present.clamp(max=len(self.labels) - 1)]
        ]
        if len(unknown):
            raise UserError(
                f"{path} (index.csv row {row['line']}) holds label {int(unknown[0])}, "
                "not in label.csv"
            )
        if tuple(label.shape) != self.mask_size:
            label = F.interpolate(label[None, None].float(), size=self.mask_size, mode="nearest")
            label = label[0, 0].long()
        return label

    def __getitem__(self, i: int):
        return self.image(i), self.masks(i), i


def collate_masks(
    items: Sequence[dict[str, torch.Tensor]], size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Stack per-image masks into a batch: per category ``N×S×H×W`` when any image
    has a segmentation in it (image-level labels fill whole layers), else ``N×S``;
    ``S`` is padded with 0 (no label)."""
    out = {}
    for name in items[0]:
        parts = [it[name] for it in items]
        depth = max(p.shape[0] for p in parts)
        if depth == 0:
            out[name] = torch.zeros(len(parts), 0, dtype=torch.int64)
            continue
        if any(p.dim() == 3 for p in parts):
            batch = torch.zeros(len(parts), depth, *size, dtype=torch.int64)
            for k, p in enumerate(parts):
                if p.dim() == 1:
                    p = p.view(-1, 1, 1).expand(-1, *size)
                batch[k, : p.shape[0]] = p
        else:
            batch = torch.zeros(len(parts), depth, dtype=torch.int64)
            for k, p in enumerate(parts):
                batch[k, : p.shape[0]] = p
        out[name] = batch
    return out


class _ProbeLoader:
    """Re-iterable batches of a probe: each ``iter`` is a fresh pass."""

    def __init__(self, probe: BrodenProbe, batch_size: int, workers: int):
        self.probe = probe
        self.batch_size = batch_size
        self.workers = workers

    def __len__(self) -> int:
        return -(-len(self.probe) // self.batch_size)

    def _collate(self, items):
        x = torch.stack([it[0] for it in items])
        masks = collate_masks([it[1] for it in items], self.probe.mask_size)
        return x, masks

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        yield from self._load(self.probe)

    def numbered(
        self, numbers: Sequence[int]
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Batches ``numbers`` (ascending) of a pass, batch ``i`` holding images
        ``i·B … (i+1)·B − 1``: only those images read (a share of a pass, see
        :class:`~advinterp.tally.Tally`)."""
        n, b = len(self.probe), self.batch_size
        rows = [j for i in numbers for j in range(i * b, min((i + 1) * b, n))]
        if rows:
            yield from self._load(torch.utils.data.Subset(self.probe, rows))

    def _load(self, dataset) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        yield from torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=self._collate,
            pin_memory=torch.cuda.is_available(),
        )


def probe_batches(probe: BrodenProbe, batch_size: int = 100, workers: int = 0) -> _ProbeLoader:
    """``(images N×C×H×W, {category: masks})`` batches of ``probe``, re-iterable
    (its length tells the dissection how many values each unit will see); ``workers`` decoding processes (0: none)."""
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(
            f"the number of workers must be 0 (decode in this process) or more, got {workers}"
        )
    return _ProbeLoader(probe, batch_size, workers)


def open_probe(spec: str, model, size: int = 3000, seed: int = 0, **kwargs) -> BrodenProbe:
    """``"fashion-broden"`` (the embedded probe of ``size`` images, written to the
    cache on first use) or a Broden folder, read at ``model``'s input size and channels."""
    from advinterp.data.fashion_broden import fashion_broden

    root = fashion_broden(n=size, seed=seed) if spec == "fashion-broden" else spec
    return BrodenProbe(root, input_size=model.input_size, in_chans=model.in_chans, **kwargs)
