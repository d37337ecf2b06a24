import pytest

from advinterp.train import TrainConfig, train


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The default architecture trained briefly on 5,000 Fashion-MNIST images (a few seconds)."""
    out = tmp_path_factory.mktemp("small_run")
    cfg = TrainConfig(epochs=2, limit=5000, batch_size=64, eval_limit=1000)
    train(cfg, out, progress=False)
    return out
