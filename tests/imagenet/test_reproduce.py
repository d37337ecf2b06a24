"""``advinterp reproduce`` on given models: efficientnet_lite0 over the ImageNet-layout photos
and the 224² Broden-layout probe, two Fashion-MNIST checkpoints compared with ``--models``, and
the refusals, each one line before any stage runs."""

from __future__ import annotations

import json

import pytest

from advinterp.errors import UserError
from tests.imagenet.conftest import LAYER, run_cli

# Tiny sizes: three test images, three probe images, 3-step opt attacks at one λ.
TINY = ["--quick", "--limit", "3", "--probe-size", "3", "--lam", "30", "--steps", "3"]
TINY += ["--saliency", "activation", "--dissect-layers", LAYER]
TINY += ["--draws", "200"]


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory, imagenet_dir, probe_dir, capsys_module):
    run = tmp_path_factory.mktemp("reproduce-lite0") / "run"
    args = ["reproduce", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}"]
    args += ["--probe", probe_dir, "--out", run, *TINY]
    rc, out, err = run_cli(capsys_module, *args)
    assert rc == 0, err[-3000:]
    return run, args, out


@pytest.fixture(scope="module")
def capsys_module():
    """A capsys stand-in for module fixtures: ``run_cli`` only reads what it printed."""

    class Nothing:
        def readouterr(self):
            return type("Captured", (), {"out": "", "err": ""})()

    return Nothing()


def test_one_given_model_gets_every_analysis_and_only_its_claims(lite0_run, imagenet_dir):
    run, _, _ = lite0_run
    summary = json.loads((run / "summary.json").read_text())
    name = "efficientnet_lite0"
    assert summary["models"] == [name]
    assert summary["roles"][name]["role"] == "normal"
    assert summary["settings"]["data"] == f"imagefolder:{imagenet_dir}"
    # One row per model in every table, its floor beside it in Table 1, one curve in Fig. 10.
    assert set(summary["table2"]) == {name}
    assert set(summary["table1"]) == {name, f"{name}-random"}
    assert set(summary["table1"][name]) == {"real", "adversarial"}
    assert set(summary["table1"][name]["real"]) == {"color", "object", "scene"}
    assert set(summary["fig10"]) == {name} and summary["fig10"][name]
    row = summary["table2"][name]
    assert 0 <= row["clean_top1"] <= 100 and 0 <= row["pgd20_top1"] <= 100
    # The stage outputs were made on the given data and model, at the given sizes.
    attack = json.loads((run / "adv" / f"{name}-opt" / "attack.json").read_text())
    assert attack["n"] == 3 and attack["dataset"] == f"imagefolder:{imagenet_dir}"
    assert summary["attacks"][name]["steps"] == 3 and summary["attacks"][name]["lam"] == 30
    assert (run / "galleries" / name).is_dir()
    assert (run / "report" / "index.html").is_file()
    # With one model: Table 1's drop (and the floor), Fig. 10's two slopes; nothing that
    # compares it with a fine-tuned model.
    claims = [f["claim"] for f in summary["findings"]]
    assert len(claims) == 4, claims
    assert any("drops sharply" in c for c in claims)
    assert any("random weights" in c for c in claims)
    assert any("CS1 falls" in c for c in claims) and any("CS2 rises" in c for c in claims)
    assert all(c.startswith(f"{name}:") for c in claims)


def test_rerun_of_given_model_skips_every_stage(lite0_run, capsys):
    run, args, _ = lite0_run
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err[-2000:]
    # table2, robustness, autoattack, strength, attack, semantics, dissect, dissect floor
    assert out.count("unchanged, skipped") == 8, out
    assert "Roles in the findings" in out and "efficientnet_lite0: judged as the normally" in out


