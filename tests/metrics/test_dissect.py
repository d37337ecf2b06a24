import pytest
import torch
from torch import nn

from advinterp.errors import UserError
from advinterp.metrics.dissect import Dissection, dissect, label_categories
from advinterp.models import create_model

from ..conftest import one_thread as single_thread

LABELS = ["-", "dot", "field", "stripes", "plain"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spin against other processes."""
    with single_thread():
        yield


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
    result = dissect(_copy_model(), "0", _probe(), CATEGORIES, LABELS)
    assert result.iou.shape == (2, 5)
    assert result.iou[0, 1] == pytest.approx(1.0)
    assert result.iou[0, 2:].max() < 0.02
    best = result.best()
    assert (best[0].category, best[0].label) == ("object", "dot")
    assert best[0].iou == pytest.approx(1.0)
    assert best[1].iou < 0.04
    assert result.interpretable() == {"object": 50.0, "texture": 0.0}


def test_binned_counts_are_close_to_exact():
    result = dissect(_copy_model(), "0", _probe(), CATEGORIES, LABELS, exact_pixels=0)
    assert result.iou[0, 1] == pytest.approx(1.0, abs=0.02)
    assert result.interpretable() == {"object": 50.0, "texture": 0.0}


def test_threshold_is_the_top_half_percent_quantile():
    probe = _probe()
    result = dissect(_copy_model(), "0", probe, CATEGORIES, LABELS)
    pixels = torch.cat([x for x, _ in probe]).flatten()
    assert result.thresholds[0] == torch.quantile(pixels, 0.995)  # exact, not estimated
    assert result.thresholds[1] == torch.quantile(-pixels, 0.995)
    strict = dissect(_copy_model(), "0", probe, CATEGORIES, LABELS, iou_threshold=0.4)
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


def test_the_probe_is_read_once():
    probe = _probe(n=48)
    model = _copy_model()
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    once = dissect(model, "0", iter(probe), CATEGORIES, LABELS)  # a generator will do
    assert len(calls) == len(probe)  # one forward pass per batch
    again = dissect(model, "0", lambda: iter(probe), CATEGORIES, LABELS)
    assert torch.equal(once.iou, again.iou) and torch.equal(once.thresholds, again.thresholds)


def test_user_errors():
    probe = _probe(n=16)
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
    result = dissect(_copy_model(), "0", probe, CATEGORIES, LABELS, per_image=True)
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


# -- against exact Network Dissection on the embedded probe ---------------------------------


@pytest.fixture(scope="module")
def embedded(small_run, tmp_path_factory):
    """The default model (trained briefly) and 400 images of the embedded probe, in batches."""
    from advinterp.data.broden import BrodenProbe, probe_batches
    from advinterp.data.fashion_broden import write_fashion_broden
    from advinterp.models import load_model

    root = write_fashion_broden(tmp_path_factory.mktemp("probe") / "fb", n=400, progress=False)
    probe = BrodenProbe(root, in_chans=1, input_size=28)
    model = load_model(str(small_run / "model.safetensors")).eval()
    return model, probe, list(probe_batches(probe, 50))


def _two_pass(model, layers, batches, probe, per_image=False):
    """Network Dissection as defined: every activation kept, thresholds by ``torch.quantile``
    over all of them, then a second pass counting the IoU (:class:`IoUCounts`)."""
    from advinterp.record import Recorder
    from advinterp.stats import IoUCounts

    names = list(probe.categories)
    label_category = label_categories(probe.categories, len(probe.labels))
    maps = {layer: [] for layer in layers}
    with Recorder(model, layers, keep_maps=layers) as rec, torch.inference_mode():
        for x, _ in batches:
            rec(x)
            for layer in layers:
                maps[layer].append(rec.maps[layer])
    out = {}
    for layer, parts in maps.items():
        every = torch.cat(parts)
        thresholds = torch.quantile(every.transpose(0, 1).flatten(1), 0.995, dim=1)
        counts = IoUCounts(
            every.shape[1], len(probe.labels), label_category, len(names), per_image=per_image
        )
        for part, (_, masks) in zip(parts, batches, strict=True):
            counts.add(part, thresholds, {names.index(c): m for c, m in masks.items()})
        out[layer] = thresholds, counts
    return out


@pytest.mark.parametrize("chunk", [None, 100], ids=["one pass", "chunks of 100 images"])
def test_one_pass_is_exact_network_dissection_on_the_embedded_probe(embedded, chunk):
    from advinterp.data.broden import probe_batches

    model, probe, batches = embedded
    layers = ["layer2", "layer3"]
    exact = _two_pass(model, layers, batches, probe)
    # In chunks (as across processes and resumably): statistics merged after each.
    source = batches if chunk is None else probe_batches(probe, 50)
    ours = dissect(model, layers, source, probe.categories, probe.labels, chunk=chunk)
    binned = dissect(
        model, layers, source, probe.categories, probe.labels, exact_pixels=0, chunk=chunk
    )
    for layer, (thresholds, counts) in exact.items():
        assert torch.equal(ours[layer].thresholds, thresholds)
        torch.testing.assert_close(ours[layer].iou, counts.result(), rtol=0, atol=1e-12)
        # Binned (a probe too large to keep the pixels): the IoU within 0.005, and the same
        # best concept wherever the runner-up is not within a hair of it.
        iou = counts.result()
        assert torch.equal(binned[layer].thresholds, thresholds)
        assert (binned[layer].iou - iou).abs().max() < 5e-3
        first, second = iou.topk(2, dim=1).values.unbind(1)
        same = binned[layer].iou.argmax(1) == iou.argmax(1)
        assert same[first - second > 2e-3].all() and same.double().mean() >= 0.95


def test_per_image_counts_resample_as_a_second_pass(embedded):
    from advinterp.data.broden import probe_batches
    from advinterp.stats.bootstrap import resample_counts

    model, probe, batches = embedded
    ((thresholds, counts),) = _two_pass(model, ["layer3"], batches, probe, per_image=True).values()
    ours = dissect(model, "layer3", batches, probe.categories, probe.labels, per_image=True)
    weights = resample_counts(len(probe), 20, seed=0)
    torch.testing.assert_close(ours.counts.resampled(weights), counts.resampled(weights))
    # Merged from chunks, the images stay in the probe's order; and past the pixels the one
    # pass may keep, a second pass counts them (in chunks too: the per-image counts travel
    # in the statistics' state).
    for source, options in (
        (probe_batches(probe, 50), {"chunk": 150}),
        (batches, {"per_image_pixels": 0}),
        (probe_batches(probe, 50), {"chunk": 150, "per_image_pixels": 0}),
    ):
        again = dissect(
            model, "layer3", source, probe.categories, probe.labels, per_image=True, **options
        )
        assert torch.equal(again.thresholds, thresholds)
        torch.testing.assert_close(again.iou, counts.result(), rtol=0, atol=1e-12)
        torch.testing.assert_close(again.counts.resampled(weights), counts.resampled(weights))
    assert torch.equal(
        ours.interpretable_resampled(weights),
        Dissection(
            "layer3", thresholds, counts.result(), probe.labels, list(probe.categories),
            ours.label_category, 0.04, counts,
        ).interpretable_resampled(weights),
    )  # fmt: skip


def test_statistics_that_cannot_fit_are_refused_before_any_work():
    """Every unit of a 224² network against Broden's labels on two million images: a
    terabyte of statistics, one line; the last two stages of ResNet-18 on Broden's 63,305
    images fit (about 1.5 GiB)."""
    from advinterp.metrics.dissect import _check_memory

    every_unit = {f"blocks.{i}": (1000, 14, 14) for i in range(21)}
    last_two = {"layer3": (256, 14, 14), "layer4": (512, 7, 7)}
    common = dict(quantile=0.995, pixels=112 * 112, labels=1198, categories=6, bins=64)
    common |= dict(exact_pixels=1 << 21, per_image=False, two_passes=False, copies=2)
    with pytest.raises(UserError, match=r"21000 units on 2000000 probe images .* GiB"):
        _check_memory(every_unit, 2_000_000, device=torch.device("cpu"), **common)
    _check_memory(last_two, 63305, device=torch.device("cpu"), **common)
