import pytest
import torch

from advinterp.errors import UserError
from advinterp.models import conv_layers, create_model, layer_shapes
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


def _count_calls(module):
    """A hook that counts the forward passes of ``module``; returns (counter, handle)."""
    calls = [0]

    def hook(mod, inputs, output):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


def test_stop_gives_the_full_pass_maps_and_skips_later_layers(model):
    x = torch.rand(4, 1, 28, 28)
    layers = ["layer1.0.conv1", "conv1"]  # listed out of order: it stops after both ran
    with torch.inference_mode():
        expected = _manual_maps(model, x)
        with Recorder(model, layers, keep_maps=True) as rec:
            full = rec(x)
            full_maps, logits = dict(rec.maps), rec.output
        counters = [_count_calls(model.net.layer1[0].conv2), _count_calls(model.net.fc)]
        try:
            with Recorder(model, layers, reduce=None, stop=True) as rec:
                raw = rec(x)
                assert rec.output is None
                assert [calls[0] for calls, _ in counters] == [0, 0]
                # Outside ``rec(x)`` the model runs to the end, hooks on or not.
                torch.testing.assert_close(model(x), logits)
            with Recorder(model, layers, stop=True) as rec:
                reduced = rec(x)
        finally:
            for _, handle in counters:
                handle.remove()
    assert [calls[0] for calls, _ in counters] == [1, 1]  # the one direct model(x) above
    for name in layers:
        torch.testing.assert_close(raw[name], expected[name])
        torch.testing.assert_close(raw[name], full_maps[name])
        assert torch.equal(reduced[name], full[name])


def _pooled(model, x):
    """The penultimate feature (the input of ``fc``), by calling the submodules by hand."""
    net = model.net
    h = net.relu(net.bn1(net.conv1((x - model.mean) / model.std)))
    return net.avgpool(net.layer3(net.layer2(net.layer1(h)))).flatten(1)


def test_keep_graph_gives_the_gradient_of_a_plain_hook(model):
    x = torch.rand(3, 1, 28, 28)
    layer, module = "layer2.0.conv1", model.net.layer2[0].conv1
    weight = module.weight

    def grads(loss_of_map, run):
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(loss_of_map(run(xg)), (xg, weight))

    def plain(xg):
        seen = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            model(xg)
        finally:
            handle.remove()
        return seen[0]

    def recorded(reduce):
        def run(xg):
            with Recorder(model, layer, reduce=reduce, keep_graph=True) as rec:
                return rec(xg)[layer]

        return run

    want = grads(lambda m: m.pow(2).sum(), plain)
    got = grads(lambda m: m.pow(2).sum(), recorded(None))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w)
    # The reduced response keeps its graph too: the gradient of Σ max over space.
    want = grads(lambda m: m.flatten(2).amax(2).sum(), plain)
    got = grads(lambda r: r.sum(), recorded("max"))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w)


def test_inputs_records_the_penultimate_feature(model):
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        with Recorder(model, "fc", reduce=None, inputs=True) as rec:
            feature = rec(x)["fc"]
        expected = _pooled(model, x)
    assert feature.shape == (5, 64)
    torch.testing.assert_close(feature, expected)


def test_raw_outputs_and_layer_shapes_equal_a_manual_forward(model):
    x = torch.zeros(1, 1, 28, 28)
    with torch.inference_mode():
        maps = _manual_maps(model, x)
        pooled = _pooled(model, x)
        logits = model.net.fc(pooled)
    maps.update({"avgpool": pooled[:, :, None, None], "fc": logits})
    shapes = {name: (kind, shape) for name, kind, shape in layer_shapes(model)}
    ran = [name for name, _ in model.net.named_modules() if name]
    assert sorted(shapes) == sorted(ran)  # every module of this network runs
    for name, value in maps.items():
        module = dict(model.net.named_modules())[name]
        assert shapes[name] == (type(module).__name__, tuple(value.shape[1:]))
    with torch.inference_mode(), Recorder(model, list(maps), reduce=None) as rec:
        raw = rec(x)
    for name, value in maps.items():
        torch.testing.assert_close(raw[name], value)


def test_raw_outputs_may_be_any_type_but_reductions_need_tensors():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, 2 * x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return sum(self.pair(x))

    net, x = Net(), torch.rand(2, 3)
    with Recorder(net, "pair", reduce=None) as rec:
        (a, b) = rec(x)["pair"]
    torch.testing.assert_close(b, 2 * a)
    with (
        pytest.raises(UserError, match="returns tuple, not a tensor"),
        Recorder(net, "pair") as rec,
    ):
        rec(x)