def test_models_compares_given_checkpoints_in_their_roles(two_checkpoints, tmp_path, capsys):
    normal, adv = two_checkpoints
    run = tmp_path / "run"
    rc, out, err = run_cli(
        capsys, "reproduce", "--models", normal, adv, "--out", run,
        "--quick", "--limit", "40", "--probe-size", "40", "--lam", "10", "--steps", "5",
        "--draws", "200", "--dissect-layers", "layer2.0", "layer3.0",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"] == ["plain", "other"]
    assert {n: r["role"] for n, r in summary["roles"].items()} == {
        "plain": "normal",
        "other": "adv",
    }
    assert set(summary["table2"]) == {"plain", "other"} and set(summary["fig10"]) == {
        "plain",
        "other",
    }
    assert set(summary["table1"]) == {"plain", "other", "plain-random"}
    claims = [f["claim"] for f in summary["findings"]]
    assert any(c.startswith("plain: the share of interpretable units drops") for c in claims)
    assert any(c.startswith("other: the share stays close") for c in claims)
    assert any(c.startswith("other: FGSM") for c in claims)
    assert any(c.startswith("other: PGD-20") for c in claims)
    assert sum("CS1 stays high" in c for c in claims) == 1  # no -AT to compare with
    assert not any(" vs " in c.split(":")[0] for c in claims)  # the -Adv vs -AT claim
    assert "other: judged as the adversarially fine-tuned model" in out
    stages = json.loads((run / "stages" / "table2.json").read_text())["key"]
    assert set(stages["models"]) == {"plain", "other"} and stages["data"] == "fashion-mnist"


def test_models_take_one_weights_file_each(lite0, imagenet_dir, probe_dir, tmp_path, capsys):
    """``--models NAME NAME --weights - FILE``: each model its own weights, in order (``-``: the
    name's shipped ones); a name given twice is named after its weights file."""
    import torch

    from advinterp.data import batches, open_dataset
    from advinterp.io import read_state_dict
    from advinterp.models import load_model
    from advinterp.reproduce import _state_fingerprint

    # Another network of the same architecture: its classifier's rows shifted by one class.
    state = {k: v.clone() for k, v in lite0.net.state_dict().items()}
    for key in ("classifier.weight", "classifier.bias"):
        state[key] = state[key].roll(1, dims=0)
    weights = tmp_path / "shifted.pth"
    torch.save(state, weights)
    run = tmp_path / "run"
    rc, out, err = run_cli(
        capsys, "reproduce", "--models", "efficientnet_lite0", "efficientnet_lite0",
        "--weights", "-", weights, "--data", f"imagefolder:{imagenet_dir}",
        "--probe", probe_dir, "--out", run, *TINY,
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    shipped, shifted = "efficientnet_lite0", "efficientnet_lite0+shifted"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"] == [shipped, shifted]
    assert summary["roles"][shifted]["weights"] == str(weights)
    assert "weights" not in summary["roles"][shipped]
    assert summary["settings"]["weights"] == ["-", str(weights)]
    # Every stage ran on the weights each model was given: loaded by hand, the same digest and
    # the same clean predictions as Table 2's stage made.
    by_hand = {shipped: load_model("efficientnet_lite0"), shifted: load_model(shipped, weights)}
    key = json.loads((run / "stages" / "table2.json").read_text())["key"]["models"]
    assert key == {n: _state_fingerprint(m) for n, m in by_hand.items()}
    assert key[shipped] != key[shifted]
    correct = read_state_dict(run / "robustness" / "correct.safetensors")
    for name, model in by_hand.items():
        data = open_dataset(f"imagefolder:{imagenet_dir}", "test", limit=3, model=model)
        right = []
        with torch.inference_mode():
            for x, y, _ in batches(data, 64):
                right += (model(x).argmax(1) == y).tolist()
        assert correct[f"{name}/clean"].bool().tolist() == right, name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "a", "b", "--archs", "resnet"], "--archs trains models of its own"),
        (["--model", "efficientnet_lite0", "--models", "x"], "not allowed with argument"),
        (["--weights", "w.pth"], "--weights goes with --model or --models"),
        (["--models", "efficientnet_lite0", "x", "--weights", "w.pth"],
         "--weights has 1 entry for 2 models"),
        (["--model", "runs/nothing/model.safetensors"], "checkpoint runs/nothing"),
        (["--models", "efficientnet_lite0", "efficientnet_lite0"], "lists efficientnet_lite0 twice"),
        (["--model", "efficientnet_lite0", "--data", "imagefolder:/no/such/val"], "does not exist"),
        (["--model", "efficientnet_lite0", "--data", "IMAGENET"], "--probe"),
        (["--model", "efficientnet_lite0", "--data", "IMAGENET", "--probe", "IMAGENET"],
         "not a Broden-format probe folder"),
        (["--model", "efficientnet_lite0", "--data", "IMAGENET", "--probe", "/no/such/broden"],
         "probe folder /no/such/broden does not exist"),
        (["--model", "efficientnet_lite0"], "choose a matching --data"),
        (["--models", "efficientnet_lite0", "x", "--train-data", "fashion-mnist"],
         "--train-data fine-tunes one given model"),
    ],
)  # fmt: skip
def test_bad_given_input_is_one_line_before_any_stage(
    args, message, imagenet_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    # IMAGENET: the photo folder, as --data's imagefolder: spec or as a (non-Broden) --probe.
    args = [
        (str(imagenet_dir) if prev == "--probe" else f"imagefolder:{imagenet_dir}")
        if a == "IMAGENET"
        else a
        for prev, a in zip(["", *args], args, strict=False)
    ]
    rc, out, err = run_cli(capsys, "reproduce", *args, "--out", run)
    assert rc == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("advinterp: error: "), err
    assert message in lines[0], lines[0]
    assert not (run / "stages").exists()


def test_train_data_fine_tunes_adv_and_at_from_the_given_model(two_checkpoints, tmp_path, capsys):
    normal, _ = two_checkpoints
    run = tmp_path / "run"
    rc, out, err = run_cli(
        capsys, "reproduce", "--model", normal, "--train-data", "fashion-mnist", "--out", run,
        "--quick", "--adv-limit", "200", "--limit", "30", "--probe-size", "30", "--lam", "10",
        "--steps", "3", "--draws", "200", "--dissect-layers", "layer3.0",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"] == ["plain", "plain-Adv", "plain-AT"]
    roles = {n: r["role"] for n, r in summary["roles"].items()}
    assert roles == {"plain": "normal", "plain-Adv": "adv", "plain-AT": "at"}
    for name, beta in (("plain-Adv", 1.0), ("plain-AT", 0.0)):
        key = json.loads((run / "stages" / f"advtrain {name}.json").read_text())["key"]
        assert key["beta"] == beta and key["limit"] == 200 and key["init"]
        assert (run / name / "model.safetensors").is_file()
    claims = [f["claim"] for f in summary["findings"]]
    assert any(c.startswith("plain-Adv vs plain-AT") for c in claims)
    assert sum("CS1 stays high" in c for c in claims) == 2


def test_given_models_dissect_a_size_of_network_that_fits(
    lite0, imagenet_dir, probe_dir, two_checkpoints
):
    """Without ``--dissect-layers``, Table 1 reads every unit of a 28² model but the last two
    stages of a 224² one: every unit of efficientnet_lite0 (21,008) on a Broden probe would
    hold gigabytes of IoU counts."""
    from advinterp.analysis.dissection import map_layers
    from advinterp.reproduce import ReproduceConfig, _check_given

    cfg = ReproduceConfig(
        models=("efficientnet_lite0",), data=f"imagefolder:{imagenet_dir}", probe=str(probe_dir)
    ).resolved()
    _check_given(cfg)
    assert cfg.dissect_layers == ("stages",)
    assert map_layers(lite0, cfg.dissect_layers) == ["blocks.5", "blocks.6"]
    cfg = ReproduceConfig(models=(str(two_checkpoints[0]),)).resolved()
    _check_given(cfg)
    assert cfg.dissect_layers == ("units",)
    cfg = ReproduceConfig(models=(str(two_checkpoints[0]),), dissect_layers=("nope",)).resolved()
    with pytest.raises(UserError, match="nope"):
        _check_given(cfg)
