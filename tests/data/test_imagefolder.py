import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from advinterp.data import batches, decoded_batches, open_dataset
from advinterp.errors import UserError

WNIDS = ["n01440764", "n02123045", "n02124075"]


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), value, dtype=np.uint8)).save(path)


def test_folders_map_to_the_models_class_index(tmp_path):
    _write(tmp_path / "n02123045" / "a.png", 255)
    _write(tmp_path / "n01440764" / "b.png", 0)
    data = open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS, input_size=32)
    x, y, _ = next(batches(data, 8))
    assert x.shape == (2, 3, 32, 32)
    assert sorted(y.tolist()) == [0, 1]
    # Class 1 (tabby) is the white image.
    assert x[y == 1].min() == 1.0 and x[y == 0].max() == 0.0


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    _write(tmp_path / "n02123045" / "ok.png", 128)
    (tmp_path / "n02123045" / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS, input_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(batches(data, 4))
    assert sum(len(y) for _, y, _ in got) == 1
    assert data.skipped == 1
    assert any("skipped 1 image" in str(w.message) for w in caught)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no images"):
        (tmp_path / "n01440764").mkdir()
        open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS)
    _write(tmp_path / "cats" / "a.png", 1)
    with pytest.raises(UserError, match="not named by a wnid"):
        open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS)
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(f"imagefolder:{tmp_path / 'nope'}", wnids=WNIDS)
    with pytest.raises(UserError, match="wnid label set"):
        open_dataset(f"imagefolder:{tmp_path}")


def _gradient(path, h, w):
    """Dark on the left, bright on the right: a mirrored crop has falling column means."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None].repeat(h, 0).repeat(3, 2)
    Image.fromarray(ramp.astype(np.uint8)).save(path)


def test_training_augmentation_is_seeded_per_image(tmp_path):
    for i in range(6):
        _gradient(tmp_path / WNIDS[i % 2] / f"{i}.png", 48 + 8 * i, 90 - 6 * i)
    data = open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS, input_size=24)
    epoch0 = data.augmented(seed=3, epoch=0)
    assert data.draws is None  # the set itself keeps the evaluation transform
    state = torch.get_rng_state()
    first = [epoch0[i][0] for i in range(len(data))]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert all(x.shape == (3, 24, 24) and 0 <= x.min() and x.max() <= 1 for x in first)
    # The same image, seed and epoch give the same crop, whatever the order, the process
    # or the worker that decodes it.
    again = {}
    for x, _, idx, bad in decoded_batches(epoch0, [[5, 4, 3], [2, 1, 0]], workers=2):
        assert bad == 0
        again.update(zip(idx.tolist(), x, strict=True))
    assert all(torch.equal(again[i], first[i]) for i in range(len(data)))
    # Another epoch or seed draws other crops.
    for other in (data.augmented(seed=3, epoch=1), data.augmented(seed=4, epoch=0)):
        assert sum(not torch.equal(other[i][0], first[i]) for i in range(len(data))) >= 5

    def rising(x):
        cols = x.mean(dim=(0, 1))
        return bool(cols[-1] > cols[0])

    # Crops of the ramp rise left to right unless mirrored; over 4 epochs × 6 images both occur,
    # and without flips none is mirrored. Crop sizes vary: the ramp's steepness differs.
    crops = [data.augmented(0, e)[i][0] for e in range(4) for i in range(len(data))]
    assert 4 <= sum(map(rising, crops)) <= len(crops) - 4
    plain = [data.augmented(0, e, flip=False)[i][0] for e in range(4) for i in range(len(data))]
    assert all(map(rising, plain))
    slopes = {round(float(x.mean(dim=(0, 1))[-1] - x.mean(dim=(0, 1))[0]), 2) for x in plain}
    assert len(slopes) > 10


def test_decoded_batches_keep_the_order_and_drop_what_cannot_be_decoded(tmp_path):
    _write(tmp_path / "n02123045" / "a.png", 10)
    _write(tmp_path / "n02123045" / "c.png", 30)
    (tmp_path / "n02123045" / "b.jpg").write_bytes(b"no image")
    data = open_dataset(f"imagefolder:{tmp_path}", wnids=WNIDS, input_size=8)
    got = list(decoded_batches(data, [[2, 1], [0], [1]]))
    assert [idx.tolist() for _, _, idx, _ in got] == [[2], [0], []]
    assert [bad for *_, bad in got] == [1, 0, 1]
    assert got[0][0][0].mean() == pytest.approx(30 / 255, abs=1e-6)
