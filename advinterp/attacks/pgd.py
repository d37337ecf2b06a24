"""PGD: BIM from a random start in the ε-ball."""

from __future__ import annotations

import torch
from torch import nn

from advinterp.attacks.base import Attack, check_positive, check_steps
from advinterp.attacks.fgsm import fgsm_step


class PGD(Attack):
    r"""PGD from 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    (Madry et al. 2018) [https://arxiv.org/abs/1706.06083].

    ``x⁰ = Π(x + U(−ε, ε))`` (seeded), then ``xᵗ⁺¹ = Π(xᵗ + α·sign(∇ₓL(f(xᵗ), y)))``,
    Π the projection onto the ε-ball ∩ [0, 1]; targeted uses ``−L(f(xᵗ), y*)``.

    Distance Measure : Linf

    Arguments:
        model (nn.Module): maps [0, 1] pixels to logits.
        eps (float): maximum perturbation. (Default: 4/255)
        alpha (float): step size. (Default: 2.5·ε/steps)
        steps (int): iterations. (Default: 10)
        targeted (bool): aim for ``y*``. (Default: False)
        target ("least-likely", "random" or tensor): target choice. (Default: "least-likely")
        seed (int): seed for the random start and random targets. (Default: 0)

    Examples::
        >>> attack = PGD(model, eps=4/255, steps=10)
        >>> x_adv = attack.run(images, labels)
    """

    name = "pgd"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 4 / 255,
        alpha: float | None = None,
        steps: int = 10,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
    ):
        super().__init__(model, eps, targeted, target, seed)
        self.steps = check_steps(steps)
        self.alpha = (
            2.5 * self.eps / self.steps if alpha is None else check_positive("alpha", alpha)
        )

    def forward(self, x, y, target, gen):
        noise = torch.rand(x.shape, generator=gen).to(x.device, x.dtype)
        x_adv = self.project(x + self.eps * (2 * noise - 1), x)
        for _ in range(self.steps):
            grad = self.loss_grad(x_adv, y, target)
            x_adv = self.project(fgsm_step(x_adv, grad, self.alpha), x)
        return x_adv
