"""The Broden-layout loader on a hand-built fixture in Broden's exact layout, and the embedded probe."""

import csv
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from advinterp.data.broden import BrodenProbe, collate_masks, probe_batches
from advinterp.data.fashion_broden import COLORS, TEXTURES, write_fashion_broden
from advinterp.errors import UserError

INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw"]
INDEX_HEADER += ["color", "object", "part", "material", "scene", "texture"]


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _label_png(path, labels):
    labels = np.asarray(labels)
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path)


def make_broden(root):
    """Three images: pixel object/part masks (one label above 255), image-level
    scenes, one image annotated only by a texture number."""
    (root / "images" / "ade20k").mkdir(parents=True)
    (root / "images" / "dtd").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(
            root / "images/ade20k" / f"{name}.jpg"
        )
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(root / "images/dtd/c.jpg")
    obj_a = np.zeros((4, 4), int)
    obj_a[:2, :2] = 1  # label 1 "dog" top left
    obj_a[2:, 2:] = 300  # label 300 "car" bottom right (G channel used)
    _label_png(root / "images/ade20k/a_object.png", obj_a)
    part_a = np.zeros((4, 4), int)
    part_a[0, 0] = 2  # "head"
    _label_png(root / "images/ade20k/a_part.png", part_a)
    obj_b = np.zeros((8, 8), int)  # another size: resized (nearest) to the first row's 4×4
    obj_b[:, :4] = 1
    _label_png(root / "images/ade20k/b_object.png", obj_b)
    rows = [
        ["ade20k/a.jpg", "train", 8, 8, 4, 4, "", "ade20k/a_object.png", "ade20k/a_part.png"]
        + ["", "3", ""],
        ["ade20k/b.jpg", "val", 8, 8, 4, 4, "", "ade20k/b_object.png", "", "", "3;4", ""],
        ["dtd/c.jpg", "train", 8, 8, 4, 4, "", "", "", "", "", "5"],
    ]
    _write_csv(root / "index.csv", INDEX_HEADER, rows)
    labels = [
        [1, "dog", "object(2);part(1)", 2, 0.2, "dog"],
        [2, "head", "part(1)", 1, 0.05, "head"],
        [3, "kitchen", "scene(2)", 2, 1.0, ""],
        [4, "street", "scene(1)", 1, 1.0, ""],
        [5, "striped", "texture(1)", 1, 1.0, ""],
        [300, "car", "object(1)", 1, 0.2, "car;auto"],
    ]
    _write_csv(
        root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], labels
    )
    cats = [
        ["color", 0, 0, 0, 0],
        ["object", 1, 300, 2, 2],
        ["part", 2, 2, 1, 1],
        ["scene", 3, 4, 2, 2],
        ["texture", 5, 5, 1, 1],
    ]
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], cats)
    for name, members in {
        "color": [],
        "object": [(1, 1, "dog"), (2, 300, "car")],
        "part": [(1, 1, "dog"), (2, 2, "head")],
        "scene": [(1, 3, "kitchen"), (2, 4, "street")],
        "texture": [(1, 5, "striped")],
    }.items():
        rows = [[code, number, label, 1, 0.1] for code, number, label in members]
        _write_csv(
            root / f"c_{name}.csv", ["code", "number", "name", "frequency", "coverage"], rows
        )
    return root


@pytest.fixture
def broden(tmp_path):
    return make_broden(tmp_path / "broden1_224")


def test_reads_broden_layout(broden):
    probe = BrodenProbe(broden.parent)  # the parent holding one broden* folder works too
    assert probe.root == broden
    assert len(probe) == 3  # color is in category.csv but annotates nothing: no row is dropped
    assert probe.labels[1] == "dog" and probe.labels[300] == "car" and probe.labels[7] == "-"
    # A label counts in its primary category (largest count): "dog" is an object, not a part.
    assert probe.categories["object"] == [1, 300]
    assert probe.categories["part"] == [2]
    assert probe.categories["scene"] == [3, 4]
    assert probe.mask_size == (4, 4)

    image, masks, index = probe[0]
    assert index == 0 and image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.full_like(image, 100 / 255), atol=2 / 255)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[:2, :2] = 1
    expected[2:, 2:] = 300  # R + 256·G
    assert torch.equal(masks["object"], expected[None])
    assert masks["part"].shape == (1, 4, 4) and int(masks["part"][0, 0, 0]) == 2
    assert torch.equal(masks["scene"], torch.tensor([3]))  # image-level
    assert masks["texture"].numel() == 0

    _, masks_b, _ = probe[1]
    assert torch.equal(masks_b["scene"], torch.tensor([3, 4]))
    left = torch.zeros(4, 4, dtype=torch.int64)
    left[:, :2] = 1  # the 8×8 mask, halved by nearest resizing
    assert torch.equal(masks_b["object"][0], left)


