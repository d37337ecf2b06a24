import pytest
import torch
import torch.nn.functional as F

from advinterp.errors import UserError
from advinterp.io import read_state_dict, save_tensors
from advinterp.stats import DeferredIoU, IoUCounts, TopQuantile
from advinterp.stats.iou import unit_masks
from advinterp.stats.quantile import tail_window

# Labels 1–3 are category 0 (pixel masks, two layers), 4–5 category 1 (image-level).
LABEL_CATEGORY = [-1, 0, 0, 0, 1, 1]


def _case(seed=0, n=5, units=3):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, units, 3, 3, generator=gen)
    thresholds = torch.tensor([0.0, 0.5, -0.2])[:units]
    pixels = torch.randint(0, 4, (n, 2, 6, 6), generator=gen)
    pixels[1] = 0  # image 1 has no pixel annotation
    images = torch.randint(0, 3, (n, 2), generator=gen)
    images[images > 0] += 3  # labels 4, 5 or none
    images[0] = 0
    return maps, thresholds, {0: pixels, 1: images}


def _brute_force(maps, thresholds, labels):
    """Bau et al.'s definition, one image, unit and label at a time."""
    inter = torch.zeros(maps.shape[1], len(LABEL_CATEGORY), dtype=torch.float64)
    union = torch.zeros_like(inter)
    for c in range(1, len(LABEL_CATEGORY)):
        category = LABEL_CATEGORY[c]
        lab = labels[category]
        for i in range(maps.shape[0]):
            if not lab[i].ne(0).any():
                continue  # the category is not annotated in this image
            if category == 0:
                concept = (lab[i] == c).any(0)
            else:
                concept = torch.full((6, 6), bool((lab[i] == c).any()))
            for u in range(maps.shape[1]):
                up = F.interpolate(maps[i : i + 1, u : u + 1], size=(6, 6), mode="bilinear")
                mask = up[0, 0] > thresholds[u]
                inter[u, c] += (mask & concept).sum()
                union[u, c] += (mask | concept).sum()
    return torch.where(union > 0, inter / union.clamp(min=1), 0.0)


def test_iou_matches_brute_force_per_image_and_unit():
    maps, thresholds, labels = _case()
    counts = IoUCounts(3, len(LABEL_CATEGORY), LABEL_CATEGORY)
    counts.add(maps, thresholds, labels)
    torch.testing.assert_close(counts.result(), _brute_force(maps, thresholds, labels))
    assert counts.count == 5


def test_batches_and_merged_shards_equal_one_pass(tmp_path):
    maps, thresholds, labels = _case(seed=1, n=8)
    whole = IoUCounts(3, 6, LABEL_CATEGORY)
    whole.add(maps, thresholds, labels)
    first, second = IoUCounts(3, 6, LABEL_CATEGORY), IoUCounts(3, 6, LABEL_CATEGORY)
    first.add(maps[:3], thresholds, {k: v[:3] for k, v in labels.items()})
    second.add(maps[3:], thresholds, {k: v[3:] for k, v in labels.items()})
    save_tensors(tmp_path / "iou.safetensors", second.state_dict())
    resumed = IoUCounts(3, 6, LABEL_CATEGORY)
    resumed.set_state_dict(read_state_dict(tmp_path / "iou.safetensors"))
    first.merge(resumed)
    torch.testing.assert_close(first.result(), whole.result())
    # Per image too: the counts of each image travel in the state, in image order.
    whole = IoUCounts(3, 6, LABEL_CATEGORY, per_image=True)
    whole.add(maps, thresholds, labels)
    first, second = (IoUCounts(3, 6, LABEL_CATEGORY, per_image=True) for _ in range(2))
    first.add(maps[:3], thresholds, {k: v[:3] for k, v in labels.items()})
    second.add(maps[3:], thresholds, {k: v[3:] for k, v in labels.items()})
    save_tensors(tmp_path / "per-image.safetensors", second.state_dict())
    resumed = IoUCounts(3, 6, LABEL_CATEGORY, per_image=True)
    resumed.set_state_dict(read_state_dict(tmp_path / "per-image.safetensors"))
    first.merge(resumed)
    weights = torch.randint(0, 3, (4, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first.resampled(weights), whole.resampled(weights))


def test_unit_copying_a_concept_mask_scores_one():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (6, 8, 8), generator=gen)  # labels 1..3, one layer
    # Unit 0 fires exactly on label 2, at mask resolution; unit 1 is noise.
    maps = torch.stack([(labels == 2).float(), torch.rand(6, 8, 8, generator=gen)], dim=1)
    counts = IoUCounts(2, 4)
    counts.add(maps, torch.tensor([0.5, 0.9]), labels)
    iou = counts.result()
    assert iou[0, 2] == pytest.approx(1.0)
    assert iou[0, 1] < 0.1 and iou[0, 3] < 0.1
    assert iou[1].max() < 0.2


