"""Fixtures of the ImageNet path: real photos at 224², efficientnet_lite0's real weights, and a
224² probe in Broden's layout, all built offline from the photos that scikit-image and
scikit-learn ship.

Everything here is independent of advinterp's own loaders: the reference images are decoded
with PIL and resized here, the ImageNet class list comes from timm, so the tests compare the
verbs against a second computation rather than against themselves.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

# Each photo with the ImageNet-1k class that names what it shows (and that
# efficientnet_lite0 puts in its top 5 for the uncropped photo).
PHOTOS = {
    "chelsea": "n02123045",  # tabby, tabby cat (class 281)
    "coffee": "n07920052",  # espresso (967)
    "rocket": "n03773504",  # missile (657)
    "china": "n03877845",  # palace (698)
    "flower": "n11939491",  # daisy (985)
}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CORRUPT = "n02123045/truncated.JPEG"
LAYER = "blocks.5.0.conv_pwl"  # 192 units on 7×7 maps at 224²

INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw"]
INDEX_HEADER += ["color", "object", "part", "material", "scene", "texture"]
# Probe labels: colour bands (pixel masks), one object per photo in a centre box (pixel
# masks, numbers above 255 so the G channel of the PNG is used), a scene per image
# (image-level numbers).
COLOR_LABELS = {1: "dark", 2: "red", 3: "green", 4: "blue", 5: "white"}
OBJECT_LABELS = {300: "cat", 301: "cup", 302: "rocket", 303: "building"}
SCENE_LABELS = {600: "indoor", 601: "outdoor"}
PHOTO_OBJECT = {"chelsea": 300, "coffee": 301, "rocket": 302, "china": 303}
PHOTO_SCENE = {"chelsea": 600, "coffee": 600, "rocket": 601, "china": 601}
PROBE_SIZE, MASK_SIZE = 224, 112


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread for this package's tests and the processes they start: on a
    shared 2-core machine two threads spin against other processes and made a forward pass
    of efficientnet_lite0 7× slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photo_arrays() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    by_name = {Path(f).stem: im for f, im in zip(sample.filenames, sample.images, strict=True)}
    return {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "china": by_name["china"],
        "flower": by_name["flower"],
    }


def _variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """The photo, its mirror image, and a crop of its central 80%."""
    h, w = image.shape[:2]
    dh, dw = h // 10, w // 10
    return {
        "full": image,
        "flip": image[:, ::-1],
        "crop": image[dh : h - dh, dw : w - dw],
    }


@pytest.fixture(scope="package")
def photos() -> dict[str, np.ndarray]:
    return _photo_arrays()


@pytest.fixture(scope="package")
def imagenet_dir(tmp_path_factory, photos) -> Path:
    """``DIR/<wnid>/<photo>_<variant>.jpg``: 15 JPEGs of 5 classes, and one undecodable file."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    for name, image in photos.items():
        folder = root / PHOTOS[name]
        folder.mkdir(parents=True, exist_ok=True)
        for variant, pixels in _variants(image).items():
            Image.fromarray(np.ascontiguousarray(pixels)).save(
                folder / f"{name}_{variant}.jpg", quality=92
            )
    bad = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (root / CORRUPT).write_bytes(bad)
    return root


def folder_files(root: Path) -> list[Path]:
    """The folder's files in the documented order: class folders sorted, files sorted, the
    classes taken in turn (every class's first file, then every class's second, ...); the
    corrupt one included, as an index into the folder counts it."""
    per_class = [sorted(sub.iterdir()) for sub in sorted(p for p in root.iterdir() if p.is_dir())]
    longest = max(len(files) for files in per_class)
    return [files[i] for i in range(longest) for files in per_class if i < len(files)]


def reference_image(path: Path, size: int = 224) -> torch.Tensor | None:
    """The ImageNet evaluation transform done by hand: shorter side to size/0.875 (256),
    antialiased bilinear on the 8-bit image, centre crop; ``None`` when PIL cannot decode it."""
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except OSError:
        return None
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    h, w = x.shape[1:]
    short = round(size / 0.875)
    # The long side is truncated, as torchvision does; the resize runs on the 8-bit image.
    new = (short, int(w * short / h)) if h <= w else (int(h * short / w), short)
    x = F.interpolate(x[None], size=new, mode="bilinear", antialias=True)[0]
    top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return x[:, top : top + size, left : left + size].float() / 255


@pytest.fixture(scope="package")
def imagenet_wnids() -> list[str]:
    """ImageNet-1k's wnids in class order, read from timm (not from advinterp)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


@pytest.fixture(scope="package")
def lite0():
    from advinterp.models import load_model

    return load_model("efficientnet_lite0")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``advinterp ARGS`` in this process: (status, stdout, stderr). Warnings are recorded
    and added to stderr, where the console script prints them; the filters ``main`` sets
    stay inside the call."""
    from advinterp.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    out = capsys.readouterr()
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return rc, out.out, out.err + shown


def advinterp_script(*args) -> subprocess.CompletedProcess:
    """The installed console script, in a process of its own."""
    script = Path(sys.executable).with_name("advinterp")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "advinterp"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )


def _cli_in_session(*args) -> None:
    from advinterp.cli import main

    with warnings.catch_warnings(record=True):
        rc = main([str(a) for a in args])
    assert rc == 0, f"advinterp {' '.join(map(str, args))} ended with status {rc}"