def test_split_categories_limit_and_size(broden):
    assert len(BrodenProbe(broden, split="train")) == 2
    probe = BrodenProbe(broden, categories=["texture"], input_size=4, in_chans=1)
    assert len(probe) == 1 and probe.rows[0]["image"] == "dtd/c.jpg"
    image, masks, _ = probe[0]
    assert image.shape == (1, 4, 4) and list(masks) == ["texture"]
    assert len(BrodenProbe(broden, limit=2)) == 2


def test_batches_pad_layers_and_expand_image_labels(broden):
    probe = BrodenProbe(broden)
    ((x, masks),) = list(probe_batches(probe, batch_size=3))
    assert x.shape == (3, 3, 8, 8)
    assert masks["object"].shape == (3, 1, 4, 4)
    assert masks["object"][2].eq(0).all()  # not annotated in object
    assert masks["scene"].shape == (3, 2)
    assert masks["scene"].tolist() == [[3, 0], [3, 4], [0, 0]]
    # Mixed pixel and image-level labels in a category: the number fills a whole layer.
    mixed = collate_masks(
        [{"c": torch.tensor([7])}, {"c": torch.ones(1, 2, 2, dtype=torch.int64)}], (2, 2)
    )["c"]
    assert mixed.shape == (2, 1, 2, 2) and mixed[0].eq(7).all() and mixed[1].eq(1).all()
    assert len(list(probe_batches(probe, 2))) == 2 == len(list(probe_batches(probe, 2)))