def test_unit_masks_upsample_bilinearly_then_threshold():
    maps = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    masks = unit_masks(maps, torch.tensor([0.5]), (4, 4))
    assert masks.shape == (1, 4, 4, 1)
    assert masks[0, :, :, 0].tolist() == [[False, False, True, True]] * 4


def test_large_batches_are_chunked_to_the_same_counts(monkeypatch):
    import advinterp.stats.iou as iou_module

    maps, thresholds, labels = _case(seed=3, n=7)
    whole = IoUCounts(3, 6, LABEL_CATEGORY)
    whole.add(maps, thresholds, labels)
    monkeypatch.setattr(iou_module, "_CHUNK_ELEMENTS", 3 * 36 * 2)  # two images per chunk
    chunked = IoUCounts(3, 6, LABEL_CATEGORY)
    chunked.add(maps, thresholds, labels)
    torch.testing.assert_close(chunked.result(), whole.result())


def test_bad_input():
    counts = IoUCounts(2, 4)
    with pytest.raises(ValueError, match="label numbers"):
        counts.add(torch.zeros(1, 2, 2, 2), torch.zeros(2), torch.full((1, 4, 4), 9))
    with pytest.raises(ValueError, match="N×2×h×w"):
        counts.add(torch.zeros(1, 3, 2, 2), torch.zeros(3), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(UserError, match="another layer"):
        counts.set_state_dict(IoUCounts(3, 4).state_dict())


@pytest.mark.parametrize("sparse", [True, False])
def test_resampled_iou_is_the_iou_of_the_drawn_images(monkeypatch, sparse):
    import advinterp.stats.iou as iou_module
    from advinterp.stats.bootstrap import resample_counts

    # Count masks from their pixels' coordinates, or pixel by pixel: both paths.
    monkeypatch.setattr(iou_module, "_SPARSE", 1.0 if sparse else 0.0)
    maps, thresholds, labels = _case(seed=3, n=8)
    counts = IoUCounts(3, 6, LABEL_CATEGORY, per_image=True)
    counts.add(maps[:3], thresholds, {k: v[:3] for k, v in labels.items()})
    rest = IoUCounts(3, 6, LABEL_CATEGORY, per_image=True)
    rest.add(maps[3:], thresholds, {k: v[3:] for k, v in labels.items()})
    counts.merge(rest)
    weights = resample_counts(8, draws=4, seed=0)
    resampled = counts.resampled(torch.cat([torch.ones(1, 8, dtype=torch.float64), weights]))
    torch.testing.assert_close(resampled[0], counts.result())
    for row, iou in zip(weights, resampled[1:], strict=True):
        drawn = torch.repeat_interleave(torch.arange(8), row.long())
        expected = _brute_force(maps[drawn], thresholds, {k: v[drawn] for k, v in labels.items()})
        torch.testing.assert_close(iou, expected)
    with pytest.raises(UserError, match="B×8"):
        counts.resampled(torch.ones(2, 5))
    with pytest.raises(UserError, match="per_image=True"):
        IoUCounts(3, 6, LABEL_CATEGORY).resampled(weights)


# -- DeferredIoU: counts at thresholds known after the pass ---------------------------------


def _stream(n=60, units=4, seed=0):
    """Maps (ReLU'd: unit 0 is zero but for a few images, so its 0.9 quantile is a tie at 0)
    and labels as ``_case``, for a pass in batches."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.relu(torch.randn(n, units, 3, 3, generator=gen))
    maps[:, 0] *= torch.rand(n, 1, 1, generator=gen) < 0.1
    pixels = torch.randint(0, 4, (n, 2, 6, 6), generator=gen)
    pixels[1::7] = 0  # images with no pixel annotation
    images = torch.randint(0, 3, (n, 2), generator=gen)
    images[images > 0] += 3
    return maps, {0: pixels, 1: images}


def _deferred(maps, labels, q=0.9, batch=7, parts=1, **kwargs):
    """A pass over ``maps`` in batches, split over ``parts`` shards taking batches in turn:
    (their DeferredIoUs, TopQuantiles)."""
    total = maps.shape[0] * 9
    counts = [DeferredIoU(maps.shape[1], 6, LABEL_CATEGORY, **kwargs) for _ in range(parts)]
    tops = [TopQuantile(maps.shape[1], q, total=total) for _ in range(parts)]
    for i, start in enumerate(range(0, len(maps), batch)):
        rows = slice(start, start + batch)
        top, count = tops[i % parts], counts[i % parts]
        top.add(maps[rows])
        count.add(maps[rows], {k: v[rows] for k, v in labels.items()}, tail_window(top),
                  bound=top.lower_bound())  # fmt: skip
    return counts, tops


def test_deferred_counts_are_a_second_pass_at_the_final_thresholds():
    maps, labels = _stream()
    (counts,), (top,) = _deferred(maps, labels)
    thresholds = top.quantile()
    assert thresholds[0] == 0  # a tie: the mask is the unit's nonzero pixels
    assert not counts.binned and counts.exact(thresholds).all()
    torch.testing.assert_close(
        counts.result(thresholds), _brute_force(maps, thresholds, labels), rtol=0, atol=1e-12
    )
    second = IoUCounts(4, 6, LABEL_CATEGORY)
    second.add(maps, thresholds, labels)
    got = counts.counts(thresholds)
    for name in ("intersection", "unit_area", "label_area"):
        assert torch.equal(getattr(got, name), getattr(second, name)), name


def test_deferred_counts_per_image_resample_like_a_second_pass():
    from advinterp.stats.bootstrap import resample_counts

    maps, labels = _stream(n=30, seed=1)
    (counts,), (top,) = _deferred(maps, labels, per_image=True)
    thresholds = top.quantile()
    got = counts.counts(thresholds)
    second = IoUCounts(4, 6, LABEL_CATEGORY, per_image=True)
    second.add(maps, thresholds, labels)
    weights = torch.cat([torch.ones(1, 30, dtype=torch.float64), resample_counts(30, 5, seed=0)])
    torch.testing.assert_close(got.resampled(weights), second.resampled(weights))
    torch.testing.assert_close(got.result(), _brute_force(maps, thresholds, labels))


def test_binned_counts_stay_close_and_exact_at_a_tie():
    maps, labels = _stream(n=300, seed=2)
    (counts,), (top,) = _deferred(maps, labels, batch=20, exact_pixels=0)
    thresholds = top.quantile()
    assert counts.binned and counts.exact(thresholds).all()
    got, want = counts.result(thresholds), _brute_force(maps, thresholds, labels)
    assert (got - want).abs().max() < 5e-3
    # A threshold at the low end of a unit's bins (its zeros) is on an edge: exact.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("exact_pixels", [None, 0])
def test_deferred_shards_merge_into_one_pass(tmp_path, exact_pixels):
    maps, labels = _stream(n=84, seed=3)
    (whole,), (top,) = _deferred(maps, labels, exact_pixels=exact_pixels)
    shards, tops = _deferred(maps, labels, parts=3, exact_pixels=exact_pixels)
    for other in tops[1:]:
        tops[0].merge(other)
    thresholds = top.quantile()
    assert torch.equal(tops[0].quantile(), thresholds)
    save_tensors(tmp_path / "d.safetensors", shards[2].state_dict())
    resumed = DeferredIoU(4, 6, LABEL_CATEGORY, exact_pixels=exact_pixels)
    resumed.load_state_dict(read_state_dict(tmp_path / "d.safetensors"))
    shards[0].merge(shards[1])
    shards[0].merge(resumed)
    assert shards[0].count == 84
    want = _brute_force(maps, thresholds, labels)
    tolerance = 1e-12 if exact_pixels is None else 1e-2  # binned shards: re-binned, close
    torch.testing.assert_close(shards[0].result(thresholds), want, rtol=0, atol=tolerance)
    torch.testing.assert_close(whole.result(thresholds), want, rtol=0, atol=tolerance)


def test_threshold_below_the_values_looked_at_is_flagged():
    maps, labels = _stream(n=14, seed=4)
    counts = DeferredIoU(4, 6, LABEL_CATEGORY)
    high = maps.amax(dim=(0, 2, 3))
    with pytest.raises(ValueError, match="needs a window"):
        counts.add(maps, labels)
    counts.add(maps, labels, (high * 0.9, high))
    assert counts.exact(high * 0.95).all() and not counts.exact(high * 0.5).any()
    with pytest.raises(ValueError, match="N×4×h×w"):
        counts.add(maps[:, :3], labels)
