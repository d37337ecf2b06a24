import warnings

import numpy as np
import pytest
from PIL import Image

from advinterp.data import batches, open_dataset
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
