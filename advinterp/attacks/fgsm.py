"""FGSM, the paper's eq. 1."""

from __future__ import annotations

import torch
from torch import nn

from advinterp.attacks.base import Attack


def fgsm_step(x: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """One FGSM step, eq. 1: ``clip[0,1](x + ε·sign(grad))``.

    ``grad`` is the gradient of the loss to climb (for a targeted step, of
    ``−L(f(x), y*)``). ``eps`` is a fraction of the pixel range, one number or
    one per image (a tensor of ``len(x)`` values, as adversarial training draws
    them). Returns a new tensor; ``x`` is not changed.
    """
    if isinstance(eps, torch.Tensor) and eps.dim() > 0:
        eps = eps.view(-1, *([1] * (x.dim() - 1)))
    return (x + eps * grad.sign()).clamp_(0.0, 1.0)


class FGSM(Attack):
    r"""FGSM from 'Explaining and Harnessing Adversarial Examples' (Goodfellow et al. 2015)
    [https://arxiv.org/abs/1412.6572]; eq. 1 of Dong, Su & Zhu (2022).

    ``x* = clip[0,1](x + ε·sign(∇ₓL(f(x), y)))``; targeted: ``x − ε·sign(∇ₓL(f(x), y*))``.

    Distance Measure : Linf

    Arguments:
        model (nn.Module): maps [0, 1] pixels to logits.
        eps (float): maximum perturbation. (Default: 4/255, the paper's Table 2)
        targeted (bool): step towards ``y*`` instead of away from ``y``. (Default: False)
        target ("least-likely", "random" or tensor): target choice. (Default: "least-likely")
        seed (int): seed for random targets. (Default: 0)

    Examples::
        >>> attack = FGSM(model, eps=4/255)
        >>> x_adv = attack.run(images, labels)
    """

    name = "fgsm"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 4 / 255,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
    ):
        super().__init__(model, eps, targeted, target, seed)

    def forward(self, x, y, target, gen):
        return fgsm_step(x, self.loss_grad(x, y, target), self.eps)
