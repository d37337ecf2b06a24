"""Plumbing shared by every attack: checks, target choice, seeding, batching, eval mode."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from advinterp.device import model_device
from advinterp.errors import UserError
from advinterp.progress import progress as tqdm

TARGET_CHOICES = ("least-likely", "random")


def least_likely_targets(logits: torch.Tensor) -> torch.Tensor:
    """The class each image is least likely to be (the paper's y*), from clean ``logits``."""
    return logits.argmin(dim=1)


def attack_succeeded(
    preds: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Per image, whether the attack succeeded: a boolean tensor.

    Targeted images (``targets`` ≥ 0) succeed when the prediction on the
    adversarial image is the target; untargeted ones (``targets`` None, or −1
    as adversarial sets store it) when it is not the label.
    """
    labels = labels.to(preds.device)
    if targets is None:
        return preds != labels
    targets = targets.to(preds.device)
    return torch.where(targets >= 0, preds == targets, preds != labels)


def random_targets(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly drawn class other than ``labels``, per image.

    Adding an offset in ``1..num_classes-1`` modulo ``num_classes`` is uniform
    over the other classes and can never land back on the label.
    """
    device = generator.device if generator is not None else labels.device
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=device)
    return (labels + offset.to(labels.device)) % num_classes


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float, or raise :class:`UserError` unless 0 < eps ≤ 1."""
    eps = float(eps)
    if not 0.0 < eps <= 1.0:
        raise UserError(
            f"eps={eps:g} is outside (0, 1]: the API takes ε as a fraction of the "
            "pixel range, e.g. eps=4/255 (the CLI takes --eps 4)"
        )
    return eps


def check_steps(steps: int) -> int:
    """Return ``steps`` as an int, or raise :class:`UserError` unless it is a whole number ≥ 1."""
    if isinstance(steps, bool) or not float(steps).is_integer() or steps < 1:
        raise UserError(f"steps must be a whole number ≥ 1, got {steps}")
    return int(steps)


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise :class:`UserError` unless finite and > 0."""
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive number, got {value:g}")
    return value


def check_images(x: torch.Tensor) -> None:
    """Raise :class:`UserError` unless ``x`` is a float N×C×H×W tensor of pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
        raise UserError(
            f"attack inputs must be a float N×C×H×W tensor, got {got}: "
            "convert uint8 images with x.float() / 255"
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError(
            f"attack inputs must lie in [0, 1], got [{x.min().item():g}, {x.max().item():g}]: "
            "pass un-normalised pixels (normalisation lives in the model wrapper)"
        )


def _check_labels(name: str, labels: torch.Tensor | None, n: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise UserError(f"{name} must be an integer tensor of shape ({n},), got {shape}")


class Attack:
    r"""Base class: subclasses implement :meth:`forward` on one batch.

    Arguments:
        model (nn.Module): maps [0, 1] pixels N×C×H×W to logits.
        eps (float or None): L∞ bound as a fraction of the pixel range (4/255).
        targeted (bool): aim for a target class instead of away from the label.
        target ("least-likely", "random" or tensor): how targets are chosen
            when targeted; a tensor gives one target per image of ``run``.
        seed (int): seeds every random choice; the same call twice gives the
            same result.

    Calling ``attack(x, y)`` attacks one batch; ``attack.run(x, y)`` a whole
    tensor in batches with a progress bar. ``y`` may be ``None``: the model's
    clean predictions stand in for the labels.
    """

    name = "attack"
    #: Conv weights in channels-last layout while the attack runs: ``None`` (default) on the
    #: CPU only, ``True`` on any device, ``False`` never. See :func:`_channels_last`.
    channels_last: bool | None = None

    def __init__(
        self,
        model: nn.Module,
        eps: float | None,
        targeted: bool = False,
        target: str | torch.Tensor = "least-likely",
        seed: int = 0,
    ):
        self.model = model
        self.eps = None if eps is None else check_eps(eps)
        self.targeted = bool(targeted)
        if not isinstance(target, torch.Tensor) and target not in TARGET_CHOICES:
            raise UserError(
                f"unknown target {target!r}: choose 'least-likely', 'random' or a tensor of classes"
            )
        if isinstance(target, torch.Tensor) and not self.targeted:
            raise UserError("a target tensor was given to an untargeted attack: pass targeted=True")
        self.target = target
        self.seed = int(seed)

    # -- what a subclass writes ------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """Adversarial images for one batch; ``target`` is None when untargeted."""
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------------

    def loss_grad(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """∇ₓ of the loss the attack climbs: ``L(f(x), y)``, or ``−L(f(x), y*)`` when targeted.

        The paper's recipe for targeted attacks: replace ``L(f(x), y)`` by
        ``−L(f(x), y*)`` in eqs. 1 and 2. ``L`` is the cross-entropy summed
        over the batch, so a sample's gradient does not depend on the batch
        size; only the input gradient is requested, so no parameter gradient
        is computed or stored. The gradient is on ``x_adv``'s device; the labels may sit
        on the model's or the input's.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)
        if target is None:
            loss = F.cross_entropy(logits, y.to(logits.device), reduction="sum")
        else:
            loss = -F.cross_entropy(logits, target.to(logits.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clip onto the ε-ball around ``x`` (when ε is set) intersected with [0, 1]."""
        if self.eps is None:
            return x_adv.clamp(0.0, 1.0)
        return torch.clamp(
            x_adv, min=(x - self.eps).clamp_(min=0.0), max=(x + self.eps).clamp_(max=1.0)
        )

    # -- public interface ------------------------------------------------------------------

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor | None = None, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attack one batch; returns adversarial images on ``x``'s device."""
        return self.run(x, y, target, batch_size=max(len(x), 1), progress=False)

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        batch_size: int = 256,
        progress: bool = True,
    ) -> torch.Tensor:
        """Attack every image of ``x`` in batches of ``batch_size``; returns ``x_adv``.

        ``x`` may sit on the CPU while the model is on a GPU: batches move to
        the model's device and come back. ``target`` overrides the target
        choice given at construction (targeted attacks only).
        """
        if len(x) == 0:
            check_images(x)
            return x.clone()
        gen = torch.Generator().manual_seed(self.seed)  # on the CPU: same draws on any device
        device = model_device(self.model, x.device)
        # Attacks need autograd even when the caller is in no_grad or inference mode.
        with (
            _eval_mode(self.model),
            torch.inference_mode(False),  # before the layout swap: no inference-mode weights
            _channels_last(self.model, device, self.channels_last),
            torch.enable_grad(),
        ):
            y, target = self._labels_and_targets(x, y, target, batch_size, gen)
            out = torch.empty_like(x)
            bar = tqdm(total=len(x), desc=self.name, unit="img", disable=not progress)
            for start in range(0, len(x), batch_size):
                sl = slice(start, start + batch_size)
                xb, yb = _to(x[sl], device), _to(y[sl], device)
                tb = None if target is None else _to(target[sl], device)
                out[sl] = self.forward(xb, yb, tb, gen).detach()
                bar.update(len(xb))
            bar.close()
        return out

    def targets_for(
        self, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 256
    ) -> torch.Tensor | None:
        """The targets :meth:`run` aims for on ``x`` (None when untargeted), e.g. for stats."""
        gen = torch.Generator().manual_seed(self.seed)
        return self._labels_and_targets(x, y, None, batch_size, gen)[1]

    def _labels_and_targets(self, x, y, target, batch_size, gen):
        """Check the inputs; return the labels (clean predictions if ``y`` is None) and targets."""
        check_images(x)
        _check_labels("y", y, len(x))
        if batch_size < 1:
            raise UserError(f"batch_size must be ≥ 1, got {batch_size}")
        if target is None and self.targeted and isinstance(self.target, torch.Tensor):
            target = self.target
        _check_labels("target", target, len(x))
        if target is not None and not self.targeted:
            raise UserError("a target was given to an untargeted attack: pass targeted=True")
        if target is not None:
            target = target.to(x.device)
        num_classes = getattr(self.model, "num_classes", None)
        logits = None
        if y is None or (self.targeted and target is None and self.target == "least-likely"):
            logits = predict_logits(self.model, x, batch_size)
        if y is None:
            y = logits.argmax(dim=1)
        if self.targeted and target is None:
            if self.target == "least-likely":
                target = least_likely_targets(logits)
            else:
                if not isinstance(num_classes, int):
                    num_classes = predict_logits(self.model, x[:1]).shape[1]
                target = random_targets(y, num_classes, gen)
        return y, target

    def __repr__(self) -> str:
        eps = "None" if self.eps is None else f"{self.eps * 255:g}/255"
        tgt = f", target={self.target!r}" if self.targeted else ""
        return f"{type(self).__name__}(eps={eps}, targeted={self.targeted}{tgt}, seed={self.seed})"


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on ``x``, in batches, on ``x``'s device."""
    device = model_device(model, x.device)
    with _eval_mode(model), torch.inference_mode():
        chunks = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    if not chunks:
        return torch.empty(0, getattr(model, "num_classes", 0), device=x.device)
    return torch.cat(chunks).to(x.device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (fixed batch-norm statistics, no dropout) for the block, then restore.

    Each module gets its own mode back (a frozen batch norm inside a training model
    stays frozen); a model already in eval mode is left alone, which saves two walks
    over its modules per call.
    """
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield model
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def _channels_last(model: nn.Module, device: torch.device, enabled: bool | None = None):
    """Every ``Conv2d`` weight of ``model`` in channels-last layout for the block, then back.

    On the CPU, oneDNN convolves NHWC activations directly, where NCHW ones are
    reordered to its blocked layout and back around every convolution, forward
    and backward. One forward+backward of the default model runs 1.3–1.6× faster
    (VGG-16, ResNet-18, EfficientNet-Lite0: 1.1–1.4×; ``benches/bench_attacks.py``).
    Only strides change, not values: the results differ from the NCHW ones by
    float rounding in the sums. Each weight's own tensor is put back afterwards,
    so the caller's model, optimiser and layout are as they were. ``enabled``
    None means on the CPU only (not measured on GPUs).
    """
    if enabled is None:
        enabled = device.type == "cpu"
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    if enabled:
        seen: set[int] = set()
        for module in model.modules():
            w = getattr(module, "weight", None) if isinstance(module, nn.Conv2d) else None
            if not isinstance(w, nn.Parameter) or w.dim() != 4 or id(w) in seen:
                continue
            seen.add(id(w))
            # ``.to``, not ``.contiguous``: a weight with one input channel counts as both
            # layouts and is kept as is by ``.contiguous``; ``.to`` gives it channels-last
            # strides, so the first convolution's output is channels-last too.
            cl = w.data.to(memory_format=torch.channels_last)
            if cl.stride() != w.stride():
                swapped.append((w, w.data))
                w.data = cl
    try:
        yield model
    finally:
        for w, data in reversed(swapped):
            w.data = data


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, as a normal tensor: autograd refuses inference-mode tensors."""
    t = t.to(device)
    return t.clone() if t.is_inference() else t
