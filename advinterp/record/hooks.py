"""Forward hooks that record named layers of a model without touching its code.

A unit is a channel of a layer's output; its response to an image is one
number, the spatial max of the channel's map (mean as an option), as in the
paper's activation maximisation (§2) and the LC/CS metrics (§4.2).

Where a unit is read. The paper and Network Dissection read a convolution's
channel where the network uses it: after its batch norm and nonlinearity.
``"units"`` (the default of every verb) finds those points by tracing one
forward pass (:func:`unit_layers`): for each convolution, the activation that
takes its (batch-normalised) output; where none does at once (the second
convolution of a residual block, a shortcut projection, torchvision's
``BasicConv2d`` whose ReLU is a function), the output of the block that holds
it. Per architecture this gives:

- ResNets (``resnet``, ``resnet18``…): the stem's ``relu``; in each block
  ``layerX.Y.relu#1`` (after ``bn1`` and the first ReLU; ``#k`` is the k-th call
  of a module that runs more than once a pass), ``layerX.Y.relu#2`` in a
  bottleneck, and the block ``layerX.Y`` (after the residual add and the last
  ReLU);
- AlexNet, VGG: the ReLU after each convolution (``features.1``, ``features.4``…);
- GoogLeNet, Inception v3: every ``BasicConv2d`` (convolution, BN, ReLU);
- MobileNet/EfficientNet-style blocks: the activation after each convolution's
  BN inside a block (``bn1`` of timm's ``BatchNormAct2d``), and each block's
  output, where its linear projection is used.

``"conv"`` reads the raw outputs of every ``Conv2d`` instead (before batch norm
and ReLU; a channel whose BN scale is negative is then ranked upside down).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from advinterp.errors import UserError

__all__ = [
    "Recorder",
    "resolve_layers",
    "unit_layers",
    "check_reduction",
    "reduce_map",
    "REDUCTIONS",
    "READOUTS",
]

REDUCTIONS = ("max", "mean")
#: The keywords ``layers`` takes: every unit where the network uses it, or raw conv outputs.
READOUTS = ("units", "conv")
#: Modules that are a unit's nonlinearity.
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.PReLU,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


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


def _split_call(name: str) -> tuple[str, int]:
    """``"layer1.0.relu#2"`` → ``("layer1.0.relu", 2)``; a plain name is its first call… of
    any: ``("fc", 0)`` (0: every call, the last one kept)."""
    base, sep, k = name.rpartition("#")
    if not sep:
        return name, 0
    if not k.isdigit() or int(k) < 1:
        raise UserError(f"bad layer {name!r}: after # comes a call number from 1, e.g. relu#1")
    return base, int(k)


def _leaflike(module: nn.Module) -> bool:
    # A batch norm with an activation inside (timm's BatchNormAct2d) counts as one step.
    return not any(True for _ in module.children()) or isinstance(
        module, nn.modules.batchnorm._BatchNorm
    )


def unit_layers(model: nn.Module) -> list[str]:
    """Where every unit of ``model`` is read by default: after its batch norm and
    nonlinearity, or at the output of the block that uses it (module doc), in the
    order they run. Found from one forward pass of a zero image on the CPU."""
    net = _network(model)
    modules = dict(net.named_modules())
    modules.pop("", None)
    calls: list[tuple[str, int, list[int], torch.Tensor]] = []  # name, call, input ids, out
    count: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            count[name] = count.get(name, 0) + 1
            if torch.is_tensor(output):
                ids = [id(t) for t in inputs if torch.is_tensor(t)]
                calls.append((name, count[name], ids, output))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    size = getattr(model, "input_size", None)
    chans = getattr(model, "in_chans", None)
    if size is None or chans is None:
        for h in handles:
            h.remove()
        raise UserError("the model does not say its input size: name the layers to record")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, chans, size, size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    def consumer(i: int) -> int | None:
        """The first later step (leaf-like module) that takes call ``i``'s output."""
        target = id(calls[i][3])
        for j in range(i + 1, len(calls)):
            if _leaflike(modules[calls[j][0]]) and target in calls[j][2]:
                return j
        return None

    def ancestors(name: str) -> list[str]:  # innermost first, neither containers nor the root
        parts = name.split(".")
        names = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
        return [a for a in names if not isinstance(modules[a], _CONTAINERS)]

    outputs: dict[str, set[int]] = {}  # module → ids of its outputs
    for name, _, _, out in calls:
        outputs.setdefault(name, set()).add(id(out))
    readouts: list[str] = []
    for i, (name, _, _, _) in enumerate(calls):
        if not isinstance(modules[name], nn.Conv2d):
            continue
        cur = i
        nxt = consumer(cur)
        if nxt is not None and isinstance(modules[calls[nxt][0]], nn.modules.batchnorm._BatchNorm):
            cur, nxt = nxt, consumer(nxt)
            act = getattr(modules[calls[cur][0]], "act", None)
            if isinstance(act, _ACTIVATIONS):  # batch norm and activation in one module
                readouts.append(calls[cur][0])
                continue
        if nxt is not None and isinstance(modules[calls[nxt][0]], _ACTIVATIONS):
            act_name, k, _, out = calls[nxt]
            # An activation whose output is a block's output (a residual block's last
            # ReLU) is named by the block.
            owner = next((a for a in ancestors(act_name) if id(out) in outputs[a]), None)
            if owner is not None:
                readouts.append(owner)
            else:
                readouts.append(act_name if count[act_name] == 1 else f"{act_name}#{k}")
            continue
        blocks = ancestors(name)
        readouts.append(blocks[0] if blocks else calls[cur][0])
    if not readouts:
        raise UserError("the model has no Conv2d layers: name the layers to record")
    return list(dict.fromkeys(readouts))


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Layer names of ``model.net`` to record: ``"units"`` is every unit where the
    network uses it (:func:`unit_layers`), ``"conv"`` every ``Conv2d``'s raw output;
    a name (``relu#1``: the first call of a module that runs more than once) or
    list of names is checked, and an unknown one raises :class:`UserError` naming
    the closest existing layers."""
    modules = dict(_network(model).named_modules())
    modules.pop("", None)
    if isinstance(layers, str):
        if layers == "units":
            return unit_layers(model)
        if layers == "conv":
            names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not names:
                raise UserError("the model has no Conv2d layers: name the layers to record")
            return names
        layers = [layers]
    elif len(layers) == 1 and layers[0] in READOUTS:
        return resolve_layers(model, layers[0])
    # Names as ``model.named_modules()`` gives them (``net.layer1.0.conv1``) are accepted too.
    names = [
        n[4:] if n not in modules and n.startswith("net.") and n[4:] in modules else n
        for n in layers
    ]
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError('no layers given: name at least one layer, or "conv" for all conv layers')
    for full in names:
        name, _ = _split_call(full)
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
        layers: layer names (``relu#2``: a module's second call in a pass), ``"units"``
            (default) for every unit where the network uses it, after batch norm and
            nonlinearity, or ``"conv"`` for every ``Conv2d``'s raw output.
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

        with Recorder(model) as rec, torch.inference_mode():
            responses = rec(x)                # {"relu": N×16, "layer1.0.relu#1": N×16, …}
            logits = rec.output
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "units",
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
        self._calls: dict[str, int] = {}
        self._in_call = False

    def __enter__(self) -> Recorder:
        return self.open()

    def open(self) -> Recorder:
        """Register the hooks (as entering the context does); :meth:`close` removes them."""
        self.close()
        net = _network(self.model)
        modules = dict(net.named_modules())
        self._calls = {}
        numbered = False
        for name in self.layers:
            base, k = _split_call(name)
            numbered |= k > 0
            self._handles.append(modules[base].register_forward_hook(self._hook(name, k)))
        if numbered:  # call numbers count from the start of each forward pass
            self._handles.append(net.register_forward_pre_hook(lambda *_: self._calls.clear()))
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

    def _hook(self, name: str, call: int = 0):
        def hook(module, inputs, output):
            if call:
                self._calls[name] = self._calls.get(name, 0) + 1
                if self._calls[name] != call:
                    return
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
