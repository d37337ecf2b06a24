import csv
import json
import math

import pytest
import torch

from advinterp.analysis import model_semantics, plot_fig10, write_semantics
from advinterp.analysis.semantics import CSV_COLUMNS
from advinterp.errors import UserError
from advinterp.metrics.semantics import fig10_bins, unit_semantics
from advinterp.metrics.wordnet import similarity_matrix
from advinterp.stats import k_for_fraction

from .conftest import N_IMAGES, layer_responses

LAYERS = ["conv1", "layer2.0.conv2", "layer3.0.downsample.0"]


@pytest.fixture(scope="module")
def C(model):
    return similarity_matrix(model.wnids)


@pytest.fixture(scope="module")
def result(model, pairs, C):
    return model_semantics(model, pairs, C, layers=LAYERS, fraction=0.05, batch_size=64)


def _top(responses: torch.Tensor, k: int) -> torch.Tensor:
    return responses.t().topk(k, dim=1).indices


def test_csv_equals_recomputation_from_unit_semantics(model, pairs, C, result, tmp_path):
    """Brute force: all responses in one batch, a full top-k, then eq. 11–13 on a few units."""
    write_semantics([result], tmp_path, bins=5)
    with open(tmp_path / "units.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == sum(len(u["lc"]) for u in result.units.values())
    real_x = torch.cat([x for x, _, _ in pairs.real_batches(N_IMAGES)])
    success = pairs.preds == pairs.targets  # a targeted set
    k = k_for_fraction(N_IMAGES, 0.05)
    k_ok = k_for_fraction(int(success.sum()), 0.05)
    ok_positions = success.nonzero()[:, 0]
    for layer in LAYERS:
        real = layer_responses(model, layer, real_x)
        adv = layer_responses(model, layer, pairs.adversarial_images(torch.arange(N_IMAGES)))
        every = unit_semantics(
            _top(real, k), pairs.labels, _top(adv, k), pairs.labels, pairs.targets, C
        )
        ok = unit_semantics(
            _top(real, k),
            pairs.labels,
            ok_positions[_top(adv[ok_positions], k_ok)],
            pairs.labels,
            pairs.targets,
            C,
        )
        for unit in (0, 3, real.shape[1] - 1):
            row = next(r for r in rows if r["layer"] == layer and int(r["unit"]) == unit)
            assert row["model"] == result.name
            for key, want in (
                ("lc", every["lc"]),
                ("cs1", every["cs1"]),
                ("cs2", every["cs2"]),
                ("cs1_successful", ok["cs1"]),
                ("cs2_successful", ok["cs2"]),
            ):
                assert float(row[key]) == pytest.approx(float(want[unit]), abs=2e-6), (
                    layer,
                    unit,
                    key,
                )
            share, top_class = every["p"][unit].max(0)
            assert row["real_class"] == model.classes[int(top_class)]
            assert float(row["real_share"]) == pytest.approx(float(share), abs=1e-6)


def test_summary_json_and_fig10(result, pairs, tmp_path):
    data = write_semantics([result], tmp_path, bins=5, settings={"sigma": 1.0})
    on_disk = json.loads((tmp_path / "semantics.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    m = on_disk["models"][result.name]
    stats = pairs.attack_stats()
    assert m["attack"]["success_rate"] == pytest.approx(stats["success_rate"])
    assert m["attack"]["mean_l2"] == pytest.approx(stats["mean_l2"])
    assert m["n_successful"] == stats["n_successful"] and m["layers"] == LAYERS
    assert on_disk["fig10"][result.name] == m["fig10"]
    want = fig10_bins(result.values("lc"), result.values("cs1"), result.values("cs2"), 5)
    assert m["fig10"] == json.loads(json.dumps(want))
    assert sum(b["n_units"] for b in m["fig10"]) == m["units"] == 16 + 32 + 64
    assert (tmp_path / "fig10.png").read_bytes()[:4] == b"\x89PNG"


def test_fig10_takes_several_models(result, tmp_path):
    summary = result.summary(4)
    weak = dict(summary, attack=dict(summary["attack"], success_rate=0.5, mean_l2=None))
    path = plot_fig10({"resnet": summary, "resnet-Adv": weak}, tmp_path / "both.png")
    assert path.stat().st_size > 10_000
    with pytest.raises(UserError, match="must differ"):
        write_semantics([result, result], tmp_path)


def test_no_successful_image_leaves_cs_undefined(model, pairs, C):
    import copy
    from dataclasses import replace

    adversarial = copy.copy(pairs.adversarial)
    adversarial.preds = pairs.labels.clone()  # every attack failed
    failed = replace(pairs, adversarial=adversarial)
    r = model_semantics(model, failed, C, layers=["conv1"], batch_size=100)
    assert r.counts["n_successful"] == 0
    assert all(math.isnan(v) for v in r.values("cs1_successful").tolist())
    assert not any(math.isnan(v) for v in r.values("cs1").tolist())
    with pytest.raises(UserError, match="classes"):
        model_semantics(model, pairs, C[:5, :5])
