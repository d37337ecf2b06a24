import math

import pytest
import torch

from advinterp.errors import UserError
from advinterp.io import read_state_dict, save_tensors
from advinterp.models import create_model
from advinterp.record import Recorder
from advinterp.stats import TopK, k_for_fraction, top_responses


def _full_sort(values: torch.Tensor, indices: torch.Tensor, k: int):
    """The reference: sort every unit's whole column at once."""
    order = values.t().argsort(dim=1, descending=True)[:, :k]
    return values.t().gather(1, order), indices[order]


def _stream(values, indices, k, sizes):
    top = TopK(k, values.shape[1])
    for v, i in zip(values.split(sizes), indices.split(sizes), strict=True):
        top.add(v, i)
    return top


def test_topk_equals_full_sort_on_random_data():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1000, 37, generator=gen)
    indices = torch.randperm(5000, generator=gen)[:1000]  # image ids need not be 0..N-1
    top = _stream(values, indices, 25, [1, 7, 300, 92, 600])  # batches smaller and larger than k
    got_v, got_i = top.result()
    want_v, want_i = _full_sort(values, indices, 25)
    torch.testing.assert_close(got_v, want_v)
    assert torch.equal(got_i, want_i)
    assert top.count == 1000


def test_fewer_images_than_k_pads_with_minus_one():
    top = TopK(5, 2)
    top.add(torch.tensor([[1.0, 4.0], [3.0, 2.0]]), torch.tensor([10, 11]))
    values, indices = top.result()
    assert indices.tolist() == [[11, 10, -1, -1, -1], [10, 11, -1, -1, -1]]
    assert values[0, :2].tolist() == [3.0, 1.0] and math.isinf(values[0, 2])


def test_merging_two_shards_equals_one_pass():
    gen = torch.Generator().manual_seed(1)
    values, indices = torch.randn(800, 20, generator=gen), torch.arange(800)
    one = _stream(values, indices, 16, [200] * 4)
    rank0 = _stream(values[::2], indices[::2], 16, [100] * 4)  # interleaved shards, as a sampler
    rank1 = _stream(values[1::2], indices[1::2], 16, [150, 250])
    rank0.merge(rank1)
    torch.testing.assert_close(rank0.result()[0], one.result()[0])
    assert torch.equal(rank0.result()[1], one.result()[1])
    assert rank0.count == one.count == 800
    with pytest.raises(ValueError, match="cannot merge"):
        rank0.merge(TopK(8, 20))


def test_state_dict_round_trip_through_a_file_resumes_exactly(tmp_path):
    gen = torch.Generator().manual_seed(2)
    values, indices = torch.randn(600, 9, generator=gen), torch.arange(600)
    whole = _stream(values, indices, 10, [100] * 6)
    first = _stream(values[:300], indices[:300], 10, [100] * 3)
    save_tensors(tmp_path / "top.safetensors", first.state_dict())  # checkpoint, "crash", resume
    resumed = TopK(10, 9)
    resumed.set_state_dict(read_state_dict(tmp_path / "top.safetensors"))
    assert resumed.count == 300
    for v, i in zip(values[300:].split(100), indices[300:].split(100), strict=True):
        resumed.add(v, i)
    torch.testing.assert_close(resumed.result()[0], whole.result()[0])
    assert torch.equal(resumed.result()[1], whole.result()[1])
    assert TopK.from_state_dict(whole.state_dict()).count == 600
    with pytest.raises(UserError, match="another layer or k"):
        TopK(4, 9).set_state_dict(whole.state_dict())


def test_top_responses_over_a_model_matches_recording_everything():
    torch.manual_seed(0)
    model = create_model("resnet").eval()
    images = torch.rand(120, 1, 28, 28)
    ids = torch.arange(120).split(50)
    batches = [(x, None, idx) for x, idx in zip(images.split(50), ids, strict=True)]
    tops = top_responses(model, batches, k=6, layers=["layer2.0.conv1", "layer3.0.conv2"])
    with torch.inference_mode(), Recorder(model, ["layer3.0.conv2"]) as rec:
        everything = rec(images)["layer3.0.conv2"]  # 120×64: every response, for reference
    want_v, want_i = _full_sort(everything, torch.arange(120), 6)
    torch.testing.assert_close(tops["layer3.0.conv2"].result()[0], want_v)
    assert torch.equal(tops["layer3.0.conv2"].result()[1], want_i)
    assert tops["layer2.0.conv1"].num_units == 32


def test_k_for_fraction():
    assert k_for_fraction(10000) == 100  # the paper's top 1% of the Fashion-MNIST test set
    assert k_for_fraction(50_000) == 500  # … of ImageNet's validation set
    assert k_for_fraction(150) == 2 and k_for_fraction(10) == 1
    with pytest.raises(UserError):
        k_for_fraction(100, 0)


def _reference_with_ties(values: torch.Tensor, indices: torch.Tensor, k: int):
    """Every unit's column sorted by value, equal values by image index, smaller first."""
    by_index = indices.argsort()
    v, i = values[by_index].t(), indices[by_index]
    order = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), i[order]


def test_ties_go_to_the_smaller_index_whatever_the_order_batches_and_shards():
    # Responses of few distinct values (as a ReLU's zeros or duplicated images give): most
    # of every top-k is ties, and the boundary of each falls inside a run of equal values.
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (500, 12), generator=gen).float()
    values[:, 0] = 0.0  # a dead unit: every image ties
    indices = torch.randperm(500, generator=gen)
    want_v, want_i = _reference_with_ties(values, indices, 30)
    shuffled = torch.randperm(500, generator=gen)
    runs = [
        _stream(values, indices, 30, [500]),
        _stream(values, indices, 30, [1, 29, 170, 300]),
        _stream(values[shuffled], indices[shuffled], 30, [64] * 7 + [52]),
    ]
    rank0 = _stream(values[1::3], indices[1::3], 30, [40] * 4 + [7])
    rank1 = _stream(values[::3], indices[::3], 30, [167])
    rank2 = _stream(values[2::3], indices[2::3], 30, [100, 66])
    rank2.merge(rank0)
    rank2.merge(rank1)
    for top in [*runs, rank2]:
        assert torch.equal(top.result()[0], want_v)
        assert torch.equal(top.result()[1], want_i)
    assert want_i[0].tolist() == sorted(indices.tolist())[:30]
