"""Where units are read by default: after batch norm and nonlinearity (``"units"``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advinterp.errors import UserError
from advinterp.models import create_model
from advinterp.record import Recorder, resolve_layers, unit_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    for m in model.net.modules():  # negative BN scales: a raw conv map ranks them upside down
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _by_hand(model, x):
    """Each read-out of the compact ResNet, computed by calling its parts in order."""
    net = model.net
    h = F.relu(net.bn1(net.conv1((x - model.mean) / model.std)))
    maps = {"relu": h}
    for stage in ("layer1", "layer2", "layer3"):
        block = getattr(net, stage)[0]
        inner = F.relu(block.bn1(block.conv1(h)))
        short = h if block.downsample is None else block.downsample(h)
        h = F.relu(block.bn2(block.conv2(inner)) + short)
        maps[f"{stage}.0.relu#1"], maps[f"{stage}.0"] = inner, h
    return maps


def test_units_of_the_compact_resnet_are_the_post_relu_maps(model):
    names = unit_layers(model)
    assert names == [
        "relu",
        "layer1.0.relu#1",
        "layer1.0",
        "layer2.0.relu#1",
        "layer2.0",
        "layer3.0.relu#1",
        "layer3.0",
    ]
    assert resolve_layers(model, "units") == names == resolve_layers(model, ["units"])
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        want = _by_hand(model, x)
        with Recorder(model, keep_maps=True) as rec:  # "units" is the default
            responses = rec(x)
    assert list(responses) == names
    for name in names:
        torch.testing.assert_close(rec.maps[name], want[name])
        torch.testing.assert_close(responses[name], want[name].amax((2, 3)))
        assert (responses[name] >= 0).all()
    # Raw conv outputs stay available, and differ (before BN and ReLU).
    with torch.inference_mode(), Recorder(model, "conv") as raw:
        conv = raw(x)
    assert "layer1.0.conv1" in conv and not torch.equal(
        conv["layer1.0.conv1"], responses["layer1.0.relu#1"]
    )


def test_call_numbers_pick_one_call_of_a_module_that_runs_twice(model):
    x = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        want = _by_hand(model, x)
        with Recorder(model, ["layer2.0.relu#2", "layer2.0.relu#1"], reduce=None) as rec:
            first = {k: v.clone() for k, v in rec(x).items()}
            second = rec(x)  # call numbers restart with each forward pass
    torch.testing.assert_close(first["layer2.0.relu#2"], want["layer2.0"])
    torch.testing.assert_close(first["layer2.0.relu#1"], want["layer2.0.relu#1"])
    torch.testing.assert_close(second["layer2.0.relu#1"], want["layer2.0.relu#1"])
    with pytest.raises(UserError, match="did not run"):
        with torch.inference_mode(), Recorder(model, "layer2.0.relu#3") as rec:
            rec(x)
    for bad in ("layer2.0.relu#0", "layer2.0.relu#x"):
        with pytest.raises(UserError, match="call number"):
            resolve_layers(model, bad)


def test_units_of_the_papers_architectures():
    # AlexNet/VGG: the ReLU after each convolution; ResNet-18: stem, each block's first
    # ReLU and its output.
    alex = create_model("alexnet")
    relus = [n for n, m in alex.net.features.named_children() if isinstance(m, nn.ReLU)]
    assert unit_layers(alex) == [f"features.{n}" for n in relus]
    r18 = unit_layers(create_model("resnet18"))
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert r18 == ["relu"] + [n for b in blocks for n in (f"{b}.relu#1", b)]


def test_a_functional_relu_is_read_at_the_block_that_holds_it():
    class ConvBnRelu(nn.Module):  # torchvision's BasicConv2d: F.relu, not a module
        def __init__(self, cin, cout):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ConvBnRelu(1, 4), ConvBnRelu(4, 6)
            self.head = nn.Conv2d(6, 3, 1)  # a last conv with nothing after it

        def forward(self, x):
            return self.head(self.b(self.a(x))).mean((2, 3))

    net = Net()
    net.input_size, net.in_chans = 8, 1
    assert unit_layers(net) == ["a", "b", "head"]


def test_layers_units_lists_the_read_out_points_from_the_cli(capsys):
    from advinterp.cli import main

    assert main(["layers", "resnet", "--units"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == unit_layers(create_model("resnet"))
    assert rows[1] == ["layer1.0.relu#1", "ReLU", "16×28×28"]
    assert rows[-1] == ["layer3.0", "BasicBlock", "64×7×7"]
    with pytest.raises(SystemExit) as exit_:  # one or the other, as argparse refuses
        main(["layers", "resnet", "--units", "--conv"])
    assert exit_.value.code == 2


def test_dissection_takes_the_units_with_their_map_shapes(model):
    from advinterp.analysis.dissection import map_layers

    assert map_layers(model, ["units"]) == unit_layers(model)
    assert map_layers(model, ["layer2.0.relu#1"]) == ["layer2.0.relu#1"]
    with pytest.raises(UserError, match="not C×H×W maps"):
        map_layers(model, ["fc"])
