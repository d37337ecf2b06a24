"""Table 1 end to end: the dissect verb on the embedded probe, real and adversarial."""

import csv
import json

import pytest
import torch
import torchvision

from advinterp.analysis.dissection import (
    _AdversarialProbe,
    default_dissect_layers,
    format_table1,
)
from advinterp.cli import main
from advinterp.data.broden import BrodenProbe
from advinterp.data.fashion_broden import write_fashion_broden
from advinterp.io import read_state_dict
from advinterp.models import Classifier, create_model


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return write_fashion_broden(tmp_path_factory.mktemp("probe") / "fb", n=120, progress=False)


def test_default_layers_are_the_last_two_stages():
    assert default_dissect_layers(create_model("resnet")) == ["layer2", "layer3"]
    net = torchvision.models.resnet18(num_classes=10)
    model = Classifier(net, (0.5,) * 3, (0.5,) * 3, input_size=64, num_classes=10)
    assert default_dissect_layers(model) == ["layer3", "layer4"]
    # AlexNet has one `features` stage: its last two convolutions.
    assert default_dissect_layers(create_model("alexnet")) == ["features.8", "features.10"]


def _read_tally(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dissect_verb_real_and_adversarial(small_run, probe_dir, tmp_path, capsys):
    out = tmp_path / "dissect"
    args = ["dissect", "--model", str(small_run / "model.safetensors"), "--probe", str(probe_dir)]
    args += ["--adversarial", "--out", str(out), "--batch-size", "50"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "table1.json").read_text())
    assert set(table["real"]) == {"color", "object", "texture"}
    assert table["units"] == {"layer2": 32, "layer3": 64}
    assert table["attack"]["method"] == "opt" and table["attack"]["n"] == 120
    assert table["attack"]["success_rate"] > 0.5
    iou = read_state_dict(out / "iou.safetensors")
    for side in ("real", "adversarial"):
        interpretable = {c: 0 for c in table["real"]}
        for layer, units in table["units"].items():
            rows = _read_tally(out / side / f"tally_{layer}.csv")
            assert [int(r["unit"]) for r in rows] == list(range(units))
            best = iou[f"{side}/{layer}/iou"].max(dim=1).values
            assert torch.allclose(torch.tensor([float(r["iou"]) for r in rows]), best, atol=1e-6)
            for r in rows:
                if float(r["iou"]) > table["iou_threshold"]:
                    interpretable[r["category"]] += 1
        # Table 1 = the tallies' units above the threshold, per category, over all units.
        for cat, count in interpretable.items():
            assert table[side][cat] == pytest.approx(100 * count / 96)
    assert (out / "table1.png").stat().st_size > 1000
    assert format_table1({"resnet": table}).splitlines()[-1] in printed
    shards = list((out / "adversarial-set" / "shards").glob("*.safetensors"))
    assert shards

    # Rerun: the adversarial set is reused (resume), the tables come out the same.
    assert main(args) == 0
    again = json.loads((out / "table1.json").read_text())
    assert again["real"] == table["real"] and again["adversarial"] == table["adversarial"]


def test_adversarial_batches_carry_their_real_images_masks(small_run, probe_dir, tmp_path):
    from advinterp.analysis.dissection import _ProbeImages
    from advinterp.attacks.advset import build_adversarial_set
    from advinterp.models import load_model

    model = load_model(str(small_run / "model.safetensors"))
    probe = BrodenProbe(probe_dir, in_chans=1, limit=30)
    # A shuffled subset: the set's order is not the probe's.
    order = [5, 2, 9, 0, 17]
    subset = torch.utils.data.Subset(_ProbeImages(probe), order)
    build_adversarial_set(
        model,
        subset,
        tmp_path / "adv",
        method="fgsm",
        eps=8 / 255,
        targeted=True,
        chunk=3,
        progress=False,
    )
    images, masks = zip(*_AdversarialProbe(tmp_path / "adv", probe, batch_size=2), strict=True)
    assert [len(x) for x in images] == [2, 1, 2]  # batches within each shard of 3 and 2
    got = torch.cat([m["object"] for m in masks])
    expected = torch.stack([probe.masks(i)["object"] for i in order])
    assert torch.equal(got, expected)
    clean = torch.stack([probe.image(i) for i in order])
    delta = (torch.cat(images) - clean).abs().amax()
    assert 0 < delta <= 8 / 255 + 1e-6  # the adversarial images, not the real ones


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--iou-threshold", "2"], "--iou-threshold must be in [0, 1]"),
        (["--quantile", "1"], "--quantile must be in (0, 1)"),
        (["--layer", "layer9"], "unknown layer 'layer9'"),
        (["--categories", "scene"], "no category scene"),
    ],
)
def test_bad_input_is_one_line(small_run, probe_dir, tmp_path, capsys, extra, message):
    args = ["dissect", "--model", str(small_run / "model.safetensors"), "--probe", str(probe_dir)]
    assert main(args + ["--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advinterp: error:") and message in err and "\n" not in err


def test_missing_probe_folder(small_run, tmp_path, capsys):
    args = ["dissect", "--model", str(small_run / "model.safetensors")]
    assert main(args + ["--probe", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
