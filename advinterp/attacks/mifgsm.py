"""MI-FGSM: iterative FGSM with momentum."""

from __future__ import annotations

import torch
from torch import nn

from advinterp.attacks.base import Attack, check_positive, check_steps
from advinterp.attacks.fgsm import fgsm_step


class MIFGSM(Attack):
    r"""MI-FGSM from 'Boosting Adversarial Attacks with Momentum' (Dong et al. 2018)
    [https://arxiv.org/abs/1710.06081].

    ``gᵗ⁺¹ = μ·gᵗ + ∇ₓL(f(xᵗ), y) / ‖∇ₓL(f(xᵗ), y)‖₁`` (per sample),
    ``xᵗ⁺¹ = Π(xᵗ + α·sign(gᵗ⁺¹))``, Π the projection onto the ε-ball ∩ [0, 1];
    targeted uses ``−L(f(xᵗ), y*)``.

    Distance Measure : Linf

    Arguments:
        model (nn.Module): maps [0, 1] pixels to logits.
        eps (float): maximum perturbation. (Default: 4/255)
        alpha (float): step size. (Default: ε/steps, as in the paper)
        steps (int): iterations. (Default: 10)
        momentum (float): decay factor μ. (Default: 1.0)
        targeted (bool): aim for ``y*``. (Default: False)
        target ("least-likely", "random" or tensor): target choice. (Default: "least-likely")
        seed (int): seed for random targets. (Default: 0)

    Examples::
        >>> attack = MIFGSM(model, eps=4/255, steps=10, momentum=1.0)
        >>> x_adv = attack.run(images, labels)
    """

    name = "mifgsm"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 4 / 255,
        alpha: float | None = None,
        steps: int = 10,
        momentum: float = 1.0,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
    ):
        super().__init__(model, eps, targeted, target, seed)
        self.steps = check_steps(steps)
        self.alpha = self.eps / self.steps if alpha is None else check_positive("alpha", alpha)
        self.momentum = float(momentum)

    def forward(self, x, y, target, gen):
        x_adv, g = x, torch.zeros_like(x)
        for _ in range(self.steps):
            grad = self.loss_grad(x_adv, y, target)
            l1 = grad.abs().sum(dim=(1, 2, 3), keepdim=True).clamp_min_(1e-12)
            g = self.momentum * g + grad / l1
            x_adv = self.project(fgsm_step(x_adv, g, self.alpha), x)
        return x_adv
