import pytest
import torch

from advinterp.attacks.advset import build_adversarial_set
from advinterp.data import open_dataset
from advinterp.models import load_model

from ..conftest import one_thread as single_thread

N_IMAGES = 300


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: on a shared 2-core machine, more threads spin against
    other processes and made the brute-force loops here 40× slower."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def model(small_run):
    return load_model(str(small_run / "model.safetensors"))


@pytest.fixture(scope="session")
def adv_dir(model, tmp_path_factory):
    """The paper's attack (eq. 4, least-likely target, 20 Adam steps) on the first 300 test
    images, a few seconds; the analysis reads any set `advinterp attack` writes.

    The tests rank the successful images apart from all of them, so the set must hold
    both kinds. On the briefly trained model about three quarters succeed; a one-step FGSM
    with a least-likely target reached none.
    """
    out = tmp_path_factory.mktemp("adv") / "opt"
    data = open_dataset("fashion-mnist", "test", limit=N_IMAGES)
    with single_thread():
        meta = build_adversarial_set(model, data, out, method="opt", targeted=True, progress=False)
    rate = meta["stats"]["success_rate"]
    assert 0 < rate < 1, f"the set must hold successful and failed images; {rate:.1%} succeeded"
    return out


@pytest.fixture(scope="session")
def pairs(model, adv_dir):
    from advinterp.analysis import open_paired_sets

    return open_paired_sets(model, adv_dir)


def layer_responses(model, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Reference: every image's spatial-max response of every unit of ``layer``, through a
    plain forward hook and one big batch (N×U)."""
    module = dict(model.net.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0].flatten(2).amax(2)
