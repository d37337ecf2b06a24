"""``--device`` and ``--amp``: devices resolved, and every pass giving on CUDA what it gives
on the CPU (those tests run where there is a GPU, and are skipped elsewhere)."""

import copy

import pytest
import torch

from advinterp.analysis import model_semantics, pair_sets, top_pass
from advinterp.attacks import make_attack
from advinterp.attacks.advset import AdversarialSet, build_adversarial_set
from advinterp.cli import main
from advinterp.data import open_dataset
from advinterp.data.broden import BrodenProbe, probe_batches
from advinterp.data.fashion_broden import write_fashion_broden
from advinterp.device import autocast, model_device, resolve_device
from advinterp.errors import UserError
from advinterp.metrics.dissect import dissect
from advinterp.metrics.wordnet import similarity_matrix
from advinterp.models import create_model, model_config, save_checkpoint

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICE = "cuda"  # where the CUDA tests run the model; the CPU gives the reference
N_IMAGES = 200


def test_auto_is_cuda_when_there_is_one_else_the_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert model_device(create_model("resnet")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_clear_line(spec):
    with pytest.raises(UserError, match="use --device cpu") as e:
        resolve_device(spec)
    assert "\n" not in str(e.value) and spec in str(e.value)


@pytest.mark.parametrize("spec", ["bogus", "gpu", "cpu:0", "cuda:x", "auto:1", "cuda:-1"])
def test_unknown_devices_are_user_errors(spec):
    with pytest.raises(UserError, match="unknown device .* use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_amp_on_the_cpu_warns_and_leaves_float32():
    with pytest.warns(UserWarning, match="no effect on the CPU"):
        context = autocast("cpu", True)
    with context:
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == torch.float32


@pytest.mark.parametrize(
    "verb, extra",
    [
        ("evaluate", []),
        ("attack", ["--out", "OUT"]),
        ("topk", ["--adversarial", "ADV", "--layer", "conv1", "--out", "OUT"]),
        ("semantics", ["--adversarial", "ADV", "--out", "OUT"]),
        ("dissect", ["--out", "OUT"]),
    ],
)
@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "unknown device 'bogus'"),
        *([] if torch.cuda.is_available() else [("cuda", "--device cuda: ")]),
    ],
)
def test_every_analysing_verb_checks_its_device_first(
    tmp_path, capsys, verb, extra, device, message
):
    # The model does not exist: the device is checked before anything is read.
    extra = [str(tmp_path / e) if e in ("OUT", "ADV") else e for e in extra]
    argv = [verb, "--model", str(tmp_path / "none.safetensors"), *extra, "--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advinterp: error:") and message in err and "\n" not in err


# -- on a GPU: the same numbers as on the CPU ---------------------------------------------------


