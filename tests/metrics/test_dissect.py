import pytest
import torch
from torch import nn

from advinterp.errors import UserError
from advinterp.metrics.dissect import dissect, label_categories
from advinterp.models import create_model

LABELS = ["-", "dot", "field", "stripes", "plain"]
CATEGORIES = {"object": [1, 2], "texture": [3, 4]}


def _probe(n=100, size=20, seed=0):
    """Images of faint noise with a bright 2×2 dot in half of them: the dots are exactly the
    top 0.5% of pixels (200 of 40,000). Object masks: dot (1) and the rest (2); texture:
    an image-level label."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=gen) * 0.5
    objects = torch.full((n, size, size), 2)
    for i in range(0, n, 2):
        r, c = torch.randint(0, size - 1, (2,), generator=gen).tolist()
        images[i, 0, r : r + 2, c : c + 2] += 1
        objects[i, r : r + 2, c : c + 2] = 1
    textures = torch.randint(3, 5, (n, 1), generator=gen)
    return [
        (images[s : s + 16], {"object": objects[s : s + 16], "texture": textures[s : s + 16]})
        for s in range(0, n, 16)
    ]


def _copy_model():
    """Unit 0 copies the image (and so the dot mask); unit 1 is its negative."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    return nn.Sequential(conv)


def test_unit_copying_a_concept_scores_iou_one():
    result = dissect(_copy_model(), "0", _probe(), CATEGORIES, LABELS, resolution=1 << 16)
    assert result.iou.shape == (2, 5)
    assert result.iou[0, 1] == pytest.approx(1.0)
    assert result.iou[0, 2:].max() < 0.02
    best = result.best()
    assert (best[0].category, best[0].label) == ("object", "dot")
    assert best[0].iou == pytest.approx(1.0)
    assert best[1].iou < 0.04
    assert result.interpretable() == {"object": 50.0, "texture": 0.0}


def test_default_sketch_is_close_to_exact():
    result = dissect(_copy_model(), "0", _probe(), CATEGORIES, LABELS)
    assert result.iou[0, 1] > 0.8  # a rank error of ≤ 1e-3 moves at most 40 of 200 pixels
    assert result.interpretable() == {"object": 50.0, "texture": 0.0}


def test_threshold_is_the_top_half_percent_quantile():
    probe = _probe()
    result = dissect(_copy_model(), "0", probe, CATEGORIES, LABELS, resolution=1 << 16)
    pixels = torch.cat([x for x, _ in probe]).flatten()
    assert result.thresholds[0] == torch.quantile(pixels, 0.995, interpolation="lower")
    strict = dissect(
        _copy_model(), "0", probe, CATEGORIES, LABELS, resolution=1 << 16, iou_threshold=0.4
    )
    assert strict.interpretable()["object"] == 50.0


def test_runs_on_the_default_model():
    model = create_model("resnet")
    gen = torch.Generator().manual_seed(1)
    probe = [
        (
            torch.rand(4, 1, 28, 28, generator=gen),
            {"object": torch.randint(0, 3, (4, 28, 28), generator=gen)},
        )
        for _ in range(2)
    ]
    layer = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)][-1]
    result = dissect(model, layer, probe, {"object": [1, 2]}, ["-", "a", "b"])
    assert result.iou.shape[1] == 3 and len(result.best()) == result.iou.shape[0]
    assert set(result.interpretable()) == {"object"}


def test_user_errors():
    probe = _probe(n=16)
    with pytest.raises(UserError, match="twice"):
        dissect(_copy_model(), "0", iter(probe), CATEGORIES, LABELS)
    with pytest.raises(UserError, match="not among"):
        dissect(_copy_model(), "0", probe, {"object": [1, 2]}, LABELS)
    with pytest.raises(UserError, match="not in 1..4"):
        label_categories({"object": [7]}, 5)


def test_several_layers_in_one_pass_match_one_at_a_time():
    model = nn.Sequential(_copy_model()[0], nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))
    probe = _probe(n=32)
    both = dissect(model, ["0", "2"], probe, CATEGORIES, LABELS)
    assert set(both) == {"0", "2"}
    alone = dissect(model, "2", probe, CATEGORIES, LABELS)
    torch.testing.assert_close(both["2"].iou, alone.iou)
    torch.testing.assert_close(both["2"].thresholds, alone.thresholds)


def test_resampled_table1_counts_the_units_of_each_resample():
    from advinterp.stats.bootstrap import resample_counts

    probe = _probe()
    result = dissect(
        _copy_model(), "0", probe, CATEGORIES, LABELS, resolution=1 << 16, per_image=True
    )
    n = sum(len(x) for x, _ in probe)
    weights = torch.cat([torch.ones(1, n, dtype=torch.float64), resample_counts(n, 50, seed=0)])
    counts = result.interpretable_resampled(weights)
    assert counts.shape == (51, 2)
    # All images once: Table 1 itself (unit 0 is an object unit, 1 of 2 units).
    assert counts[0].tolist() == [1, 0]
    # Unit 0 copies the dot on every resample holding a dot image; unit 1 never scores.
    assert (counts[1:, 0] == 1).all() and (counts[1:, 1] == 0).all()
    with pytest.raises(UserError, match="per_image"):
        dissect(_copy_model(), "0", probe, CATEGORIES, LABELS).interpretable_resampled(weights)
