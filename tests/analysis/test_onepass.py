"""Semantics and galleries from one pass; a killed pass resumed from its checkpoint."""

import pytest
import torch

from advinterp.analysis import (
    PairedSets,
    model_semantics,
    semantics_and_galleries,
    unit_galleries,
)
from advinterp.metrics.wordnet import similarity_matrix

from .conftest import N_IMAGES

LAYERS = ["conv1", "layer3.0.conv2"]
GALLERY_LAYER = "layer2.0.conv2"  # not among LAYERS: recorded for the galleries alone


class Killed(Exception):
    pass


@pytest.fixture
def images_read(monkeypatch):
    """Images read from each set of any PairedSets, by set."""
    read = {"real": 0, "adversarial": 0}
    for kind in read:
        original = getattr(PairedSets, f"{kind}_batches")

        def counted(self, *args, _original=original, _kind=kind, **kwargs):
            for batch in _original(self, *args, **kwargs):
                read[_kind] += len(batch[0])
                yield batch

        monkeypatch.setattr(PairedSets, f"{kind}_batches", counted)
    return read


def _assert_same_semantics(got, want):
    assert list(got.units) == list(want.units)
    assert got.counts == want.counts and got.attack == want.attack
    for layer, units in want.units.items():
        for key, value in units.items():
            torch.testing.assert_close(got.units[layer][key], value, rtol=0, atol=0, equal_nan=True)


def test_one_pass_gives_what_the_two_calls_give(model, pairs, images_read):
    C = similarity_matrix(model.wnids)
    # The paper's 1% of 300 images is 3: the galleries' top 8 need the deeper real store.
    options = dict(count=3, saliency="activation", batch_size=64)
    sem, gal = semantics_and_galleries(model, pairs, C, GALLERY_LAYER, layers=LAYERS, **options)
    assert images_read == {"real": N_IMAGES, "adversarial": N_IMAGES}  # each image once
    images_read.update(real=0, adversarial=0)
    want_sem = model_semantics(model, pairs, C, layers=LAYERS, batch_size=64)
    want_gal = unit_galleries(model, pairs, GALLERY_LAYER, **options)
    assert images_read == {"real": 2 * N_IMAGES, "adversarial": 2 * N_IMAGES}
    assert sem.counts["k_real"] == 3 and list(sem.units) == LAYERS
    _assert_same_semantics(sem, want_sem)
    assert gal.to_json() == want_gal.to_json()
    assert all(len(g.real) == 8 for g in gal.units)
    for g, w in zip(gal.units, want_gal.units, strict=True):
        assert torch.equal(g.real_maps, w.real_maps)
        assert torch.equal(g.adversarial_maps, w.adversarial_maps)


def test_a_killed_pass_resumes_from_its_last_chunk(model, pairs, tmp_path, images_read):
    C = similarity_matrix(model.wnids)
    partial = tmp_path / "semantics.partial"
    # 300 images in batches of 20, chunks of 60: 5 chunks of 3 batches from each set.
    options = dict(layers=LAYERS, fraction=0.05, batch_size=20, chunk=60)
    whole = model_semantics(model, pairs, C, **options)
    forwards = 0

    def kill(module, inputs):
        nonlocal forwards
        forwards += 1
        # 1 forward counts the units, then 6 per chunk: the 16th is in the third chunk.
        if forwards == 16:
            raise Killed

    handle = model.net.register_forward_pre_hook(kill)
    try:
        with pytest.raises(Killed):
            model_semantics(model, pairs, C, partial=partial, **options)
    finally:
        handle.remove()
    assert partial.is_file()
    images_read.update(real=0, adversarial=0)
    resumed = model_semantics(model, pairs, C, partial=partial, **options)
    done = 2 * 60
    assert images_read == {"real": N_IMAGES - done, "adversarial": N_IMAGES - done}
    _assert_same_semantics(resumed, whole)
