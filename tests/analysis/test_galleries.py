import json

import pytest
import torch

from advinterp.analysis import (
    open_paired_sets,
    pair_sets,
    select_units,
    unit_galleries,
    write_galleries,
)
from advinterp.analysis.galleries import dominant_class
from advinterp.attacks.advset import load_adversarial_set
from advinterp.data import open_dataset
from advinterp.errors import UserError
from advinterp.metrics.semantics import class_distribution, lc
from advinterp.metrics.wordnet import class_distance_matrix, similarity_from_distances
from advinterp.stats import k_for_fraction

from .conftest import N_IMAGES, layer_responses

LAYER = "layer2.0.conv2"


@pytest.fixture(scope="module")
def galleries(model, pairs):
    return unit_galleries(
        model, pairs, LAYER, select="lc", count=3, saliency="activation", batch_size=128
    )


def _real_images(pairs):
    return torch.cat([x for x, _, _ in pairs.real_batches(N_IMAGES)])


def test_pairs_follow_the_set(pairs):
    assert len(pairs) == N_IMAGES
    assert torch.equal(pairs.indices, torch.arange(N_IMAGES))
    data = open_dataset("fashion-mnist", "test", limit=N_IMAGES)
    assert torch.equal(pairs.labels, data.labels)
    stats = pairs.attack_stats()
    assert stats["method"] == "opt" and stats["n"] == N_IMAGES
    assert stats["success_rate"] == pytest.approx(
        float((pairs.preds == pairs.targets).float().mean())
    )
    assert stats["n_successful"] == int((pairs.preds == pairs.targets).sum())


def test_top8_are_the_highest_responses_by_brute_force(model, pairs, galleries):
    real = layer_responses(model, LAYER, _real_images(pairs))
    adv = layer_responses(model, LAYER, pairs.adversarial_images(torch.arange(len(pairs))))
    assert len(galleries.units) == 3
    for g in galleries.units:
        for rows, responses in ((g.real, real), (g.adversarial, adv)):
            column = responses[:, g.unit]
            positions = torch.tensor([r["position"] for r in rows])
            shown = torch.tensor([r["response"] for r in rows])
            # The 8 shown are the 8 largest, in order, and each is the response of its image.
            torch.testing.assert_close(
                shown, column.sort(descending=True).values[:8], atol=1e-4, rtol=1e-5
            )
            torch.testing.assert_close(shown, column[positions], atol=1e-4, rtol=1e-5)
        assert g.real_images.shape == (8, 1, 28, 28) and g.adversarial_maps.shape == (8, 28, 28)
        torch.testing.assert_close(
            g.adversarial_images,
            pairs.adversarial_images([r["position"] for r in g.adversarial]),
        )


def test_units_by_lc_and_boxes_by_wordnet_distance(model, pairs, galleries):
    D = class_distance_matrix(model.wnids)
    # LC from the top 1% of real images by brute force, then the three highest.
    responses = layer_responses(model, LAYER, _real_images(pairs))
    k = k_for_fraction(N_IMAGES)
    top = responses.t().topk(k, dim=1).indices
    lcs = lc(class_distribution(pairs.labels[top], 10), similarity_from_distances(D))
    want = sorted(range(len(lcs)), key=lambda u: (-float(lcs[u]), u))[:3]
    assert [g.unit for g in galleries.units] == want
    for g in galleries.units:
        assert g.lc == pytest.approx(float(lcs[g.unit]))
        assert (g.real_class, g.real_class_count) == dominant_class([r["label"] for r in g.real])
        for r in g.adversarial:
            assert r["pred"] == int(pairs.preds[r["position"]])
            assert r["distance"] == float(D[r["pred"], g.real_class])
            assert r["success"] == bool(pairs.preds[r["position"]] == pairs.targets[r["position"]])
            # Boxed: the attack fooled the model, into a class near the real images' one.
            assert r["boxed"] == (r["success"] and r["distance"] <= 2)


def test_failed_attacks_are_never_boxed(model, pairs):
    # The top adversarial images of a layer's units hold failed images the model still
    # calls by their own class (distance 0 to the real images' class when it is theirs).
    g = unit_galleries(model, pairs, LAYER, select="lc", count=8, saliency="activation")
    rows = [r for u in g.units for r in u.adversarial]
    failed_near = [r for r in rows if not r["success"] and r["distance"] <= 2]
    assert failed_near, "the galleries must show failed images near the real class"
    assert not any(r["boxed"] for r in failed_near)
    assert all(r["boxed"] for r in rows if r["success"] and r["distance"] <= 2)


def test_dominant_class_breaks_ties_by_rank():
    assert dominant_class([3, 1, 1, 3, 2]) == (3, 2)
    assert dominant_class([5, 5, 4]) == (5, 2)


def test_select_units():
    assert select_units(10, units=[3, 1, 3]) == [3, 1]
    first = select_units(64, select="random", count=5, seed=4)
    assert first == select_units(64, select="random", count=5, seed=4) == sorted(first)
    assert first != select_units(64, select="random", count=5, seed=5)
    assert select_units(4, select="lc", count=9, lc_values=torch.tensor([0.2, 0.9, 0.2, 0.5])) == [
        1,
        3,
        0,
        2,
    ]
    with pytest.raises(UserError, match="not in 0..9"):
        select_units(10, units=[10])
    with pytest.raises(UserError, match="unknown unit selection"):
        select_units(10, select="best")
    with pytest.raises(UserError, match="synsets"):
        select_units(10, select="lc")


def test_write_galleries_png_and_json(model, pairs, tmp_path):
    g = unit_galleries(model, pairs, "conv1", units=[2], saliency="discrepancy", k=4)
    data = write_galleries(g, tmp_path, extra={"model": "m"})
    assert (tmp_path / "unit_0002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "gallery.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    unit = on_disk["units"][0]
    assert on_disk["model"] == "m" and on_disk["saliency"] == "discrepancy"
    assert on_disk["attack"]["success_rate"] == pytest.approx(pairs.attack_stats()["success_rate"])
    assert len(unit["real"]) == len(unit["adversarial"]) == 4
    assert unit["real"][0]["label_name"] == model.classes[unit["real"][0]["label"]]
    assert {"pred_name", "target_name", "response", "boxed", "success"} <= set(
        unit["adversarial"][0]
    )


def test_mismatched_sets_are_user_errors(model, adv_dir):
    tensors, meta = load_adversarial_set(adv_dir)
    train = open_dataset("fashion-mnist", "train")
    with pytest.raises(UserError, match="made from another dataset"):
        pair_sets(model, train, tensors, meta)
    wrong = dict(tensors, clean_preds=(tensors["clean_preds"] + 1) % 10)
    with pytest.raises(UserError, match="made for another model"):
        pair_sets(model, open_dataset("fashion-mnist", "test"), wrong, meta)
    with pytest.raises(UserError, match="does not exist"):
        open_paired_sets(model, adv_dir.parent / "missing")
    with pytest.raises(UserError, match="unknown layer"):
        unit_galleries(model, open_paired_sets(model, adv_dir), "layer7.conv")
