"""``topk``, ``semantics`` and ``dissect`` on efficientnet_lite0 at 224², each checked against a
forward hook and counts computed here."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from tests.imagenet.conftest import (
    COLOR_LABELS,
    LAYER,
    MASK_SIZE,
    OBJECT_LABELS,
    SCENE_LABELS,
    read_set,
    run_cli,
)


def layer_output(model, layer, x, batch_size=8):
    """``layer``'s output for images ``x``, through a plain forward hook."""
    module = dict(model.net.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.inference_mode():
            for batch in x.split(batch_size):
                model(batch)
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.fixture(scope="module")
def real_and_adversarial(opt_set, reference):
    """The opt set's real images (decoded here) and adversarial images, by set position."""
    s = read_set(opt_set)
    real = torch.stack([reference["images"][i] for i in s["indices"].tolist()])
    return real, s


def test_topk_galleries_hold_each_units_top_images(
    lite0, opt_set, real_and_adversarial, tmp_path, capsys
):
    real, s = real_and_adversarial
    out = tmp_path / "galleries"
    rc, stdout, err = run_cli(
        capsys,
        "topk", "--model", "efficientnet_lite0", "--adversarial", opt_set, "--layer", LAYER,
        "--count", "2", "--k", "4", "--saliency", "activation", "--batch-size", "8",
        "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads((out / "gallery.json").read_text())
    assert data["layer"] == LAYER and len(data["units"]) == 2
    assert len(data["classes"]) == 1000 and data["classes"][281].startswith("tabby")

    real_resp = layer_output(lite0, LAYER, real).flatten(2).amax(2)  # N×192
    adv_resp = layer_output(lite0, LAYER, s["images"]).flatten(2).amax(2)
    assert real_resp.shape[1] == 192
    for unit in data["units"]:
        u = unit["unit"]
        assert 0 <= u < 192 and 0 <= unit["lc"] <= 1 + 1e-9
        assert (out / unit["png"]).is_file()
        with Image.open(out / unit["png"]) as im:
            assert im.width > 400 and im.height > 300
        for rows, resp in ((unit["real"], real_resp), (unit["adversarial"], adv_resp)):
            assert len(rows) == 4
            # The gallery's images are the unit's four strongest, best first.
            expected = resp[:, u].topk(4).values
            got = torch.tensor([r["response"] for r in rows])
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (u, got, expected)
            for r in rows:
                assert abs(float(resp[r["position"], u]) - r["response"]) < 1e-3
                assert r["dataset_index"] == int(s["indices"][r["position"]])
        for r in unit["adversarial"]:
            assert r["pred"] == int(s["preds"][r["position"]])
            assert r["boxed"] == (r["distance"] <= 2)
    maps = load_file(out / "saliency.safetensors")
    first = data["units"][0]["unit"]
    assert maps[f"unit_{first:04d}.real"].shape == (4, 224, 224)


def test_topk_discrepancy_maps_at_224(lite0, opt_set, real_and_adversarial, tmp_path, capsys):
    """Occlusion maps on 224² images with a coarse grid (4×4 patches of 56 pixels)."""
    real, _ = real_and_adversarial
    out = tmp_path / "discrepancy"
    rc, _, err = run_cli(
        capsys,
        "topk", "--model", "efficientnet_lite0", "--adversarial", opt_set, "--layer", LAYER,
        "--units", "7", "--k", "2", "--patch", "56", "--stride", "56", "--batch-size", "8",
        "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    (unit,) = json.loads((out / "gallery.json").read_text())["units"]
    maps = load_file(out / "saliency.safetensors")["unit_0007.real"]
    assert maps.shape == (2, 224, 224)
    # Reference: the response drop when each 56×56 block is greyed out (the model's mean).
    x = real[unit["real"][0]["position"]]
    base = layer_output(lite0, LAYER, x[None])[0, 7].amax()
    for top, left in ((0, 0), (56, 112), (168, 168)):  # cells of the 4×4 grid
        occluded = x.clone()
        occluded[:, top : top + 56, left : left + 56] = lite0.mean.view(3, 1, 1)
        drop = base - layer_output(lite0, LAYER, occluded[None])[0, 7].amax()
        assert abs(float(maps[0, top + 28, left + 28]) - float(drop)) < 1e-3 * max(
            1, abs(float(base))
        )


def test_semantics_over_imagenet_classes(
    lite0, opt_set, real_and_adversarial, imagenet_wnids, tmp_path, capsys
):
    real, s = real_and_adversarial
    out = tmp_path / "semantics"
    rc, stdout, err = run_cli(
        capsys,
        "semantics", "--model", "efficientnet_lite0", "--adversarial", opt_set,
        "--fraction", "0.2", "--batch-size", "8", "--layers", "conv", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    with open(out / "units.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    convs = [n for n, m in lite0.net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len({r["layer"] for r in rows}) == len(convs)
    assert len(rows) == sum(dict(lite0.net.named_modules())[n].out_channels for n in convs)
    for r in rows:
        assert 0 <= float(r["lc"]) <= 1 + 1e-9
        for key in ("cs1", "cs2"):
            v = float(r[key])
            assert math.isnan(v) or -1e-9 <= v <= 1 + 1e-9
        assert r["real_class"] in lite0.classes
    assert (out / "fig10.png").is_file() and (out / "semantics.json").is_file()

    # LC of blocks.5.0.conv_pwl's units from their top 3 real images (20% of 15), eq. 10-11:
    # p = the classes of those images, C = exp(-d²/2) with d the WordNet path length.
    from advinterp.metrics.wordnet import synset_of

    resp = layer_output(lite0, LAYER, real).flatten(2).amax(2)
    labels = s["labels"]
    present = sorted(set(labels.tolist()))
    synsets = {c: synset_of(imagenet_wnids[c]) for c in present}
    sim = {
        (a, b): math.exp(-(synsets[a].shortest_path_distance(synsets[b], True) ** 2) / 2)
        for a in present
        for b in present
    }
    by_unit = {int(r["unit"]): r for r in rows if r["layer"] == LAYER}
    checked = 0
    for u in range(resp.shape[1]):
        ranked = resp[:, u].sort(descending=True).values
        if float(ranked[2] - ranked[3]) < 1e-3:
            continue  # a near tie for the third place: the top 3 is not well defined
        top = labels[resp[:, u].topk(3).indices].tolist()
        lc = sum(sim[a, b] for a in top for b in top) / 9
        assert abs(float(by_unit[u]["lc"]) - lc) < 1e-6, u
        checked += 1
    assert checked > 150


def _probe_reference(probe_dir):
    """The probe's images and object masks, read here (index.csv order)."""
    with open(probe_dir / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = torch.stack(
        [
            torch.from_numpy(
                np.asarray(Image.open(probe_dir / "images" / r["image"]).convert("RGB")).copy()
            )
            .permute(2, 0, 1)
            .float()
            / 255
            for r in rows
        ]
    )
    objects = []
    for r in rows:
        rgb = np.asarray(Image.open(probe_dir / "images" / r["object"]).convert("RGB")).astype(
            np.int64
        )
        objects.append(torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1]))
    return images, torch.stack(objects)


def _tallies(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dissect_lite0_on_a_224_probe(lite0, probe_dir, tmp_path, capsys):
    out = tmp_path / "dissect"
    rc, stdout, err = run_cli(
        capsys,
        "dissect", "--model", "efficientnet_lite0", "--probe", probe_dir, "--layer", LAYER,
        "--batch-size", "6", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    table = json.loads((out / "table1.json").read_text())
    assert set(table["real"]) == {"color", "object", "scene"}
    assert table["units"] == {LAYER: 192}
    tally = _tallies(out / "real" / f"tally_{LAYER}.csv")
    assert [int(r["unit"]) for r in tally] == list(range(192))
    names = {*COLOR_LABELS.values(), *OBJECT_LABELS.values(), *SCENE_LABELS.values()}
    for r in tally:
        assert 0 <= float(r["iou"]) <= 1
        assert r["category"] in ("", "color", "object", "scene")
        assert r["label"] in names or (r["category"] == "" and r["label"] == "")
    # Table 1 is the tally counted: % of units whose best IoU passes 0.04, per category.
    for cat, share in table["real"].items():
        hits = sum(1 for r in tally if r["category"] == cat and float(r["iou"]) > 0.04)
        assert abs(share - 100 * hits / 192) < 1e-6

    # Brute force: thresholds are the units' 99.5% quantiles over every position of every
    # probe image; the object IoU counts the upsampled thresholded maps against the masks.
    images, objects = _probe_reference(probe_dir)
    maps = layer_output(lite0, LAYER, images)  # 12×192×7×7
    values = maps.permute(1, 0, 2, 3).flatten(1)  # 192 × (12·49)
    stored = load_file(out / "iou.safetensors")
    thresholds = stored[f"real/{LAYER}/thresholds"]
    ordered = values.sort(dim=1).values
    rank = 0.995 * (values.shape[1] - 1)
    low, high = ordered[:, math.floor(rank) - 2], ordered[:, math.ceil(rank) + 2]
    assert bool(((thresholds >= low - 1e-4) & (thresholds <= high + 1e-4)).all())
    up = F.interpolate(maps, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)
    inside = up > thresholds.view(1, -1, 1, 1)
    labels = table["labels"]
    iou = stored[f"real/{LAYER}/iou"]
    overlapping = 0
    for number, name in OBJECT_LABELS.items():
        concept = (objects == number)[:, None]
        inter = (inside & concept).sum((0, 2, 3)).double()
        union = (inside | concept).sum((0, 2, 3)).double()
        expected = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
        assert labels[number] == name
        # A few pixels at a threshold may fall either side with another summation order.
        assert torch.allclose(iou[:, number].double(), expected, atol=2e-4), name
        overlapping += int((expected > 0).sum())
    assert overlapping > 0


def test_dissect_default_layers_are_the_last_two_stages(lite0, probe_dir, tmp_path, capsys):
    out = tmp_path / "dissect-default"
    rc, stdout, err = run_cli(
        capsys,
        "dissect", "--model", "efficientnet_lite0", "--probe", probe_dir, "--limit", "4",
        "--batch-size", "4", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    table = json.loads((out / "table1.json").read_text())
    # EfficientNet's stages are blocks.0 … blocks.6; the last two give 192 and 320 maps of 7×7.
    assert table["units"] == {"blocks.5": 192, "blocks.6": 320}


def test_dissect_adversarial_probe(lite0, probe_dir, tmp_path, capsys):
    out = tmp_path / "dissect-adv"
    rc, stdout, err = run_cli(
        capsys,
        "dissect", "--model", "efficientnet_lite0", "--probe", probe_dir, "--layer", LAYER,
        "--limit", "4", "--adversarial", "--batch-size", "4", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    table = json.loads((out / "table1.json").read_text())
    assert set(table["adversarial"]) == set(table["real"]) == {"color", "object", "scene"}
    assert table["attack"]["n"] == 4
    assert (out / "adversarial" / f"tally_{LAYER}.csv").is_file()
    s = read_set(out / "adversarial-set")
    assert s["images"].shape == (4, 3, 224, 224)
    # The adversarial images keep their real image's masks: the same probe rows, attacked.
    assert sorted(s["indices"].tolist()) == [0, 1, 2, 3]
    assert bool((s["preds"] == s["targets"]).float().mean() >= 0.5)
