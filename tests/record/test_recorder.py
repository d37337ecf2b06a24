import pytest
import torch

from advinterp.errors import UserError
from advinterp.models import conv_layers, create_model
from advinterp.record import Recorder, resolve_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    # Non-trivial BatchNorm statistics, so a wrong input to a layer shows.
    for m in model.net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _manual_maps(model, x):
    """The maps of conv1, layer1.0.conv1 and layer3.0.conv2, by calling the submodules by hand."""
    net = model.net
    h = (x - model.mean) / model.std
    maps = {"conv1": net.conv1(h)}
    h = net.relu(net.bn1(maps["conv1"]))
    maps["layer1.0.conv1"] = net.layer1[0].conv1(h)
    h = net.layer2(net.layer1(h))
    block = net.layer3[0]
    maps["layer3.0.conv2"] = block.conv2(block.relu(block.bn1(block.conv1(h))))
    return maps


def test_max_response_equals_brute_force_max_of_the_map(model):
    x = torch.rand(6, 1, 28, 28)
    layers = ["conv1", "layer1.0.conv1", "layer3.0.conv2"]
    with torch.inference_mode():
        expected = _manual_maps(model, x)
        with Recorder(model, layers, keep_maps=["layer3.0.conv2"]) as rec:
            responses = rec(x)
        logits = model(x)
    assert list(responses) == layers
    for name in layers:
        brute = torch.stack(
            [torch.stack([m.max() for m in image]) for image in expected[name]]
        )  # per image, per channel: the largest value of its map
        assert responses[name].shape == (6, expected[name].shape[1])
        torch.testing.assert_close(responses[name], brute)
    torch.testing.assert_close(rec.maps["layer3.0.conv2"], expected["layer3.0.conv2"])
    torch.testing.assert_close(rec.output, logits)  # recording does not change the model


def test_mean_reduction(model):
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode(), Recorder(model, "layer1.0.conv1", reduce="mean") as rec:
        got = rec(x)["layer1.0.conv1"]
        expected = _manual_maps(model, x)["layer1.0.conv1"].mean((2, 3))
    torch.testing.assert_close(got, expected)


def test_conv_records_every_conv_layer_and_hooks_are_removed(model):
    assert resolve_layers(model, "conv") == conv_layers(model)
    assert resolve_layers(model, ["net.conv1", "conv1"]) == ["conv1"]
    with torch.inference_mode(), Recorder(model, "conv") as rec:
        responses = rec(torch.rand(2, 1, 28, 28))
    assert list(responses) == conv_layers(model)
    assert responses["layer3.0.conv2"].shape == (2, 64)
    assert all(not m._forward_hooks for m in model.net.modules())


def test_hooks_do_not_hold_the_graph(model):
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with Recorder(model, ["layer2.0.conv1"]) as rec:
        model(x).sum().backward()  # an attack's gradient pass with the recorder active
    assert not rec.responses["layer2.0.conv1"].requires_grad
    assert x.grad is not None


def test_unknown_layer_names_close_matches(model):
    with pytest.raises(UserError, match=r"unknown layer 'layer1\.0\.conv'.*layer1\.0\.conv1"):
        Recorder(model, ["layer1.0.conv"])
    with pytest.raises(UserError, match="unknown reduction"):
        Recorder(model, "conv", reduce="median")
    with pytest.raises(UserError, match="not recorded"):
        Recorder(model, ["conv1"], keep_maps=["fc"])
