import pytest
import torch

from advinterp.attacks.advset import build_adversarial_set
from advinterp.data import open_dataset
from advinterp.models import load_model

N_IMAGES = 300


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: on a shared 2-core machine, more threads spin against
    other processes and made the brute-force loops here 40× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model(small_run):
    return load_model(str(small_run / "model.safetensors"))


@pytest.fixture(scope="session")
def adv_dir(model, tmp_path_factory):
    """A targeted (least-likely) FGSM set of the first 300 test images: one gradient step,
    so it takes a second; the analysis reads any set `advinterp attack` writes."""
    out = tmp_path_factory.mktemp("adv") / "fgsm"
    data = open_dataset("fashion-mnist", "test", limit=N_IMAGES)
    build_adversarial_set(
        model, data, out, method="fgsm", eps=16 / 255, targeted=True, progress=False
    )
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
