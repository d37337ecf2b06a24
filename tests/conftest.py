from contextlib import contextmanager

import pytest
import torch

from advinterp.train import TrainConfig, train


@contextmanager
def one_thread():
    """One intra-op thread: the same float reductions whatever the core count (so the same
    weights and attack success rates), and no threads spinning against other processes on
    a busy machine (there, training with two threads on two cores took 5× as long)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The default architecture trained briefly on 5,000 Fashion-MNIST images (a few seconds)."""
    out = tmp_path_factory.mktemp("small_run")
    cfg = TrainConfig(epochs=2, limit=5000, batch_size=64, eval_limit=1000)
    with one_thread():
        train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def two_checkpoints(tmp_path_factory):
    """Two compact Fashion-MNIST models, briefly trained on different images: the
    ``model.safetensors`` of ``plain`` and the folder of ``other``, as ``reproduce --models``
    takes them."""
    root = tmp_path_factory.mktemp("given")
    with one_thread():
        for name, seed in (("plain", 0), ("other", 1)):
            cfg = TrainConfig(epochs=1, limit=600, batch_size=64, eval_limit=100, seed=seed)
            train(cfg, root / name, progress=False)
    return root / "plain" / "model.safetensors", root / "other"