def _rewrite_index(broden, edit):
    with open(broden / "index.csv") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(broden / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_malformed_probes_name_the_file_and_row(broden, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BrodenProbe(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="index.csv not found"):
        BrodenProbe(tmp_path / "empty")
    with pytest.raises(UserError, match="no category material"):
        BrodenProbe(broden, categories=["material"])

    # A label number in index.csv that label.csv lacks.
    _rewrite_index(broden, lambda rows: rows[:3] + [rows[3][:-1] + ["9"]])
    with pytest.raises(UserError, match=r"index.csv row 4: texture label 9 is not in label.csv"):
        BrodenProbe(broden)
    # A missing column.
    _rewrite_index(broden, lambda rows: [r[:4] + r[5:] for r in rows])
    with pytest.raises(UserError, match=r"index.csv lacks the column\(s\) sh"):
        BrodenProbe(broden)


def test_unreadable_or_out_of_range_segmentations(broden):
    probe = BrodenProbe(broden)
    (broden / "images/ade20k/a_part.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"a_part.png \(index.csv row 2\) cannot be read"):
        probe[0]
    _label_png(broden / "images/ade20k/b_object.png", np.full((4, 4), 301))
    with pytest.raises(UserError, match=r"b_object.png \(index.csv row 3\) holds label 301"):
        probe[1]
    (broden / "images/dtd/c.jpg").unlink()
    with pytest.raises(UserError, match=r"c.jpg \(index.csv row 4\) cannot be read"):
        probe.image(2)


def test_malformed_label_csv(broden):
    with open(broden / "label.csv", "a") as f:
        f.write("6,odd,texture-7,1,1.0,\n")
    with pytest.raises(UserError, match=r"label.csv row 8: category 'texture-7'"):
        BrodenProbe(broden)


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_fashion_broden_is_deterministic_and_consistent(tmp_path):
    a = write_fashion_broden(tmp_path / "a", n=40, seed=3, progress=False)
    b = write_fashion_broden(tmp_path / "b", n=40, seed=3, progress=False)
    c = write_fashion_broden(tmp_path / "c", n=40, seed=4, progress=False)
    assert _digest(a) == _digest(b) != _digest(c)
    with pytest.raises(UserError, match="already exists"):
        write_fashion_broden(a, n=40, seed=3, progress=False)

    probe = BrodenProbe(a, in_chans=1)
    assert len(probe) == 40 and probe.category_names == ["color", "object", "texture"]
    assert [probe.labels[n] for n in probe.categories["color"]] == list(COLORS)
    assert [probe.labels[n] for n in probe.categories["texture"]] == list(TEXTURES)
    ((x, masks),) = list(probe_batches(probe, 40))
    color, obj, tex = (masks[k][:, 0] for k in ("color", "object", "texture"))
    # Colour bands are the image's intensity quartiles, on every pixel.
    band = (x[:, 0] * 4).long().clamp(max=3) + probe.categories["color"][0]
    assert torch.equal(color, band)
    # Object and texture never overlap; each image has one object class and at most one
    # texture; about half the images keep a plain background.
    assert not ((obj > 0) & (tex > 0)).any()
    textured = 0
    for i in range(40):
        assert len(obj[i].unique()) == 2 and len(tex[i].unique()) <= 2
        textured += len(tex[i].unique()) == 2
    assert 10 <= textured <= 30
    # The object covers a real share of the image; background outside both is black.
    assert (obj > 0).float().mean() > 0.1
    outside = (obj == 0) & (tex == 0)
    assert outside.any() and x[:, 0][outside].max() == 0


def test_probe_path_that_is_a_file(tmp_path):
    (tmp_path / "index.csv").write_text("image\n")
    with pytest.raises(UserError, match="is a file: give the probe's folder"):
        BrodenProbe(tmp_path / "index.csv")


def test_header_only_index(broden):
    _rewrite_index(broden, lambda rows: rows[:1])
    with pytest.raises(UserError, match="lists no images"):
        BrodenProbe(broden)


def test_non_integer_or_zero_sizes(broden):
    _rewrite_index(broden, lambda rows: rows[:2] + [rows[2][:4] + ["x4"] + rows[2][5:]])
    with pytest.raises(UserError, match=r"row 3: column sh holds 'x4', not an integer"):
        BrodenProbe(broden)
    _rewrite_index(broden, lambda rows: rows[:2] + [rows[2][:4] + ["0"] + rows[2][5:]])
    with pytest.raises(UserError, match=r"row 3: column sh holds 0"):
        BrodenProbe(broden)


@pytest.mark.parametrize("missing", ["label.csv", "category.csv", "c_object.csv"])
def test_missing_table_is_named(broden, missing):
    (broden / missing).unlink()
    with pytest.raises(UserError, match=f"{missing} not found"):
        BrodenProbe(broden)


def test_greyscale_segmentation_holds_the_label(broden):
    """A one-channel PNG is the label itself (R with G = 0), not the grey colour (v, v, v)."""
    grey = np.zeros((4, 4), np.uint8)
    grey[:2] = 1
    Image.fromarray(grey, "L").save(broden / "images/ade20k/a_object.png")
    wide = np.zeros((4, 4), np.uint16)
    wide[:, :2] = 300  # 16-bit: the full R + 256·G number
    Image.fromarray(wide).save(broden / "images/ade20k/a_part.png")
    masks = BrodenProbe(broden).masks(0)
    assert torch.equal(masks["object"][0], torch.from_numpy(grey).long())
    assert torch.equal(masks["part"][0], torch.from_numpy(wide.astype(np.int64)))


def test_bad_batch_size_and_workers(broden):
    probe = BrodenProbe(broden)
    with pytest.raises(UserError, match="batch size must be at least 1"):
        probe_batches(probe, batch_size=0)
    with pytest.raises(UserError, match="workers must be 0"):
        probe_batches(probe, workers=-1)


def test_grey_probe_feeds_an_rgb_model_of_another_size(tmp_path):
    """fashion-broden (1×28×28) read for an ImageNet model: converted to RGB and resized."""
    root = write_fashion_broden(tmp_path / "fb", n=4, progress=False)
    probe = BrodenProbe(root, input_size=64, in_chans=3)
    image, masks, _ = probe[0]
    assert image.shape == (3, 64, 64) and torch.equal(image[0], image[1])
    assert masks["object"].shape == (1, 28, 28)  # masks keep the probe's own size
