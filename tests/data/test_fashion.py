import gzip

import numpy as np
import pytest
import torch

from advinterp.data import batches, open_dataset
from advinterp.data.fashion import CLASSES, load_fashion_mnist, read_idx
from advinterp.errors import UserError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(_idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), arr)


def test_truncated_and_corrupt_idx_are_clear_errors(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    (tmp_path / "short").write_bytes(_idx_bytes(arr)[:-10])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    good = gzip.compress(_idx_bytes(arr))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated or not a valid gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "magic").write_bytes(b"\x1f\x00\x00\x00" + bytes(20))
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "magic")


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")
    with pytest.raises(UserError, match="not found"):
        load_fashion_mnist("test", tmp_path)


def test_labels_and_images_must_agree(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4)))
    with pytest.raises(UserError, match="disagree"):
        load_fashion_mnist("test", tmp_path)


def test_debian_fashion_mnist_split():
    train = open_dataset("fashion-mnist", "train")
    test = open_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # The published test split holds exactly 1,000 images of each class.
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.wnids == [w for _, w in CLASSES] and len(set(test.wnids)) == 10
    x, y, idx = next(batches(test, 64))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert torch.equal(y, test.labels[:64]) and torch.equal(idx, torch.arange(64))


def test_shuffled_batches_cover_every_image_once():
    data = open_dataset("fashion-mnist", "test", limit=1000)
    seen = torch.cat(
        [
            i
            for _, _, i in batches(
                data, 128, shuffle=True, generator=torch.Generator().manual_seed(3)
            )
        ]
    )
    assert sorted(seen.tolist()) == list(range(1000))
    assert seen[:10].tolist() != list(range(10))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="unknown dataset"):
        open_dataset("cifar")


@pytest.mark.parametrize("limit", [-5, 0])
def test_a_limit_below_one_is_an_error_not_a_slice(limit):
    # A negative limit used as a slice would silently drop the last images.
    with pytest.raises(UserError, match=f"limit must be at least 1, got {limit}"):
        open_dataset("fashion-mnist", "test", limit=limit)
    data = open_dataset("fashion-mnist", "test", limit=20)
    with pytest.raises(UserError, match=f"limit must be at least 1, got {limit}"):
        data.subset(limit)
    assert len(data.subset(5)) == 5 and data.subset(None) is data
