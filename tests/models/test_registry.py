import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from advinterp.errors import UserError
from advinterp.models import (
    SMALL_ARCHS,
    Classifier,
    conv_layers,
    create_model,
    layer_shapes,
    load_model,
    model_config,
    save_checkpoint,
)


def test_wrapper_normalises_pixels():
    model = Classifier(
        nn.Identity(), mean=(0.5, 0.25), std=(0.5, 0.25), input_size=4, num_classes=2
    )
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25], dim=1)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("arch", list(SMALL_ARCHS))
def test_paper_archs_take_28x28_grey_images(arch):
    model = create_model(arch).eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert conv_layers(model)


def test_torchvision_layer_names_are_kept():
    names = {n for n, _, _ in layer_shapes(create_model("resnet18"))}
    assert {"conv1", "layer1.0.conv1", "layer4.1.conv2", "fc"} <= names
    assert "features.28" in {n for n, _, _ in layer_shapes(create_model("vgg16"))}


def test_default_model_keeps_space_in_its_last_block():
    shapes = {n: s for n, _, s in layer_shapes(create_model("resnet"))}
    c, h, w = shapes["layer3"]
    assert h >= 4 and w >= 4


def test_checkpoint_round_trip(tmp_path):
    model = create_model("resnet").eval()
    save_checkpoint(tmp_path / "m", model, model_config(model, "resnet", name="resnet-x"))
    loaded = load_model(str(tmp_path / "m.safetensors"))
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.config["name"] == "resnet-x" and loaded.wnids == model.wnids


def test_bad_checkpoints_are_clear_errors(tmp_path):
    model = create_model("resnet")
    path = save_checkpoint(tmp_path / "m", model, model_config(model, "resnet"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_model(str(path))
    other = create_model("resnet18")
    save_checkpoint(tmp_path / "w", other, model_config(model, "resnet"))  # config lies about arch
    with pytest.raises(UserError, match="do not fit"):
        load_model(str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "absent.safetensors"))
    with pytest.raises(UserError, match="train it"):
        load_model("resnet")


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "googlenet", "timm:resnet50"])
def test_a_name_without_weights_is_refused_not_random(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty local cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="--weights FILE, --weights imagenet"):
        load_model(name)


def test_paper_archs_load_by_name_at_imagenet_size(tmp_path):
    """--model resnet18 --weights F is torchvision's ImageNet ResNet-18, labelled by wnid."""
    import torchvision

    net = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = load_model("resnet18", weights=str(path))
    assert (model.in_chans, model.input_size, model.num_classes) == (3, 224, 1000)
    assert model.wnids[281] == "n02123045" and len(set(model.wnids)) == 1000
    x = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert torch.allclose(model(x), net.eval()((x - mean) / std), atol=1e-5)


def test_cached_torchvision_weights_are_used_offline(tmp_path, monkeypatch):
    """A file in torchvision's hub cache under its URL's name is found without --weights."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("alexnet").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = torchvision.models.alexnet()
    torch.save(net.state_dict(), cache / url.rsplit("/", 1)[1])
    model = load_model("alexnet")
    assert torch.equal(model.net.features[0].weight, net.features[0].weight)


def test_googlenet_without_auxiliary_heads_loads(tmp_path):
    """A GoogLeNet state dict with or without aux1/aux2 loads; transform_input as torchvision's."""
    import torchvision

    net = torchvision.models.googlenet(aux_logits=False, init_weights=False)
    path = tmp_path / "g.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(path))
    model = load_model("googlenet", weights=str(path))
    assert model.net.aux1 is None and model.net.transform_input


def test_pth_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(UserError):
        load_model("resnet18", weights=str(path))


def test_layers_verb_lists_names_and_shapes():
    out = subprocess.run(
        [sys.executable, "-m", "advinterp", "layers", "resnet", "--conv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["conv1", "Conv2d", "16×28×28"]  # the header goes to stderr
    assert any(
        line.split()[0] == "layer3.0.conv2" and line.split()[2] == "64×7×7" for line in lines
    )
