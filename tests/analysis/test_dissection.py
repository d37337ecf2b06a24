"""Table 1 end to end: the dissect verb on the embedded probe, real and adversarial."""

import csv
import json

import pytest
import torch
import torchvision

from advinterp.analysis.dissection import (
    DissectionResult,
    _AdversarialProbe,
    _drop_foreign_set,
    default_dissect_layers,
    format_table1,
    map_layers,
    write_dissection,
)
from advinterp.cli import main
from advinterp.data.broden import BrodenProbe
from advinterp.data.fashion_broden import write_fashion_broden
from advinterp.errors import UserError
from advinterp.io import read_state_dict, write_json
from advinterp.metrics.dissect import Dissection
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
    batches = _AdversarialProbe(tmp_path / "adv", probe, batch_size=2)
    images, masks = zip(*batches, strict=True)
    # Full batches in position order, across the shards of 3 and 2 images.
    assert [len(x) for x in images] == [2, 2, 1]
    assert len(batches) == 3  # the progress bar's total
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
        (["--layer", "fc"], "layer fc (Linear) gives 10 values per image, not C×H×W maps"),
        (["--workers", "-1"], "--workers must be 0"),
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


def test_linear_layer_is_refused_before_any_work():
    model = create_model("resnet")
    assert map_layers(model, ["net.layer3", "layer2", "layer3"]) == ["layer3", "layer2"]
    with pytest.raises(UserError, match=r"layer fc \(Linear\).*e\.g\. layer3\.0, layer3 "):
        map_layers(model, ["layer3", "fc"])


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_cannot_be_a_folder(small_run, tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    args = ["dissect", "--model", str(small_run / "model.safetensors"), "--probe", "/nowhere"]
    # The output folder is checked before the probe (and before any work).
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advinterp: error:") and "\n" not in err
    assert ("is a file" if where == "file" else "cannot write into --out") in err


def _fake(layer, units, seed):
    g = torch.Generator().manual_seed(seed)
    return Dissection(
        layer=layer,
        thresholds=torch.rand(units, generator=g),
        iou=torch.rand(units, 3, generator=g) * 0.1,
        labels=["-", "dog", "striped"],
        categories=["object", "texture"],
        label_category=torch.tensor([-1, 0, 1]),
        iou_threshold=0.04,
    )


def test_rewrite_removes_tallies_of_an_earlier_dissection(tmp_path):
    both = DissectionResult(
        real={"layer2": _fake("layer2", 4, 0), "layer3": _fake("layer3", 6, 1)},
        adversarial={"layer2": _fake("layer2", 4, 2), "layer3": _fake("layer3", 6, 3)},
    )
    write_dissection(both, tmp_path)
    assert len(list(tmp_path.glob("*/tally_*.csv"))) == 4
    (tmp_path / "real" / "notes.txt").write_text("mine")
    # Another layer, real images only: only its tally is left beside the new Table 1.
    write_dissection(DissectionResult(real={"layer1": _fake("layer1", 2, 4)}), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*/tally_*.csv")) == ["tally_layer1.csv"]
    assert not (tmp_path / "adversarial").exists()
    assert (tmp_path / "real" / "notes.txt").exists()  # not a tally: left alone
    table = json.loads((tmp_path / "table1.json").read_text())
    assert table["units"] == {"layer1": 2} and "adversarial" not in table
    assert set(read_state_dict(tmp_path / "iou.safetensors")) == {
        "real/layer1/iou",
        "real/layer1/thresholds",
    }


def test_adversarial_set_of_another_model_is_rebuilt(tmp_path, capsys):
    folder = tmp_path / "adversarial-set"
    expected = {"model": "weights:aaaa", "dataset": "broden:/p", "n": 10, "seed": 0}
    write_json(folder / "settings.json", {**expected, "method": "opt"})
    _drop_foreign_set(folder, expected, progress=False)
    assert folder.is_dir()  # the same model and probe: resumed
    _drop_foreign_set(folder, {**expected, "model": "weights:bbbb"}, progress=True)
    assert not folder.exists() and "another model or probe" in capsys.readouterr().out


def test_table1_columns_stay_aligned_with_long_names():
    t = {"real": {"object": 1.0}}
    lines = format_table1({"efficientnet_lite0-Adv": t, "resnet": t}).splitlines()[1:]
    assert len({len(line) for line in lines}) == 1


def test_ctrl_c_says_how_to_resume(small_run, probe_dir, tmp_path, capsys, monkeypatch):
    import advinterp.analysis.dissection

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(advinterp.analysis.dissection, "dissect_model", interrupted)
    args = ["dissect", "--model", str(small_run / "model.safetensors"), "--probe", str(probe_dir)]
    assert main(args + ["--adversarial", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "run the same command again" in err and "--resume" not in err
