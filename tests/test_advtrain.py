import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advinterp import advtrain as adv_mod
from advinterp.advtrain import (
    AdvTrainConfig,
    FeatureTap,
    adv_step,
    advtrain,
    consistency_loss,
    draw_eps,
)
from advinterp.cli import main
from advinterp.data import open_dataset
from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict
from advinterp.metrics.accuracy import table2
from advinterp.models import load_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

    def forward(self, x):
        return self.net(x)


def _ce(logits, y):
    # Cross-entropy by hand: −log softmax of the true class, batch mean.
    return (logits.exp().sum(1).log() - logits.gather(1, y[:, None]).squeeze(1)).mean()


def test_consistency_loss_by_hand():
    model = Tiny()
    tap = FeatureTap(model, "penultimate")
    x = torch.rand(5, 1, 2, 2)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    y = torch.tensor([0, 1, 1, 0, 1])
    lc = model(x)
    fc = tap.value
    la = model(x_adv)
    fa = tap.value
    # φ is the input of the last Linear: ReLU(W1 x + b1).
    w1, b1 = model.net[1].weight, model.net[1].bias
    torch.testing.assert_close(fa, (x_adv.flatten(1) @ w1.T + b1).relu())
    dist = sum(((fc[i] - fa[i]) ** 2).sum() for i in range(5)) / 5
    want = 0.3 * _ce(lc, y) + 0.7 * _ce(la, y) + 2.0 * dist
    torch.testing.assert_close(consistency_loss(lc, la, fc, fa, y, 0.3, 2.0, "sum"), want)
    # Per feature: the same distance over φ's width (3 features).
    want_mean = 0.3 * _ce(lc, y) + 0.7 * _ce(la, y) + 2.0 * dist / fc.shape[1]
    torch.testing.assert_close(consistency_loss(lc, la, fc, fa, y, 0.3, 2.0, "mean"), want_mean)
    # Relative (default): each image's distance over its two feature vectors' squared norms
    # (an image whose two vectors are zero adds 0).
    rel = 0
    for i in range(5):
        norms = (fc[i] ** 2).sum() + (fa[i] ** 2).sum()
        rel = rel + (((fc[i] - fa[i]) ** 2).sum() / norms if norms > 0 else 0)
    rel = rel / 5
    want_rel = 0.3 * _ce(lc, y) + 0.7 * _ce(la, y) + 2.0 * rel
    torch.testing.assert_close(consistency_loss(lc, la, fc, fa, y, 0.3, 2.0), want_rel)
    # β = 0: the consistency term vanishes, leaving the adversarial-training loss.
    at = 0.3 * _ce(lc, y) + 0.7 * _ce(la, y)
    torch.testing.assert_close(consistency_loss(lc, la, fc, fa, y, 0.3, 0.0), at)
    torch.testing.assert_close(consistency_loss(lc, la, None, None, y, 0.3, 0.0), at)
    tap.close()


def test_relative_consistency_ignores_feature_scale_and_holds_the_norm_constant():
    y = torch.tensor([0, 1, 2])
    logits = torch.randn(3, 3)
    fc, fa = torch.rand(3, 7) + 0.1, torch.rand(3, 7)
    one = consistency_loss(logits, logits, fc, fa, y, 0.5, 1.0)
    # Features ten times larger (a wider or larger-valued φ): the same relative term.
    ten = consistency_loss(logits, logits, 10 * fc, 10 * fa, y, 0.5, 1.0)
    torch.testing.assert_close(one, ten)
    # The summed term grows with the square of the scale.
    ce = consistency_loss(logits, logits, fc, fa, y, 0.5, 0.0)
    sum1 = consistency_loss(logits, logits, fc, fa, y, 0.5, 1.0, "sum") - ce
    sum10 = consistency_loss(logits, logits, 10 * fc, 10 * fa, y, 0.5, 1.0, "sum") - ce
    torch.testing.assert_close(sum10, 100 * sum1)
    # Features that agree add 0; opposite ones add 2, the term's bound.
    torch.testing.assert_close(consistency_loss(logits, logits, fc, fc, y, 0.5, 1.0), ce)
    torch.testing.assert_close(consistency_loss(logits, logits, fc, -fc, y, 0.5, 1.0), ce + 2)
    # The norms are constants: the gradient is 2(φ − φ_adv)/(‖φ‖² + ‖φ_adv‖²) over the batch.
    fc.requires_grad_(True)
    consistency_loss(logits, logits, fc, fa, y, 0.5, 1.0).backward()
    want = 2 * (fc - fa) / (fc.pow(2).sum(1, keepdim=True) + fa.pow(2).sum(1, keepdim=True)) / 3
    torch.testing.assert_close(fc.grad, want.detach())


