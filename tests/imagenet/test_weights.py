"""A torchvision architecture with the user's weights file, loaded by name: torchvision's own
ImageNet network at 224², with torchvision's layer names."""

import csv
import json
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tests.imagenet.conftest import run_cli


@pytest.fixture(scope="package")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture(scope="package", params=["pth", "safetensors"])
def resnet18_file(request, tmp_path_factory, resnet18_state):
    """Random ResNet-18 weights saved by the user as ``.pth`` (torch.save of the state dict)
    or ``.safetensors``."""
    path = tmp_path_factory.mktemp("weights") / f"resnet18.{request.param}"
    if request.param == "pth":
        torch.save(resnet18_state, path)
    else:
        save_file({k: v.contiguous() for k, v in resnet18_state.items()}, path)
    return path


def _layer_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and re.fullmatch(r"\d+(×\d+)*", parts[-1]):
            rows[parts[0]] = (parts[1], tuple(int(v) for v in parts[-1].split("×")))
    return rows


def test_layers_lists_torchvision_names_at_224(resnet18_file, capsys):
    rc, out, err = run_cli(capsys, "layers", "resnet18", "--weights", resnet18_file)
    assert rc == 0, err
    rows = _layer_rows(out)
    expected = [n for n, _ in torchvision.models.resnet18().named_modules() if n]
    assert set(rows) == set(expected)
    # torchvision's stem (7×7 conv, stride 2, max-pool) on a 224² RGB image.
    assert rows["conv1"] == ("Conv2d", (64, 112, 112))
    assert rows["maxpool"][1] == (64, 56, 56)
    assert rows["layer4.1.conv2"] == ("Conv2d", (512, 7, 7))
    assert rows["fc"][1] == (1000,)


def _torchvision_logits(state, x):
    """torchvision's resnet18 holding ``state``, on [0, 1] images normalised as torchvision's
    ImageNet weights expect."""
    net = torchvision.models.resnet18()
    net.load_state_dict(state)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return net.eval()((x - mean) / std)


def test_weights_file_holds_the_torchvision_network(resnet18_file, resnet18_state):
    """The file's weights are the ones used: the model's logits are those of torchvision's
    resnet18 holding the same state dict."""
    from advinterp.models import load_model

    model = load_model("resnet18", resnet18_file)
    assert model.input_size == 224 and model.in_chans == 3 and model.num_classes == 1000
    assert model.wnids is not None and model.wnids[281] == "n02123045"
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model.eval()(x)
    assert torch.allclose(got, _torchvision_logits(resnet18_state, x), atol=1e-4)


def test_evaluate_with_the_users_weights(resnet18_state, imagenet_dir, reference, tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, weights)
    rc, out, err = run_cli(
        capsys,
        "evaluate", "--model", "resnet18", "--weights", weights,
        "--data", f"imagefolder:{imagenet_dir}", "--batch-size", "8", "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "table2.json").read_text()).values()
    good = reference["good"]
    x = torch.stack([reference["images"][i] for i in good])
    labels = torch.tensor([reference["labels"][i] for i in good])
    ranked = _torchvision_logits(resnet18_state, x).topk(5, dim=1).indices
    assert row["n"] == 15
    assert row["clean_top1"] == pytest.approx(100 * int((ranked[:, 0] == labels).sum()) / 15)
    assert row["clean_top5"] == pytest.approx(
        100 * int((ranked == labels[:, None]).any(1).sum()) / 15
    )


def test_attack_and_semantics_with_the_users_weights(
    resnet18_state, imagenet_dir, tmp_path, capsys
):
    """``--weights`` reaches every verb that loads a model: an FGSM set, then the semantics
    of torchvision's last convolution over ImageNet's classes."""
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, weights)
    adv = tmp_path / "fgsm"
    rc, _, err = run_cli(
        capsys,
        "attack", "--model", "resnet18", "--weights", weights,
        "--data", f"imagefolder:{imagenet_dir}", "--method", "fgsm", "--eps", "4",
        "--batch-size", "8", "--out", adv,
    )  # fmt: skip
    assert rc == 0, err
    out = tmp_path / "semantics"
    rc, _, err = run_cli(
        capsys,
        "semantics", "--model", "resnet18", "--weights", weights, "--adversarial", adv,
        "--layers", "layer4.1.conv2", "--batch-size", "8", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    with open(out / "units.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 512 and {r["layer"] for r in rows} == {"layer4.1.conv2"}
    assert all(0 <= float(r["lc"]) <= 1 + 1e-9 for r in rows)
