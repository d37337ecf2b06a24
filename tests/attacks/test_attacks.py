"""Attacks checked against expectations derived independently of the implementation.

The linear model's input gradient is known in closed form: for logits
``Wx + b`` the summed cross-entropy has ``∇ₓ = (softmax(Wx + b) − onehot(y))ᵀ W``,
so FGSM, BIM, MI-FGSM and the eq. 4 attack can be recomputed by hand.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advinterp.attacks import (
    ATTACKS,
    FGSM,
    TorchattacksAdapter,
    attack_stats,
    attack_succeeded,
    least_likely_targets,
    make_attack,
    random_targets,
)
from advinterp.attacks.fgsm import fgsm_step
from advinterp.data.fashion import load_fashion_mnist
from advinterp.errors import UserError
from advinterp.models.wrapper import Classifier

EPS = 8 / 255


# -- a linear model and its hand-computed gradient ----------------------------------------


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(5, 48, generator=g))
        model[1].bias.copy_(torch.randn(5, generator=g))
    x = torch.rand(16, 3, 4, 4, generator=g)
    x[:, 0, 0, 0] = 0.0  # pixels on the box edges, so clipping is exercised
    x[:, 0, 0, 1] = 1.0
    y = torch.randint(0, 5, (16,), generator=g)
    return model, x, y


def ce_grad(model, x, labels):
    """∇ₓ Σᵢ CE(Wxᵢ + b, labelsᵢ) = (softmax − onehot)ᵀ W, by hand."""
    w, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
    return ((p - F.one_hot(labels, w.shape[0]).float()) @ w).view_as(x)


def test_fgsm_untargeted_is_eq1_on_linear_model(linear):
    model, x, y = linear
    expected = (x + EPS * ce_grad(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(FGSM(model, eps=EPS)(x, y), expected)


def test_fgsm_targeted_steps_down_the_target_loss(linear):
    model, x, y = linear
    target = (y + 2) % 5
    expected = (x - EPS * ce_grad(model, x, target).sign()).clamp(0, 1)
    got = FGSM(model, eps=EPS, targeted=True)(x, y, target=target)
    torch.testing.assert_close(got, expected)


def test_fgsm_least_likely_target_by_default(linear):
    model, x, y = linear
    w, b = model[1].weight.detach(), model[1].bias.detach()
    ll = (x.flatten(1) @ w.T + b).argmin(dim=1)
    expected = (x - EPS * ce_grad(model, x, ll).sign()).clamp(0, 1)
    torch.testing.assert_close(FGSM(model, eps=EPS, targeted=True)(x, y), expected)


def test_bim_is_projected_iterated_fgsm(linear):
    model, x, y = linear
    alpha, steps = 3 / 255, 5
    xa = x.clone()
    for _ in range(steps):
        xa = xa + alpha * ce_grad(model, xa, y).sign()
        xa = torch.minimum(torch.maximum(xa, x - EPS), x + EPS).clamp(0, 1)
    got = make_attack("bim", model, eps=EPS, alpha=alpha, steps=steps)(x, y)
    torch.testing.assert_close(got, xa)


def test_bim_kurakin_default_steps(linear):
    model, _, _ = linear
    assert make_attack("bim", model, eps=4 / 255).steps == 5  # min(4 + 4, 1.25·4)
    assert make_attack("bim", model, eps=16 / 255).steps == 20  # min(16 + 4, 1.25·16)
    assert make_attack("bim", model, eps=4 / 255).alpha == pytest.approx(1 / 255)


def test_mifgsm_accumulates_l1_normalised_gradients(linear):
    model, x, y = linear
    steps, mu = 4, 1.0
    alpha = EPS / steps
    xa, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        grad = ce_grad(model, xa, y)
        g = mu * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        xa = xa + alpha * g.sign()
        xa = torch.minimum(torch.maximum(xa, x - EPS), x + EPS).clamp(0, 1)
    got = make_attack("mifgsm", model, eps=EPS, steps=steps, momentum=mu)(x, y)
    torch.testing.assert_close(got, xa)


def test_opt_returns_the_final_adam_iterate_of_eq4_by_default(linear):
    model, x, y = linear
    lam, steps, lr = 2.0, 15, 5 / 255
    w, b = model[1].weight.detach(), model[1].bias.detach()
    target = least_likely_targets(x.flatten(1) @ w.T + b)
    # Adam written out (Kingma & Ba, Alg. 1) on ∇ of ‖x* − x‖² + λ·CE(f(x*), y*), by hand.
    xs, m, v = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        g = 2 * (xs - x) + lam * ce_grad(model, xs, target)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        xs = (xs - lr * m_hat / (v_hat.sqrt() + 1e-8)).clamp(0, 1)
    got = make_attack("opt", model, lam=lam, steps=steps, lr=lr)(x, y)
    torch.testing.assert_close(got, xs, atol=1e-6, rtol=0)
    # Not the closest successful iterate: that one differs on this batch.
    closest = make_attack("opt", model, lam=lam, steps=steps, lr=lr, keep="closest")(x, y)
    assert not torch.allclose(closest, xs, atol=1e-4)


def test_opt_keep_is_checked(linear):
    model, _, _ = linear
    with pytest.raises(UserError, match="final"):
        make_attack("opt", model, keep="best")


def test_opt_keep_closest_is_adam_on_eq4_keeping_the_closest_success(linear):
    model, x, y = linear
    lam, steps, lr = 2.0, 15, 5 / 255
    w, b = model[1].weight.detach(), model[1].bias.detach()
    target = least_likely_targets(x.flatten(1) @ w.T + b)
    # Reference: torch.optim.Adam on x*, gradient of ‖x* − x‖² + λ·CE(f(x*), y*) by hand.
    xs = x.clone().requires_grad_(True)
    adam = torch.optim.Adam([xs], lr=lr)
    best, best_d = x.clone(), torch.full((len(x),), math.inf)
    for _ in range(steps):
        with torch.no_grad():
            d = (xs - x).pow(2).sum(dim=(1, 2, 3))
            hit = ((xs.flatten(1) @ w.T + b).argmax(1) == target) & (d < best_d)
            best[hit], best_d[hit] = xs[hit], d[hit]
        xs.grad = 2 * (xs.detach() - x) + lam * ce_grad(model, xs.detach(), target)
        adam.step()
        with torch.no_grad():
            xs.clamp_(0, 1)
    expected = torch.where(best_d.isfinite().view(-1, 1, 1, 1), best, xs.detach())
    got = make_attack("opt", model, lam=lam, steps=steps, lr=lr, keep="closest")(x, y)
    assert best_d.isfinite().any() and not best_d.isfinite().all()  # both branches exercised
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_summed_loss_makes_batches_independent(linear):
    model, x, y = linear
    for method in ("fgsm", "bim", "opt"):
        attack = make_attack(method, model, eps=EPS)
        torch.testing.assert_close(attack.run(x, y, batch_size=3, progress=False), attack(x, y))


# -- targets ----------------------------------------------------------------------------


def test_random_targets_uniform_over_other_classes():
    labels = torch.arange(10).repeat(500)
    t = random_targets(labels, 10, torch.Generator().manual_seed(0))
    assert not (t == labels).any()
    counts = torch.bincount(t[labels == 3], minlength=10)
    assert counts[3] == 0 and (counts[torch.arange(10) != 3] > 20).all()
    again = random_targets(labels, 10, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_least_likely_targets():
    logits = torch.tensor([[0.0, -3.0, 2.0], [5.0, 1.0, -1.0]])
    assert least_likely_targets(logits).tolist() == [1, 2]


def test_attack_succeeded_per_image():
    preds = torch.tensor([2, 2, 0, 1, 3])
    labels = torch.tensor([2, 1, 0, 0, 3])
    # Targeted where the target is ≥ 0 (reached or not), untargeted where it is −1.
    targets = torch.tensor([2, 0, -1, -1, -1])
    assert attack_succeeded(preds, labels, targets).tolist() == [True, False, False, True, False]
    assert attack_succeeded(preds, labels).tolist() == [False, True, False, True, False]


def test_fgsm_step_scalar_and_per_image_eps(linear):
    _, x, _ = linear
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    got = fgsm_step(x, grad, EPS)
    assert torch.equal(x, before)  # a new tensor
    torch.testing.assert_close(got, (x + EPS * grad.sign()).clamp(0, 1))
    eps = torch.linspace(1 / 255, 16 / 255, len(x))
    per_image = fgsm_step(x, grad, eps)
    for i in range(len(x)):
        torch.testing.assert_close(per_image[i], fgsm_step(x[i], grad[i], float(eps[i])))
    assert per_image.min() >= 0 and per_image.max() <= 1


# -- a small CNN trained on Fashion-MNIST -----------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN, ~5,000 training images, 3 epochs (a few seconds); 256 test images."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )
    model = Classifier(net, mean=(0.286,), std=(0.353,), input_size=28, num_classes=10)
    x, y = load_fashion_mnist("train")
    x, y = x[:5000].float() / 255, y[:5000]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = load_fashion_mnist("test")
    return model, xt[:256].float() / 255, yt[:256]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_opt_reaches_least_likely_target_at_defaults(trained):
    model, x, y = trained
    attack = make_attack("opt", model)  # eq. 4, Adam step 5/255, least-likely target
    x_adv = attack.run(x, y, progress=False)
    stats = attack_stats(model, x, x_adv, y, target=attack.targets_for(x, y))
    assert stats["success_rate"] >= 0.9
    assert stats["mean_l2"] < 6  # a perturbation, not a new image


def test_fgsm_lowers_accuracy(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.7
    x_adv = make_attack("fgsm", model, eps=4 / 255).run(x, y, progress=False)
    stats = attack_stats(model, x, x_adv, y, eps=4 / 255)
    assert stats["accuracy"] < clean - 0.05
    assert stats["success_rate"] == pytest.approx(1 - stats["accuracy"])
    assert stats["mean_linf"] == pytest.approx(4 / 255, abs=1e-6)


def test_iterative_attacks_beat_fgsm(trained):
    model, x, y = trained
    fgsm = accuracy(model, make_attack("fgsm", model, eps=EPS)(x, y), y)
    for method in ("bim", "pgd", "mifgsm"):
        assert accuracy(model, make_attack(method, model, eps=EPS)(x, y), y) < fgsm


@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_stays_in_eps_ball_and_pixel_range(trained, method):
    model, x, y = trained
    x, y = x[:64], y[:64]
    x_adv = make_attack(method, model, eps=None if method == "opt" else EPS)(x, y)
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if method != "opt":
        assert (x_adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_same_seed_same_output_and_no_parameter_grad(trained, method):
    model, x, y = trained
    x, y = x[:32], y[:32]
    model.train()  # the attack must run in eval mode and give training mode back
    a = make_attack(method, model, targeted=True, target="random", seed=3).run(x, y, progress=False)
    b = make_attack(method, model, targeted=True, target="random", seed=3).run(x, y, progress=False)
    assert model.training
    model.eval()
    assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_pgd_seed_changes_random_start(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    a = make_attack("pgd", model, eps=EPS, seed=0)(x, y)
    b = make_attack("pgd", model, eps=EPS, seed=1)(x, y)
    assert not torch.equal(a, b)


def test_random_targets_reproducible_and_never_the_label(trained):
    model, x, y = trained
    attack = make_attack("fgsm", model, targeted=True, target="random", seed=5)
    t = attack.targets_for(x, y)
    assert torch.equal(t, attack.targets_for(x, y))
    assert not (t == y).any()


def test_y_none_attacks_the_clean_prediction(trained):
    model, x, _ = trained
    with torch.no_grad():
        pred = model(x[:16]).argmax(1)
    attack = make_attack("fgsm", model, eps=EPS)
    assert torch.equal(attack(x[:16]), attack(x[:16], pred))


def test_runs_inside_inference_mode(trained):
    model, x, y = trained
    attack = make_attack("bim", model, eps=EPS, targeted=True)
    expected = attack(x[:8])
    with torch.inference_mode():
        x_inf = x[:8].clone()
        got = attack(x_inf)
    torch.testing.assert_close(got, expected)


# -- user mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0, -4 / 255, 4, float("nan")])
def test_bad_eps_is_a_user_error(linear, eps):
    with pytest.raises(UserError, match="eps"):
        make_attack("fgsm", linear[0], eps=eps)


def test_unknown_method_lists_the_choices(linear):
    with pytest.raises(UserError, match="fgsm, bim, pgd, mifgsm, opt"):
        make_attack("deepfool", linear[0])


def test_unknown_option_and_target_are_user_errors(linear):
    with pytest.raises(UserError, match="steps"):
        make_attack("fgsm", linear[0], steps=3)
    with pytest.raises(UserError, match="least-likely"):
        make_attack("fgsm", linear[0], targeted=True, target="most-likely")


def test_bad_inputs_are_user_errors(linear):
    model, x, y = linear
    attack = FGSM(model)
    with pytest.raises(UserError, match="float"):
        attack((x * 255).to(torch.uint8), y)
    with pytest.raises(UserError, match="N×C×H×W"):
        attack(x[0], y)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        attack(x * 2, y)
    with pytest.raises(UserError, match="targeted=True"):
        attack(x, y, target=y)


# -- torchattacks ----------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True])
def test_torchattacks_adapter_matches_our_fgsm(trained, targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    ta = torchattacks.FGSM(model, eps=EPS)
    if targeted:
        ta.set_mode_targeted_least_likely(quiet=True)
    adapter = TorchattacksAdapter(ta)
    ours = FGSM(model, eps=EPS, targeted=targeted)
    # Same memory layout and batch size on both sides: otherwise float rounding in other
    # convolution kernels may flip the sign of a gradient that is zero up to rounding.
    adapter.channels_last = ours.channels_last = False
    theirs = adapter.run(x, y, batch_size=100, progress=False)
    torch.testing.assert_close(theirs, ours.run(x, y, batch_size=100, progress=False))
    assert all(p.grad is None for p in model.parameters())


def test_torchattacks_by_name(trained):
    pytest.importorskip("torchattacks")
    model, x, y = trained
    attack = make_attack("torchattacks:PGD", model, eps=EPS, alpha=2 / 255, steps=3, seed=1)
    a, b = attack(x[:16], y[:16]), attack(x[:16], y[:16])
    assert torch.equal(a, b) and (a - x[:16]).abs().max() <= EPS + 1e-6
    with pytest.raises(UserError, match="no attack"):
        make_attack("torchattacks:Nope", model)


def test_attack_stats_by_hand(linear):
    model, x, y = linear
    delta = torch.zeros_like(x)
    delta[:, 1, 2, 3] = 0.1  # one pixel per image: ‖δ‖₂ = ‖δ‖∞ = 0.1
    x, x_adv = x.clamp(0.2, 0.8), x.clamp(0.2, 0.8) + delta
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    target = (y + 1) % 5
    stats = attack_stats(model, x, x_adv, y, target=target, eps=0.1)
    assert torch.equal(stats["predictions"], pred)
    assert stats["success_rate"] == pytest.approx((pred == target).float().mean().item())
    assert stats["accuracy"] == pytest.approx((pred == y).float().mean().item())
    assert stats["mean_l2"] == pytest.approx(0.1) and stats["mean_linf"] == pytest.approx(0.1)
    assert stats["eps"] == 0.1 and stats["n"] == len(x)


def test_empty_input_and_target_tensor_without_targeted(linear):
    model, x, y = linear
    assert make_attack("pgd", model)(x[:0], y[:0]).shape == (0, 3, 4, 4)
    with pytest.raises(UserError, match="targeted=True"):
        make_attack("opt", model, targeted=False, target=y)


def test_channels_last_swap_gives_the_weights_back_and_the_same_attack(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [(w.data_ptr(), w.stride()) for w in weights]
    attack = make_attack("fgsm", model, eps=EPS)
    fast = attack(x, y)  # on the CPU: conv weights channels-last while it runs
    assert [(w.data_ptr(), w.stride()) for w in weights] == before
    attack.channels_last = False
    plain = attack(x, y)
    # The same algorithm; the layout only changes the rounding of the convolutions'
    # sums, which may flip sign(∇) where a gradient is ~0.
    assert ((fast - plain).abs() > 1e-6).float().mean() < 1e-3


def test_eval_mode_gives_each_module_its_own_mode_back(trained):
    model, x, y = trained
    model.train()
    model.net[0].eval()  # e.g. a frozen layer inside a model in training
    try:
        make_attack("fgsm", model, eps=EPS)(x[:8], y[:8])
        assert model.training and model.net[1].training and not model.net[0].training
    finally:
        model.eval()
