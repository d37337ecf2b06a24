"""BIM (iterative FGSM), cited by the paper as [11]."""

from __future__ import annotations

import torch
from torch import nn

from advinterp.attacks.base import Attack, check_positive, check_steps
from advinterp.attacks.fgsm import fgsm_step


def kurakin_steps(eps: float) -> int:
    """Kurakin et al.'s number of iterations, ``min(ε+4, 1.25ε)`` with ε in 0–255 units."""
    e = round(eps * 255, 6)  # 4/255*255 is 4.000000000000001
    return max(1, int(min(e + 4, 1.25 * e)))


class BIM(Attack):
    r"""BIM from 'Adversarial Examples in the Physical World' (Kurakin et al. 2017)
    [https://arxiv.org/abs/1607.02533].

    Repeats FGSM with a small step, projecting onto the ε-ball ∩ [0, 1]:
    ``x⁰ = x``, ``xᵗ⁺¹ = Π(xᵗ + α·sign(∇ₓL(f(xᵗ), y)))``; targeted uses ``−L(f(xᵗ), y*)``.

    Distance Measure : Linf

    Arguments:
        model (nn.Module): maps [0, 1] pixels to logits.
        eps (float): maximum perturbation. (Default: 4/255)
        alpha (float): step size. (Default: 1/255)
        steps (int): iterations. (Default: min(ε·255 + 4, 1.25·ε·255), Kurakin's rule)
        targeted (bool): aim for ``y*``. (Default: False)
        target ("least-likely", "random" or tensor): target choice. (Default: "least-likely")
        seed (int): seed for random targets. (Default: 0)

    Examples::
        >>> attack = BIM(model, eps=4/255)
        >>> x_adv = attack.run(images, labels)
    """

    name = "bim"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 4 / 255,
        alpha: float = 1 / 255,
        steps: int | None = None,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
    ):
        super().__init__(model, eps, targeted, target, seed)
        self.alpha = check_positive("alpha", alpha)
        self.steps = kurakin_steps(self.eps) if steps is None else check_steps(steps)

    def forward(self, x, y, target, gen):
        x_adv = x
        for _ in range(self.steps):
            grad = self.loss_grad(x_adv, y, target)
            x_adv = self.project(fgsm_step(x_adv, grad, self.alpha), x)
        return x_adv
