import torch

from advinterp.analysis import top_pass
from advinterp.models import create_model
from advinterp.stats import TopK

from .conftest import layer_responses


def test_top_pass_equals_one_topk_per_layer_and_store():
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    x = torch.rand(150, 1, 28, 28)
    allowed = torch.rand(150) < 0.4
    layers = ["conv1", "layer2.0.downsample.0", "layer3.0.conv2"]
    batches = [(x[s : s + 20], torch.arange(s, min(s + 20, 150))) for s in range(0, 150, 20)]
    # A flush every 50 rows: store updates that straddle batches.
    got = top_pass(model, batches, layers, {"all": (7, None), "some": (5, allowed)}, flush_rows=50)
    for layer in layers:
        full = layer_responses(model, layer, x)
        for name, k, keep in (("all", 7, torch.ones(150, dtype=torch.bool)), ("some", 5, allowed)):
            want = TopK(k, full.shape[1])
            want.add(full[keep], keep.nonzero()[:, 0])
            values, indices = got[name][layer].result()
            torch.testing.assert_close(values, want.result()[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(indices, want.result()[1])
            assert got[name][layer].count == int(keep.sum())
