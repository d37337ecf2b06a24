import math

import pytest
import torch

from advinterp.errors import UserError
from advinterp.metrics.semantics import (
    class_distribution,
    cs,
    fig10_bins,
    lc,
    semantics,
    unit_semantics,
)
from advinterp.metrics.wordnet import similarity_from_distances

# A toy hierarchy of three classes:   entity ─┬─ animal ─┬─ cat
#                                             │          └─ dog
#                                             └─ car
# Shortest paths: cat–dog 2 (via animal), cat–car 3 and dog–car 3 (via entity).
TOY_D = torch.tensor([[0.0, 2.0, 3.0], [2.0, 0.0, 3.0], [3.0, 3.0, 0.0]])
E2, E45 = 0.1353352832366127, 0.011108996538242306  # exp(-2²/2), exp(-3²/2)


@pytest.fixture
def C():
    return similarity_from_distances(TOY_D, sigma=1.0)


def test_toy_similarity_matrix_by_hand(C):
    want = torch.tensor([[1.0, E2, E45], [E2, 1.0, E45], [E45, E45, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(C, want)
    # σ = 2 halves the exponent's scale: exp(-4/8), exp(-9/8).
    assert similarity_from_distances(TOY_D, sigma=2.0)[0, 1].item() == pytest.approx(math.exp(-0.5))
    assert similarity_from_distances(torch.tensor([[0.0, math.inf]]))[0, 1].item() == 0.0


def test_lc_by_hand(C):
    p = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # one class only: the highest LC
            [0.5, 0.5, 0.0],  # cat and dog: 1/4·(1 + 1 + 2·e⁻²)
            [0.5, 0.0, 0.5],  # cat and car: 1/4·(1 + 1 + 2·e⁻⁴·⁵)
            [1 / 3, 1 / 3, 1 / 3],  # (3 + 2·e⁻² + 4·e⁻⁴·⁵)/9
        ],
        dtype=torch.float64,
    )
    want = [1.0, 0.5676676416183064, 0.5055544982691212, 0.3683451725140215]
    assert lc(p, C).tolist() == pytest.approx(want, abs=1e-12)
    # The paper's point (§4.2): a unit firing on two related classes sits higher
    # than one firing on two unrelated classes.
    assert want[1] > want[2] > want[3]


def test_cs_by_hand(C):
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # Row 0: cat vs dog = e⁻² / (1·1). Row 1: (½ + ½e⁻²) / (√(½ + ½e⁻²) · 1).
    assert cs(p, q, C).tolist() == pytest.approx([E2, math.sqrt(0.5 + 0.5 * E2)], abs=1e-12)


def test_cs1_is_one_when_q_equals_p_and_symmetric(C):
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(50, 3, generator=gen)
    p /= p.sum(1, keepdim=True)
    q = torch.rand(50, 3, generator=gen)
    q /= q.sum(1, keepdim=True)
    out = semantics(p, p, q, C)
    torch.testing.assert_close(out["cs1"], torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(cs(p, q, C), cs(q, p, C))
    assert bool((out["cs2"] <= 1 + 1e-12).all() and (out["cs2"] > 0).all())
    assert cs(p[:1], torch.zeros(1, 3), C).isnan().all()  # no adversarial image: undefined


def test_class_distribution_ignores_unfilled_slots():
    labels = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2], [-1, -1, -1, -1]])
    want = [[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    got = class_distribution(labels, 3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(UserError, match="out of range"):
        class_distribution(torch.tensor([[3]]), 3)


def test_unit_semantics_from_topk_indices(C):
    real_labels = torch.tensor([0, 1, 2, 0, 1])  # classes of real images 0..4
    adv_labels = torch.tensor([0, 0, 2, 1])  # true classes of adversarial images 0..3
    adv_targets = torch.tensor([2, 2, 1, 2])  # their target classes
    real_top = torch.tensor([[0, 3], [0, 1]])  # unit 0: two cats; unit 1: cat and dog
    adv_top = torch.tensor([[0, 1], [2, -1]])  # unit 1's second slot is unfilled
    out = unit_semantics(real_top, real_labels, adv_top, adv_labels, adv_targets, C)
    assert out["p"].tolist() == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    assert out["q"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert out["q_target"].tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    lc1 = 0.5 + 0.5 * E2
    assert out["lc"].tolist() == pytest.approx([1.0, lc1])
    # Unit 0: real cats, adversarial cats aimed at car. Unit 1: cat/dog vs a car aimed at dog.
    assert out["cs1"].tolist() == pytest.approx([1.0, E45 / math.sqrt(lc1)])
    assert out["cs2"].tolist() == pytest.approx([E45, (0.5 * E2 + 0.5) / math.sqrt(lc1)])


def test_fig10_bins_by_hand():
    lc_ = torch.tensor([0.10, 0.20, 0.55, 0.95, 1.00])
    cs1 = torch.tensor([0.9, 0.7, 0.5, float("nan"), 0.1])
    cs2 = torch.tensor([0.1, 0.3, 0.4, 0.8, 0.6])
    bins = fig10_bins(lc_, cs1, cs2, bins=[0.0, 0.5, 0.6, 0.7, 1.0])
    assert [b["n_units"] for b in bins] == [2, 1, 2]  # the empty 0.6–0.7 bin is dropped
    assert bins[0]["lc"] == pytest.approx(0.15)
    assert bins[0]["cs1"] == pytest.approx(0.8) and bins[0]["cs2"] == pytest.approx(0.2)
    assert bins[2]["cs1"] == pytest.approx(0.1)  # NaN left out; 1.0 falls in the last bin
    assert bins[2]["cs2"] == pytest.approx(0.7)
    assert (bins[2]["lc_lo"], bins[2]["lc_hi"]) == (0.7, 1.0)
    assert len(fig10_bins(lc_, cs1, cs2, bins=10)) == 4
    with pytest.raises(UserError):
        fig10_bins(lc_, cs1, cs2, bins=[0.5, 0.1])
