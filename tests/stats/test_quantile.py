import pytest
import torch

from advinterp.errors import UserError
from advinterp.io import read_state_dict, save_tensors
from advinterp.stats import Quantile, TopQuantile
from advinterp.stats.quantile import tail_window

Q = 0.995


def _rank_error(data: torch.Tensor, estimate: torch.Tensor, q: float) -> torch.Tensor:
    """How far ``q`` lies from the interval of ranks the estimate occupies in ``data`` (per unit).

    With ties (a ReLU's zeros) a value covers a range of ranks; an estimate anywhere
    in that range is exact."""
    below = (data < estimate).double().mean(0)
    at_most = (data <= estimate).double().mean(0)
    return torch.clamp(torch.maximum(below - q, q - at_most), min=0)


def _data(kind: str, n: int = 120_000, units: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, units, generator=gen) * torch.linspace(0.1, 10, units)
    if kind == "relu":  # most values exactly zero, as a ReLU map
        return torch.relu(torch.randn(n, units, generator=gen) - 1.5)
    if kind == "exponential":
        return torch.empty(n, units).exponential_(generator=gen)
    if kind == "cauchy":  # heavy tails: fixed-range histograms fail here
        return torch.empty(n, units).cauchy_(generator=gen)
    raise AssertionError(kind)


def _stream(data: torch.Tensor, batch: int = 5000, **kwargs) -> Quantile:
    sketch = Quantile(data.shape[1], **kwargs)
    for rows in data.split(batch):
        sketch.add(rows)
    return sketch


@pytest.mark.parametrize("kind", ["normal", "relu", "exponential", "cauchy"])
def test_streamed_quantile_matches_torch_quantile_within_rank_error(kind):
    data = _data(kind)
    sketch = _stream(data)
    got = sketch.quantile(Q)
    assert got.shape == (16,)
    assert _rank_error(data, got, Q).max() <= 1e-3
    exact = torch.quantile(data, Q, dim=0, interpolation="lower")
    assert _rank_error(data, exact, Q).max() == 0  # the yardstick itself is exact
    assert sketch.count == len(data)


def test_memory_does_not_grow_with_the_number_of_values():
    sketch = Quantile(4, resolution=256)
    gen = torch.Generator().manual_seed(1)
    sizes = []
    for _ in range(200):
        sketch.add(torch.randn(1000, 4, generator=gen))
        sizes.append(sum(lv.shape[1] for lv in sketch.levels))
    assert max(sizes) <= 3 * 256 + 8 * len(sketch.levels)
    assert sizes[-1] < 1000


def test_exact_while_everything_fits():
    data = _data("normal", n=3000)
    sketch = _stream(data, batch=700)  # never compacts below the resolution
    qs = torch.tensor([0.0, 0.5, Q, 1.0], dtype=torch.float64)
    got = sketch.quantile(qs)
    # The sketch returns the smallest value whose rank reaches q·n: torch's "lower"
    # whenever q·n is a whole number, as for every q here.
    want = torch.quantile(data, qs.float(), dim=0, interpolation="lower").t()
    torch.testing.assert_close(got, want)


def test_merge_of_two_shards_equals_one_pass():
    data = _data("exponential", seed=3)
    one = _stream(data)
    first, second = _stream(data[:50_000], seed=1), _stream(data[50_000:], seed=2)
    first.merge(second)
    assert first.count == len(data)
    merged, single = first.quantile(Q), one.quantile(Q)
    assert _rank_error(data, merged, Q).max() <= 1e-3
    assert _rank_error(data, single, Q).max() <= 1e-3


def test_state_dict_round_trip_resumes_identically(tmp_path):
    data = _data("relu", n=60_000)
    whole = _stream(data)
    half = _stream(data[:30_000])
    save_tensors(tmp_path / "q.safetensors", half.state_dict())
    resumed = Quantile(16)
    resumed.set_state_dict(read_state_dict(tmp_path / "q.safetensors"))
    for rows in data[30_000:].split(5000):
        resumed.add(rows)
    torch.testing.assert_close(resumed.quantile(Q), whole.quantile(Q))
    assert Quantile.from_state_dict(whole.state_dict()).count == 60_000


def test_user_errors():
    with pytest.raises(UserError, match="no values"):
        Quantile(3).quantile(Q)
    with pytest.raises(ValueError, match="N×3"):
        Quantile(3).add(torch.zeros(5, 4))
    with pytest.raises(UserError, match="another layer"):
        Quantile(3).set_state_dict(_stream(torch.zeros(10, 2)).state_dict())
    with pytest.raises(UserError, match="lacks"):
        Quantile(3).set_state_dict({})


