"""Where a pass runs: ``--device auto|cpu|cuda[:N]``, ``--amp`` and image-decoding workers.

A model is moved once (``model.to(device)``); the wrapper moves each batch to
the device of its parameters (:class:`advinterp.models.Classifier`), so data
can stay on the CPU until it meets the model. Statistics follow the model's
outputs onto its device, and whatever is written to disk comes back to the CPU.

``--amp`` runs the forward passes under :func:`torch.autocast` (bfloat16 where
the GPU has it, else float16). It is a CUDA feature: on the CPU it has no effect
and says so with a warning, so one command line serves a laptop and a GPU node.
Statistics stay float32 whatever the precision of the activations.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch
from torch import nn

from advinterp.errors import UserError

__all__ = ["autocast", "default_workers", "model_device", "resolve_device"]

_SPEC = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``auto`` and ``cuda`` mean the current GPU, or under ``torchrun`` the GPU of the
    process's ``LOCAL_RANK``. Raises :class:`UserError` for an unknown name, or for CUDA
    where there is none.

    Example::

        model = load_model("efficientnet_lite0").to(resolve_device("auto"))
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    match = _SPEC.fullmatch(spec)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        reason = (
            "this PyTorch is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise UserError(
            f"--device {spec}: {reason}; use --device cpu (or auto: CUDA when there is one)"
        )
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise UserError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    if index is None and int(os.environ.get("LOCAL_RANK", count)) < count:
        index = os.environ["LOCAL_RANK"]  # under torchrun, each process its own GPU
    return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter (or buffer); ``default`` when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


def autocast(device: torch.device | str, enabled: bool = True):
    """A context for the forward passes: mixed precision on CUDA when ``enabled``
    (bfloat16 where supported, else float16); on the CPU nothing, with a warning when
    ``enabled``."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    if device.type != "cuda":
        warnings.warn(
            "--amp has no effect on the CPU: running in float32", UserWarning, stacklevel=2
        )
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def default_workers() -> int:
    """Image-decoding processes for image folders and probes: min(4, CPUs). In-memory sets
    are sliced in place and never use them."""
    return min(4, os.cpu_count() or 1)
