"""Forward hooks that record named layers of a model without touching its code.

A unit is a channel of a layer's output; its response to an image is one
number, the spatial max of the channel's map (mean as an option), as in the
paper's activation maximisation (§2) and the LC/CS metrics (§4.2).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from advinterp.errors import UserError

__all__ = ["Recorder", "resolve_layers", "check_reduction", "reduce_map", "REDUCTIONS"]

REDUCTIONS = ("max", "mean")


def check_reduction(reduce: str) -> str:
    """Return ``reduce``, or raise :class:`UserError` unless it is one of :data:`REDUCTIONS`."""
    if reduce not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduce!r}: use one of {', '.join(REDUCTIONS)}")
    return reduce


def reduce_map(out: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """``N×C×…`` → ``N×C``: max (or mean) over every dimension after the channel; a unit's
    response. A 2-D output is returned as it is."""
    if out.dim() <= 2:
        return out
    flat = out.flatten(2)
    return flat.amax(2) if reduce == "max" else flat.mean(2)


class _StopForward(Exception):
    """Raised by a hook once every recorded layer has run: the rest of the network is unused."""


def _network(model: nn.Module) -> nn.Module:
    # A Classifier's layers are named as in its ``net`` (``layer1.0.conv1``), not ``net.…``.
    return getattr(model, "net", model)


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Layer names of ``model.net`` to record: ``"conv"`` is every ``Conv2d`` (the
    paper's "all conv layers"); a name or list of names is checked, and an unknown
    one raises :class:`UserError` naming the closest existing layers."""
    modules = dict(_network(model).named_modules())
    modules.pop("", None)
    if isinstance(layers, str):
        if layers == "conv":
            names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not names:
                raise UserError("the model has no Conv2d layers: name the layers to record")
            return names
        layers = [layers]
    # Names as ``model.named_modules()`` gives them (``net.layer1.0.conv1``) are accepted too.
    names = [
        n[4:] if n not in modules and n.startswith("net.") and n[4:] in modules else n
        for n in layers
    ]
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError('no layers given: name at least one layer, or "conv" for all conv layers')
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"layers are e.g. {', '.join(list(modules)[:5])}"
            )
            raise UserError(
                f"unknown layer {name!r}: {hint} (advinterp.models.layer_shapes lists them all)"
            )
    return names


class Recorder:
    """Record per-unit responses of named layers on every forward pass of ``model``.

    A context manager: entering registers one forward hook per layer on
    ``model.net`` (or ``model`` when it has no ``net``), leaving removes them.
    After each forward pass ``responses[layer]`` is an ``N×C`` tensor (for an
    ``N×C×H×W`` map, the spatial max of each channel, or the mean with
    ``reduce="mean"``; a 2-D output is kept as is), detached, on the model's
    device. Layers named in ``keep_maps`` (or all, with ``True``) also keep their
    full output in ``maps[layer]`` (a copy, safe from later in-place ops), for
    dissection. Works under ``torch.inference_mode`` and inside attacks (by
    default the hooks never hold the autograd graph).

    Args:
        model: a :class:`~advinterp.models.Classifier` or any ``nn.Module``.
        layers: layer names, or ``"conv"`` for every ``Conv2d`` (default).
        reduce: ``"max"`` (default, as the paper) or ``"mean"`` over space; ``None``
            keeps each layer's raw output (not copied; any type, e.g. for its shape).
        keep_maps: ``False`` (default), ``True`` or a list of recorded layers.
        inputs: record each layer's input (its first positional argument) instead
            of its output; the input of the last ``Linear`` is the penultimate feature.
        keep_graph: keep the autograd graph (nothing is detached), so that a loss on
            what was recorded reaches the model's parameters (adversarial training's φ).
        stop: stop the forward pass of ``rec(x)`` once every recorded layer has run:
            the layers after them do not run and ``rec.output`` is None. A module that
            runs more than once a pass is then recorded at its first run.

    Example::

        with Recorder(model, "conv") as rec, torch.inference_mode():
            responses = rec(x)                # {"conv1": N×16, "layer1.0.conv1": N×16, …}
            logits = rec.output
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "conv",
        reduce: str | None = "max",
        keep_maps: bool | Sequence[str] = False,
        *,
        inputs: bool = False,
        keep_graph: bool = False,
        stop: bool = False,
    ):
        if reduce is not None:
            check_reduction(reduce)
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.reduce = reduce
        self.inputs, self.keep_graph, self.stop = bool(inputs), bool(keep_graph), bool(stop)
        if keep_maps is True:
            self.keep_maps = set(self.layers)
        else:
            self.keep_maps = set(keep_maps or ())
            extra = self.keep_maps - set(self.layers)
            if extra:
                raise UserError(
                    f"keep_maps names layers that are not recorded: {', '.join(sorted(extra))}; "
                    "add them to layers"
                )
        self.responses: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self.output = None
        self._handles: list = []
        self._in_call = False

    def __enter__(self) -> Recorder:
        return self.open()

    def open(self) -> Recorder:
        """Register the hooks (as entering the context does); :meth:`close` removes them."""
        self.close()
        modules = dict(_network(self.model).named_modules())
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (what was recorded stays readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``model(x)`` and return this batch's responses; the output is in ``self.output``."""
        if not self._handles:
            raise RuntimeError("Recorder is not active: use it as `with Recorder(...) as rec:`")
        self.responses, self.maps = {}, {}
        self._in_call = True
        try:
            self.output = self.model(x)
        except _StopForward:
            self.output = None
        finally:
            self._in_call = False
        missing = [n for n in self.layers if n not in self.responses]
        if missing:
            raise UserError(
                f"layer {missing[0]} did not run in the forward pass; record layers the model uses"
            )
        return self.responses

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.inputs:
                if not inputs:
                    raise UserError(f"layer {name} has no positional input to record")
                output = inputs[0]
            if torch.is_tensor(output):
                out = output if self.keep_graph else output.detach()
            elif self.reduce is None and name not in self.keep_maps:
                out = output
            else:
                what = "takes" if self.inputs else "returns"
                raise UserError(
                    f"layer {name} {what} {type(output).__name__}, not a tensor: "
                    "record one of its submodules instead"
                )
            self.responses[name] = out if self.reduce is None else reduce_map(out, self.reduce)
            if name in self.keep_maps:
                self.maps[name] = out.clone()
            if self.stop and self._in_call and len(self.responses) == len(self.layers):
                raise _StopForward

        return hook
