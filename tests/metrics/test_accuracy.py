import pytest
import torch

from advinterp.attacks.fgsm import FGSM
from advinterp.data import open_dataset
from advinterp.metrics.accuracy import accuracy, format_table2, table2
from advinterp.models import load_model

from ..conftest import one_thread as single_thread


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against other
    processes (a Table 2 pass over 120 images took 20 s instead of 0.3 s)."""
    with single_thread():
        yield


def _brute_topk(logits, y, k):
    return (
        100.0
        * float(sum(int(y[i]) in logits[i].topk(k).indices.tolist() for i in range(len(y))))
        / len(y)
    )


def test_table2_matches_a_brute_force_fgsm(small_run):
    model = load_model(str(small_run / "model.safetensors"))
    data = open_dataset("fashion-mnist", "test", limit=300)
    x, y = data.images.float() / 255, data.labels
    row = table2(model, data, eps=[4 / 255, 16 / 255], batch_size=128)
    with torch.inference_mode():
        clean = model(x)
    assert row["clean_top1"] == _brute_topk(clean, y, 1)
    assert row["clean_top5"] == _brute_topk(clean, y, 5)
    assert accuracy(model, data) == {"top1": row["clean_top1"], "top5": row["clean_top5"]}
    for eps in (4, 16):
        x_adv = FGSM(model, eps=eps / 255).run(x, y, progress=False)
        with torch.inference_mode():
            adv = model(x_adv)
        assert abs(row["fgsm"][str(eps)]["top1"] - _brute_topk(adv, y, 1)) <= 100 / 300
        assert abs(row["fgsm"][str(eps)]["top5"] - _brute_topk(adv, y, 5)) <= 100 / 300
    assert row["fgsm_top1"] == row["fgsm"]["4"]["top1"]
    # A bigger budget never helps the model (FGSM is monotone here on average).
    assert row["fgsm"]["16"]["top1"] <= row["fgsm"]["4"]["top1"] <= row["clean_top1"]
    assert row["n"] == 300
    text = format_table2({"resnet": row})
    assert "FGSM ε=16 top-1" in text and f"{row['clean_top1']:.2f}" in text


class Killed(Exception):
    pass


def test_table2_resumes_after_a_kill(small_run, tmp_path):
    model = load_model(str(small_run / "model.safetensors"))
    data = open_dataset("fashion-mnist", "test", limit=120)
    partial = tmp_path / "table2.partial"
    options = dict(eps=[4 / 255], batch_size=20, chunk=40)  # 3 chunks of 2 batches
    whole = table2(model, data, **options)
    forwards = 0

    def count(module, inputs):
        nonlocal forwards
        forwards += 1
        if forwards == 14:  # 3 a batch (clean, gradient, FGSM): in the fifth batch
            raise Killed

    handle = model.net.register_forward_pre_hook(count)
    try:
        with pytest.raises(Killed):
            table2(model, data, partial=partial, **options)
        forwards = -1000  # no kill this time
        resumed = table2(model, data, partial=partial, **options)
    finally:
        handle.remove()
    assert forwards == -1000 + 3 * 2  # the last chunk only
    assert resumed == whole