@pytest.fixture(scope="package")
def opt_run(tmp_path_factory, imagenet_dir):
    """``advinterp attack --method opt`` (least-likely targets, 5 Adam steps) on the folder,
    through the console script: (set folder, finished process)."""
    out = tmp_path_factory.mktemp("attacks") / "opt"
    proc = advinterp_script(
        "attack", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}",
        "--method", "opt", "--steps", "5", "--batch-size", "8", "--out", out,
    )  # fmt: skip
    return out, proc


@pytest.fixture(scope="package")
def opt_set(opt_run) -> Path:
    out, proc = opt_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="package")
def pgd_set(tmp_path_factory, imagenet_dir) -> Path:
    """``advinterp attack --method pgd --eps 4`` (untargeted, 2 steps) on the folder."""
    out = tmp_path_factory.mktemp("attacks") / "pgd"
    _cli_in_session(
        "attack", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}",
        "--method", "pgd", "--eps", "4", "--steps", "2", "--batch-size", "8", "--out", out,
    )  # fmt: skip
    return out


def read_set(folder: Path) -> dict[str, torch.Tensor]:
    """An adversarial set's shards read with safetensors directly, concatenated."""
    from safetensors.torch import load_file

    parts = [load_file(p) for p in sorted((folder / "shards").glob("*.safetensors"))]
    assert parts, f"{folder} holds no shards"
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="package")
def reference(lite0, imagenet_dir, imagenet_wnids):
    """The folder decoded here: per dataset index (the corrupt file's included) its image
    (``None`` when undecodable), true class and the model's clean logits."""
    images, labels = [], []
    for path in folder_files(imagenet_dir):
        images.append(reference_image(path))
        labels.append(imagenet_wnids.index(path.parent.name))
    good = [i for i, x in enumerate(images) if x is not None]
    with torch.inference_mode():
        logits = lite0(torch.stack([images[i] for i in good]))
    by_index = dict(zip(good, logits, strict=True))
    return {"images": images, "labels": labels, "logits": by_index, "good": good}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _label_png(path: Path, labels: np.ndarray) -> None:
    """A segmentation in Broden's encoding: label = R + 256·G."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path)


def color_bands(image: np.ndarray) -> np.ndarray:
    """Per pixel of an RGB ``uint8`` image: dark (1), white (5), else its strongest channel
    (red 2, green 3, blue 4)."""
    value = image.astype(np.int64)
    bands = 2 + value.argmax(-1)
    brightness = value.mean(-1)
    bands[brightness < 60] = 1
    bands[(brightness > 200) & (np.ptp(value, axis=-1) < 40)] = 5
    return bands


def centre_box(size: int, label: int) -> np.ndarray:
    mask = np.zeros((size, size), np.int64)
    mask[size // 4 : size - size // 4, size // 4 : size - size // 4] = label
    return mask


@pytest.fixture(scope="package")
def probe_dir(tmp_path_factory, photos) -> Path:
    """A 224² probe in Broden's exact layout (``broden1_224``): 12 images (4 photos with
    their mirror and centre crop), 112² segmentation PNGs for colour and object, image-level
    scene labels."""
    root = tmp_path_factory.mktemp("probe") / "broden1_224"
    (root / "images" / "photos").mkdir(parents=True)
    rows, counts = [], {}
    for name in PHOTO_OBJECT:
        for variant, pixels in _variants(photos[name]).items():
            stem = f"photos/{name}_{variant}"
            im = Image.fromarray(np.ascontiguousarray(pixels)).resize(
                (PROBE_SIZE, PROBE_SIZE), Image.BILINEAR
            )
            im.save(root / "images" / f"{stem}.jpg", quality=92)
            small = np.asarray(im.resize((MASK_SIZE, MASK_SIZE), Image.BILINEAR))
            color = color_bands(small)
            obj = centre_box(MASK_SIZE, PHOTO_OBJECT[name])
            _label_png(root / "images" / f"{stem}_color.png", color)
            _label_png(root / "images" / f"{stem}_object.png", obj)
            scene = PHOTO_SCENE[name]
            for number in [*np.unique(color).tolist(), PHOTO_OBJECT[name], scene]:
                counts[number] = counts.get(number, 0) + 1
            rows.append(
                [f"{stem}.jpg", "train", PROBE_SIZE, PROBE_SIZE, MASK_SIZE, MASK_SIZE,
                 f"{stem}_color.png", f"{stem}_object.png", "", "", str(scene), ""]
            )  # fmt: skip
    _write_csv(root / "index.csv", INDEX_HEADER, rows)
    categories = {"color": COLOR_LABELS, "object": OBJECT_LABELS, "scene": SCENE_LABELS}
    label_rows = [
        [number, label, f"{cat}({counts.get(number, 0)})", counts.get(number, 0), 0.1, label]
        for cat, labels in categories.items()
        for number, label in labels.items()
    ]
    _write_csv(
        root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
        label_rows,
    )  # fmt: skip
    _write_csv(
        root / "category.csv",
        ["name", "first", "last", "count", "frequency"],
        [
            [cat, min(labels), max(labels), len(labels), len(rows)]
            for cat, labels in categories.items()
        ],
    )
    for cat, labels in categories.items():
        _write_csv(
            root / f"c_{cat}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [
                [code, number, label, counts.get(number, 0), 0.1]
                for code, (number, label) in enumerate(labels.items(), start=1)
            ],
        )
    return root