@pytest.fixture(scope="module")
def exact_float32():
    """No TF32 in CUDA convolutions and matrix products: the GPU's sums then differ from
    the CPU's by float32 rounding only."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def models(exact_float32):
    """The default architecture with seeded random weights: on the CPU and on ``DEVICE``."""
    torch.manual_seed(0)
    cpu = create_model("resnet").eval()
    return cpu, copy.deepcopy(cpu).to(DEVICE)


@pytest.fixture(scope="module")
def data():
    return open_dataset("fashion-mnist", "test", limit=N_IMAGES)


def _images(data):
    return data.images.float() / 255, data.labels


@CUDA
@pytest.mark.parametrize("method", ["fgsm", "bim", "pgd", "mifgsm", "opt"])
def test_attacks_on_cuda_match_the_cpu(models, data, method):
    cpu, gpu = models
    x, y = _images(data)
    kwargs = {"steps": 5} if method == "opt" else {"eps": 8 / 255}
    want = make_attack(method, cpu, seed=0, **kwargs).run(x, y, batch_size=64, progress=False)
    got = make_attack(method, gpu, seed=0, **kwargs).run(x, y, batch_size=64, progress=False)
    assert got.device == x.device  # the input's device, whatever the model's
    on_gpu = make_attack(method, gpu, seed=0, **kwargs)(x[:8].to(DEVICE), y[:8].to(DEVICE))
    assert on_gpu.device == gpu.mean.device
    if method == "opt":
        # Adam normalises each pixel's step: compare what the attack achieved.
        l2 = (got - x).flatten(1).norm(dim=1).mean() / (want - x).flatten(1).norm(dim=1).mean()
        assert 0.9 < float(l2) < 1.1
    else:
        # A gradient within rounding of 0 may change sign: nearly every pixel agrees.
        assert float(((got - want).abs() <= 1e-4).float().mean()) > 0.98
    with torch.inference_mode():
        agree = (cpu(got).argmax(1) == cpu(want).argmax(1)).float().mean()
    assert float(agree) > 0.9


def _noisy_pairs(model, data):
    """An adversarial set of noisy copies of the real images (no attack to run), paired."""
    x, y = _images(data)
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    with torch.inference_mode():
        clean = torch.cat([model(b).argmax(1).cpu() for b in x.split(50)])
        preds = torch.cat([model(b).argmax(1).cpu() for b in noisy.split(50)])
    tensors = {
        "images": noisy,
        "labels": y,
        "targets": torch.randint(0, 10, (len(y),), generator=gen),
        "clean_preds": clean,
        "preds": preds,
        "indices": torch.arange(len(y)),
    }
    return pair_sets(model, data, tensors, {"method": "noise"})


@CUDA
def test_top_k_and_semantics_on_cuda_match_the_cpu(models, data):
    cpu, gpu = models
    pairs = {"cpu": _noisy_pairs(cpu, data), "gpu": _noisy_pairs(gpu, data)}
    layers = ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    tops = {
        side: top_pass(
            model,
            pairs[side].adversarial_batches(64),
            layers,
            {"all": (5, None), "ok": (3, pairs[side].success)},
        )
        for side, model in (("cpu", cpu), ("gpu", gpu))
    }
    for name in ("all", "ok"):
        for layer in layers:
            want_v, want_i = tops["cpu"][name][layer].result()
            got_v, got_i = tops["gpu"][name][layer].result()
            assert got_v.device.type == "cpu"  # the stores come back to the CPU
            torch.testing.assert_close(got_v, want_v, atol=1e-3, rtol=1e-3)
            assert float((got_i == want_i).float().mean()) > 0.95  # near-ties may swap
    C = similarity_matrix(cpu.wnids)
    want = model_semantics(cpu, pairs["cpu"], C, layers=layers, fraction=0.05)
    got = model_semantics(gpu, pairs["gpu"], C, layers=layers, fraction=0.05)
    for key in ("lc", "cs1", "cs2"):
        assert abs(float(got.values(key).nanmean() - want.values(key).nanmean())) < 0.01, key
    with autocast(DEVICE, True):
        amp = model_semantics(gpu, pairs["gpu"], C, layers=layers, fraction=0.05)
    assert amp.values("lc").dtype == torch.float64
    assert abs(float(amp.values("lc").mean() - want.values("lc").mean())) < 0.05


@CUDA
def test_dissection_on_cuda_matches_the_cpu(models, tmp_path):
    cpu, gpu = models
    probe = BrodenProbe(write_fashion_broden(tmp_path / "fb", n=60, progress=False), in_chans=1)
    kw = dict(categories=probe.categories, labels=probe.labels)
    layers = ["layer2", "layer3"]
    want = dissect(cpu, layers, probe_batches(probe, 20), **kw)
    got = dissect(gpu, layers, probe_batches(probe, 20), **kw)
    for layer in layers:
        assert got[layer].iou.device.type == "cpu"
        torch.testing.assert_close(
            got[layer].thresholds, want[layer].thresholds, rtol=1e-2, atol=1e-3
        )
        torch.testing.assert_close(got[layer].iou, want[layer].iou, atol=0.02, rtol=0)


@CUDA
def test_adversarial_set_on_cuda_is_written_from_the_cpu(models, data, tmp_path):
    cpu, gpu = models
    sets = {}
    for side, model in (("cpu", cpu), ("gpu", gpu)):
        build_adversarial_set(
            model,
            data,
            tmp_path / side,
            method="fgsm",
            eps=8 / 255,
            targeted=True,
            chunk=64,
            batch_size=32,
            progress=False,
        )
        sets[side] = AdversarialSet(tmp_path / side)
    for key in ("labels", "targets", "indices"):
        assert torch.equal(getattr(sets["gpu"], key), getattr(sets["cpu"], key)), key
    assert float((sets["gpu"].clean_preds == sets["cpu"].clean_preds).float().mean()) > 0.99
    got = torch.cat([x for x, _ in sets["gpu"].batches(50)])
    want = torch.cat([x for x, _ in sets["cpu"].batches(50)])
    assert float(((got - want).abs() <= 1e-4).float().mean()) > 0.98


@CUDA
def test_every_verb_runs_on_cuda_with_amp(tmp_path, exact_float32):
    torch.manual_seed(0)
    model = create_model("resnet")
    ckpt = save_checkpoint(tmp_path / "model", model, model_config(model, "resnet"))
    probe = write_fashion_broden(tmp_path / "fb", n=40, progress=False)
    device = ["--device", DEVICE, "--amp"]
    common = ["--model", str(ckpt), *device]
    adv = str(tmp_path / "adv")
    runs = [
        ["evaluate", *common, "--limit", "100"],
        ["attack", *common, "--method", "fgsm", "--eps", "8", "--limit", "100", "--out", adv],
        [
            "topk",
            *common,
            "--adversarial",
            adv,
            "--layer",
            "layer2.0.conv2",
            "--count",
            "2",
            "--out",
            str(tmp_path / "topk"),
        ],
        [
            "semantics",
            "--model",
            str(ckpt),
            *device,
            "--adversarial",
            adv,
            "--out",
            str(tmp_path / "semantics"),
        ],
        ["dissect", *common, "--probe", str(probe), "--adversarial", "--out", str(tmp_path / "d")],
    ]
    for argv in runs:
        assert main(argv) == 0, argv[0]
    assert (tmp_path / "d" / "table1.json").is_file()
