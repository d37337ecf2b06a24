"""Any torchattacks attack behind our interface (optional dependency)."""

from __future__ import annotations

import torch

from advinterp.attacks.base import Attack
from advinterp.errors import UserError


def import_torchattacks():
    """torchattacks, or a :class:`UserError` saying how to install it."""
    try:
        import torchattacks
    except ImportError as e:
        raise UserError(
            "torchattacks is not installed: pip install torchattacks (or advinterp[attacks])"
        ) from e
    return torchattacks


class TorchattacksAdapter(Attack):
    r"""Wraps a ``torchattacks`` attack object so it runs where ours do.

    Same ``attack(x, y, target)`` and ``attack.run(x, y, target, batch_size,
    progress)`` as :class:`~advinterp.attacks.base.Attack`: batching, progress
    bar, eval mode, labels from clean predictions when ``y`` is None. Targeted
    if ``ta_attack`` is: it is then switched to torchattacks' targeted-by-label
    mode so that our ``target`` choice ("least-likely", "random" or a tensor)
    drives it. torchattacks draws from the global RNG; each batch runs under a
    forked RNG seeded from ``seed``, so results are reproducible and the
    caller's RNG is left untouched.

    Arguments:
        ta_attack (torchattacks.Attack): a constructed torchattacks attack.
        target ("least-likely", "random" or tensor): target choice. (Default: "least-likely")
        seed (int): seed for random targets and torchattacks' own draws. (Default: 0)

    Examples::
        >>> attack = TorchattacksAdapter(torchattacks.CW(model, c=1.0))
        >>> x_adv = attack.run(images, labels)
    """

    def __init__(
        self, ta_attack, target: str | torch.Tensor = "least-likely", seed: int = 0
    ) -> None:
        super().__init__(ta_attack.model, None, ta_attack.targeted, target, seed)
        self.ta_attack = ta_attack
        self.name = f"torchattacks.{type(ta_attack).__name__}"
        self.eps = getattr(ta_attack, "eps", None)  # reported, not enforced: torchattacks does
        if self.targeted:
            ta_attack.set_mode_targeted_by_label(quiet=True)

    @classmethod
    def from_name(
        cls,
        name: str,
        model,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
        **kwargs,
    ) -> TorchattacksAdapter:
        """Build ``torchattacks.<name>(model, **kwargs)`` and wrap it."""
        ta = import_torchattacks()
        ta_cls = getattr(ta, name, None)
        if not (isinstance(ta_cls, type) and issubclass(ta_cls, ta.attack.Attack)):
            raise UserError(f"torchattacks has no attack {name!r}: see torchattacks.__all__")
        ta_attack = ta_cls(model, **kwargs)
        if targeted:
            ta_attack.set_mode_targeted_by_label(quiet=True)
        return cls(ta_attack, target=target, seed=seed)

    def forward(self, x, y, target, gen):
        seed = int(torch.randint(2**62, (1,), generator=gen))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.ta_attack(x, y if target is None else target)
