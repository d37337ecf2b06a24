"""Adversarial attacks in pixel space [0, 1]: FGSM, BIM, PGD, MI-FGSM and the paper's eq. 4.

``make_attack("opt", model)`` builds one by name; ``attack.run(x, y)`` attacks
a whole tensor; :func:`attack_stats` measures the result.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from advinterp.attacks.adapter import TorchattacksAdapter
from advinterp.attacks.base import (
    Attack,
    attack_succeeded,
    least_likely_targets,
    predict_logits,
    random_targets,
)
from advinterp.attacks.bim import BIM
from advinterp.attacks.fgsm import FGSM
from advinterp.attacks.mifgsm import MIFGSM
from advinterp.attacks.opt import Opt
from advinterp.attacks.pgd import PGD
from advinterp.errors import UserError

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "mifgsm": MIFGSM,
    "opt": Opt,
}
TORCHATTACKS_PREFIX = "torchattacks:"
COMMON_ARGS = {"model", "eps", "targeted", "target", "seed"}


def make_attack(
    method: str,
    model: nn.Module,
    eps: float | None = None,
    targeted: bool | None = None,
    target: str | torch.Tensor = "least-likely",
    seed: int = 0,
    **kwargs,
) -> Attack:
    """Build attack ``method`` (fgsm, bim, pgd, mifgsm, opt, or ``torchattacks:<Name>``).

    ``eps`` (a fraction, 4/255) and ``targeted`` default to the method's own
    defaults (4/255 and untargeted; ``opt``: no ε bound, targeted, as in the
    paper). ``kwargs`` are the method's options (``steps``, ``alpha``,
    ``momentum``, ``lam``, ``lr``).

    Example::

        attack = make_attack("opt", model, lam=10, steps=20)
        x_adv = attack.run(x, y)
    """
    if method.startswith(TORCHATTACKS_PREFIX):
        if eps is not None:
            kwargs["eps"] = eps
        name = method[len(TORCHATTACKS_PREFIX) :]
        return TorchattacksAdapter.from_name(
            name, model, targeted=bool(targeted), target=target, seed=seed, **kwargs
        )
    cls = ATTACKS.get(method.lower())
    if cls is None:
        raise UserError(
            f"unknown attack {method!r}: choose one of {', '.join(ATTACKS)} "
            f"(or {TORCHATTACKS_PREFIX}<Name> for a torchattacks attack)"
        )
    options = set(inspect.signature(cls).parameters) - COMMON_ARGS
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise UserError(
            f"{method} has no option {', '.join(unknown)}: its options are {', '.join(sorted(options))}"
        )
    if eps is not None:
        kwargs["eps"] = eps
    if targeted is not None:
        kwargs["targeted"] = targeted
    return cls(model, target=target, seed=seed, **kwargs)


def attack_stats(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor | None,
    target: torch.Tensor | None = None,
    eps: float | None = None,
    batch_size: int = 256,
) -> dict:
    """How an attack went: success rate, distances, and the model's predictions on ``x_adv``.

    Success is :func:`attack_succeeded`: ``pred == target`` where a target is
    given (≥ 0), else ``pred != y`` (``y`` None: the clean predictions stand in). Returns
    ``success_rate``, ``accuracy`` (``pred == y``), ``mean_l2`` and
    ``mean_linf`` (pixel units, [0, 1] scale), ``eps`` (as given), ``n`` and
    ``predictions`` (int64 tensor on ``x``'s device).
    ``attack.targets_for(x, y)`` gives the targets an attack used.
    """
    if x.shape != x_adv.shape:
        raise UserError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} differ in shape")
    pred = predict_logits(model, x_adv, batch_size).argmax(dim=1)
    if y is None:
        y = predict_logits(model, x, batch_size).argmax(dim=1)
    y = y.to(pred.device)
    fooled = attack_succeeded(pred, y, target)
    delta = (x_adv - x).flatten(1)
    return {
        "success_rate": _mean(fooled),
        "accuracy": _mean(pred == y),
        "mean_l2": _mean(delta.norm(dim=1)),
        "mean_linf": _mean(delta.abs().amax(dim=1)),
        "eps": eps,
        "n": len(x),
        "predictions": pred,
    }


def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


__all__ = [
    "ATTACKS",
    "BIM",
    "FGSM",
    "MIFGSM",
    "PGD",
    "Attack",
    "Opt",
    "TorchattacksAdapter",
    "attack_stats",
    "attack_succeeded",
    "least_likely_targets",
    "make_attack",
    "random_targets",
]
