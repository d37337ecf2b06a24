import csv
import json

import pytest

from advinterp.cli import main


def _one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress bars aside (they go to stderr too), one line says what is wrong.
    lines = [line for line in err.splitlines() if line.startswith("advinterp:")]
    assert len(lines) == 1 and lines[0].startswith("advinterp: error:") and message in lines[0], err


def test_topk_writes_galleries(small_run, adv_dir, tmp_path, capsys):
    out = tmp_path / "gallery"
    ckpt = str(small_run / "model.safetensors")
    argv = ["topk", "--model", ckpt, "--adversarial", str(adv_dir), "--layer", "layer3.0.conv2"]
    assert main([*argv, "--units", "0", "5", "--saliency", "activation", "--out", str(out)]) == 0
    assert "2 galleries of layer3.0.conv2" in capsys.readouterr().out
    data = json.loads((out / "gallery.json").read_text())
    assert [u["unit"] for u in data["units"]] == [0, 5]
    assert data["model"] == ckpt and data["saliency"] == "activation"
    assert {"success_rate", "mean_l2"} <= set(data["attack"])
    for u in data["units"]:
        assert (out / u["png"]).stat().st_size > 10_000
    assert (out / "saliency.safetensors").is_file()

    rand = tmp_path / "random"
    assert (
        main(
            [
                *argv,
                "--select",
                "random",
                "--count",
                "2",
                "--seed",
                "3",
                "--k",
                "3",
                "--patch",
                "7",
                "--stride",
                "7",
                "--out",
                str(rand),
            ]
        )
        == 0
    )
    data = json.loads((rand / "gallery.json").read_text())
    assert data["selection"] == {"mode": "random", "count": 2, "seed": 3}
    assert data["saliency_patch"] == 7 and len(data["units"][0]["real"]) == 3


def test_semantics_writes_table_plot_and_json(small_run, adv_dir, tmp_path, capsys):
    out = tmp_path / "sem"
    pair = ["--model", str(small_run / "model.safetensors"), "--adversarial", str(adv_dir)]
    argv = ["semantics", *pair, *pair, "--name", "a", "--name", "b", "--bins", "4"]
    assert main([*argv, "--layers", "conv1", "layer1.0.conv2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a: 32 units in 2 layers" in printed and "success" in printed
    with open(out / "units.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 32 and {r["model"] for r in rows} == {"a", "b"}
    data = json.loads((out / "semantics.json").read_text())
    assert set(data["fig10"]) == {"a", "b"} and data["sigma"] == 1.0
    assert data["models"]["a"]["fig10"] == data["models"]["b"]["fig10"]
    assert data["models"]["a"]["adversarial"] == str(adv_dir)
    assert (out / "fig10.png").stat().st_size > 10_000


def test_user_mistakes_end_in_one_line(small_run, adv_dir, tmp_path, capsys):
    ckpt = str(small_run / "model.safetensors")
    base = ["--model", ckpt, "--adversarial", str(adv_dir), "--out", str(tmp_path / "o")]
    for argv, message in [
        (["topk", *base, "--layer", "layer9.conv"], "unknown layer 'layer9.conv'"),
        (["topk", *base, "--layer", "conv1", "--units", "99"], "not in 0..15"),
        (["topk", *base, "--layer", "conv1", "--saliency", "gradcam"], "unknown saliency"),
        (["topk", *base, "--layer", "conv1", "--select", "best"], "unknown unit selection"),
        (["topk", *base, "--layer", "conv1", "--split", "train"], "made from another dataset"),
        (
            [
                "topk",
                "--model",
                ckpt,
                "--adversarial",
                str(tmp_path / "nowhere"),
                "--layer",
                "conv1",
                "--out",
                str(tmp_path / "o"),
            ],
            "does not exist",
        ),
        (["semantics", *base, "--model", ckpt], "one --adversarial per --model"),
        (["semantics", *base, "--sigma", "0"], "--sigma must be positive"),
        (["semantics", *base, "--layers", "fc1"], "unknown layer 'fc1'"),
        (["semantics", *base, "--synsets", str(tmp_path / "none.txt")], "not found"),
    ]:
        _one_line_error(capsys, argv, message)


@pytest.mark.parametrize("verb", ["topk", "semantics"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "--adversarial" in capsys.readouterr().out