# -- TopQuantile: exact upper quantiles -------------------------------------------------------


def _maps(kind: str, n: int = 60, units: int = 6, seed: int = 0) -> torch.Tensor:
    """``n`` maps of ``units`` units, 5×5, whose values follow ``kind``."""
    values = _data(kind, n=n * 25, units=units, seed=seed)  # (n·25)×U
    return values.view(n, 25, units).permute(0, 2, 1).reshape(n, units, 5, 5).contiguous()


def _all(maps: torch.Tensor) -> torch.Tensor:
    return maps.transpose(0, 1).reshape(maps.shape[1], -1)  # U × every value


@pytest.mark.parametrize("kind", ["normal", "relu", "cauchy"])
@pytest.mark.parametrize("known", [True, False])
def test_top_quantile_is_torch_quantile_bit_for_bit(kind, known):
    maps = _maps(kind)
    total = maps.shape[0] * 25 if known else None
    top = TopQuantile(6, Q, total=total)
    for batch in maps.split(7):
        top.add(batch)
    for q in (Q, 0.999):
        assert torch.equal(top.quantile(q), torch.quantile(_all(maps), q, dim=1))
    assert top.exact().all() and top.count == maps.shape[0] * 25
    # N×U rows are values too.
    rows = TopQuantile(6, Q)
    rows.add(_all(maps).t())
    assert torch.equal(rows.quantile(), top.quantile())


def test_top_quantile_is_exact_in_any_order_when_the_total_is_known():
    maps = _maps("exponential", n=80)
    values = _all(maps)
    ordered = values.sort(dim=1, descending=True).values  # the largest first: the worst order
    stream = ordered.t().reshape(80, 25, 6).permute(0, 2, 1)
    top = TopQuantile(6, Q, total=80 * 25)
    for batch in stream.split(3):
        top.add(batch)
    assert torch.equal(top.quantile(), torch.quantile(values, Q, dim=1))
    assert top.exact().all()
    # Unknown total: a long run of small values after the large ones is caught, not hidden.
    blind = TopQuantile(1, Q)
    blind.add(torch.full((3000, 1), 5.0) + torch.rand(3000, 1))
    for _ in range(20):
        blind.add(torch.rand(20_000, 1))
    assert not blind.exact().any()


def test_top_quantile_merge_and_state_dict(tmp_path):
    maps = _maps("relu", n=90, seed=4)
    whole = TopQuantile(6, Q, total=90 * 25)
    whole.add(maps)
    shards = [TopQuantile(6, Q, total=90 * 25) for _ in range(3)]
    for i, batch in enumerate(maps.split(10)):
        shards[i % 3].add(batch)
    save_tensors(tmp_path / "t.safetensors", shards[2].state_dict())
    resumed = TopQuantile(6, Q)
    resumed.load_state_dict(read_state_dict(tmp_path / "t.safetensors"))
    shards[0].merge(shards[1])
    shards[0].merge(resumed)
    assert torch.equal(shards[0].quantile(), torch.quantile(_all(maps), Q, dim=1))
    assert torch.equal(shards[0].quantile(), whole.quantile())


def test_top_quantile_bound_and_window():
    maps = _maps("normal", n=200, seed=5)
    final = torch.quantile(_all(maps), Q, dim=1)
    top = TopQuantile(6, Q, total=200 * 25)
    for batch in maps.split(20):
        top.add(batch)
        assert (top.lower_bound() <= final).all()  # a guarantee, batch after batch
        low, high = tail_window(top)
        assert (low <= top.quantile()).all() and (top.quantile() <= high).all()
    assert torch.isinf(TopQuantile(6, Q).lower_bound()).all()  # nothing known yet


def test_top_quantile_errors():
    top = TopQuantile(2, Q)
    with pytest.raises(UserError, match="nothing"):
        top.quantile()
    top.add(torch.rand(100, 2))
    with pytest.raises(UserError, match="answers quantiles in"):
        top.quantile(0.5)
    with pytest.raises(ValueError, match="N×2"):
        top.add(torch.zeros(4, 3))
    with pytest.raises(UserError, match="another layer"):
        top.set_state_dict(TopQuantile(3, Q).state_dict() | {"values": torch.zeros(3, 4)})