def test_phi_logits_and_named_layer():
    model = Tiny()
    x = torch.rand(3, 1, 2, 2)
    logits_tap = FeatureTap(model, "logits")
    out = model(x)
    assert logits_tap.features(out) is out
    layer_tap = FeatureTap(model, "2")  # the ReLU
    model(x)
    torch.testing.assert_close(layer_tap.value, model.net[:3](x))
    layer_tap.close()
    with pytest.raises(UserError, match="unknown layer"):
        FeatureTap(model, "fc9")


def test_eps_in_range_and_fgsm_in_the_ball():
    gen = torch.Generator().manual_seed(0)
    eps = draw_eps(10_000, 4 / 255, 16 / 255, gen)
    assert eps.min() >= 4 / 255 and eps.max() <= 16 / 255
    assert eps.min() < 5 / 255 and eps.max() > 15 / 255  # spread over the range
    model = Tiny().train()
    x = torch.rand(64, 1, 2, 2)
    y = torch.randint(0, 2, (64,))
    cfg = AdvTrainConfig(init="x", beta=1.0)
    eps = draw_eps(64, cfg.eps_min, cfg.eps_max, gen)
    loss, _, x_adv = adv_step(model, FeatureTap(model, "penultimate"), x, y, eps, cfg)
    assert loss.requires_grad and x_adv.min() >= 0 and x_adv.max() <= 1
    dev = (x_adv - x).abs().amax(dim=(1, 2, 3))
    assert (dev <= eps + 1e-6).all()
    # FGSM step by hand: sign of the clean input gradient, per-image ε, clipped.
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(x_adv, (x + eps[:, None, None, None] * g.sign()).clamp(0, 1))


def test_finetune_raises_fgsm_accuracy(small_run, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _finetune_and_compare(small_run, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _finetune_and_compare(small_run, tmp_path):
    cfg = AdvTrainConfig(
        init=str(small_run / "model.safetensors"),
        epochs=1,
        limit=5000,
        batch_size=64,
        lr=0.05,
        eval_limit=500,
    )
    result = advtrain(cfg, tmp_path, progress=False)
    assert result["name"] == "resnet-Adv" and result["kind"] == "advtrain"
    test = open_dataset("fashion-mnist", "test", limit=500)
    before = table2(load_model(str(small_run / "model.safetensors")), test)
    after = table2(load_model(str(tmp_path / "model.safetensors")), test)
    print(f"FGSM ε=4 top-1 normal {before['fgsm_top1']:.1f}%, Adv {after['fgsm_top1']:.1f}%")
    assert after["fgsm_top1"] > before["fgsm_top1"] + 1
    # The gap between clean and FGSM accuracy shrinks.
    assert after["clean_top1"] - after["fgsm_top1"] < before["clean_top1"] - before["fgsm_top1"]
    assert result["history"][-1]["test_fgsm4_top1"] == after["fgsm_top1"]


def test_resume_after_a_crash_gives_the_same_model(small_run, tmp_path, monkeypatch):
    cfg = AdvTrainConfig(
        init=str(small_run / "model.safetensors"),
        epochs=2,
        limit=300,
        batch_size=100,
        eval_limit=100,
        beta=0.0,
    )
    assert advtrain(cfg, tmp_path / "straight", progress=False)["name"] == "resnet-AT"
    real_save = adv_mod._save

    def crash_after_first_epoch(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(adv_mod, "_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        advtrain(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(adv_mod, "_save", real_save)
    assert read_json(tmp_path / "crashed" / "model.json")["history"][-1]["epoch"] == 1
    advtrain(cfg, tmp_path / "crashed", resume=True, progress=False)
    a = read_state_dict(tmp_path / "straight" / "model.safetensors")
    b = read_state_dict(tmp_path / "crashed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(UserError, match="other settings"):
        advtrain(
            AdvTrainConfig(**{**cfg.__dict__, "beta": 1.0}),
            tmp_path / "crashed",
            resume=True,
            progress=False,
        )


def test_cli_bad_input_is_one_line(small_run, tmp_path, capsys):
    ckpt = str(small_run / "model.safetensors")
    for argv in (
        ["--init", str(tmp_path / "nope.safetensors")],
        ["--init", ckpt, "--alpha", "1.5"],
        ["--init", ckpt, "--eps-min", "16", "--eps-max", "4"],
        ["--init", ckpt, "--phi", "layer9"],
    ):
        assert main(["advtrain", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("advinterp: error:") and err.count("\n") == 1
