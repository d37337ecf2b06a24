"""Dataset specs: what a dataset's images and classes are, asked by name.

A spec says what a model must eat to read a dataset: channels, input size,
normalisation, and the classes with their WordNet ids. Models are built
against a spec (``create_model(arch, dataset="fashion-mnist")``) and checked
against one before any work (:func:`check_model_fits`), as timm's pretrained
configs carry each set of weights' settings. Adding a dataset is one
:func:`register_dataset` call.

Example::

    spec = dataset_spec("fashion-mnist")
    spec.in_chans, spec.input_size, spec.num_classes      # (1, 28, 10)
    dataset_spec("imagefolder:/data/imagenet/val").wnids   # the folder names it holds
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from advinterp.errors import UserError

__all__ = [
    "DatasetSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "check_model_fits",
    "dataset_names",
    "dataset_spec",
    "register_dataset",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """Images and classes of one dataset.

    ``input_size`` is the side of the square images the dataset yields; a
    dataset whose images are resized for the model (an image folder) has
    ``resizable=True`` and yields whatever side the model takes.
    ``classes``/``wnids`` are in class-index order; an image folder lists the
    wnids of its subfolders and takes its class indices from the model's label set.
    """

    name: str
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    wnids: tuple[str, ...]
    resizable: bool = False
    indexed_by_model: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        size = "any size" if self.resizable else f"{self.input_size}×{self.input_size}"
        return f"{self.in_chans}-channel {size} images of {self.num_classes} classes"


_REGISTRY: dict[str, Callable[[], DatasetSpec]] = {}
_CACHE: dict[str, DatasetSpec] = {}


def register_dataset(name: str, factory: Callable[[], DatasetSpec]) -> None:
    """Register ``factory`` (called once, on first use) as dataset ``name``."""
    _REGISTRY[name] = factory
    _CACHE.pop(name, None)


def dataset_names() -> list[str]:
    """Registered dataset names, plus the ``imagefolder:PATH`` form."""
    return [*_REGISTRY, "imagefolder:PATH"]


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or of ``imagefolder:PATH`` (its wnid subfolders)."""
    if name.startswith("imagefolder:"):
        return _imagefolder_spec(Path(name.split(":", 1)[1]))
    if name not in _REGISTRY:
        raise UserError(
            f"unknown dataset {name!r}: use {' or '.join(repr(n) for n in dataset_names())}"
        )
    if name not in _CACHE:
        _CACHE[name] = _REGISTRY[name]()
    return _CACHE[name]


def check_model_fits(model, spec: DatasetSpec, model_name: str | None = None) -> None:
    """Raise :class:`UserError` (one line) unless ``model`` can read ``spec``'s images and labels.

    Checked: channels, image size (unless the dataset resizes to the model), the
    class count (the dataset's labels must be class indices of the model), and for
    an image folder that the model has a wnid label set holding every subfolder.
    """
    what = model_name or (getattr(model, "config", None) or {}).get("name") or "the model"
    takes = (
        f"{what} takes {model.in_chans}-channel {model.input_size}×{model.input_size} images "
        f"of {model.num_classes} classes"
    )
    if model.in_chans != spec.in_chans:
        raise UserError(f"{takes} but {spec.name} has {spec.describe()}: choose a matching --data")
    if not spec.resizable and model.input_size != spec.input_size:
        raise UserError(f"{takes} but {spec.name} has {spec.describe()}: choose a matching --data")
    if spec.indexed_by_model:
        wnids = getattr(model, "wnids", None)
        if not wnids:
            raise UserError(
                f"{spec.name} is indexed by WordNet ids but {what} has no wnid label set: "
                "use an ImageNet model, or a checkpoint whose config lists its wnids"
            )
        unknown = sorted(set(spec.wnids) - set(wnids))
        if unknown:
            raise UserError(
                f"folder {unknown[0]} of {spec.name} ({len(unknown)} of {len(spec.wnids)} folders) "
                f"is not a class of {what}: name the folders by the model's wnids (e.g. {wnids[0]})"
            )
    elif model.num_classes != spec.num_classes:
        raise UserError(f"{takes} but {spec.name} has {spec.describe()}: choose a matching --data")


def _fashion_mnist() -> DatasetSpec:
    from advinterp.data.fashion import CLASSES, MEAN, STD

    names, wnids = zip(*CLASSES, strict=True)
    return DatasetSpec("fashion-mnist", 1, 28, MEAN, STD, tuple(names), tuple(wnids))


def _imagenet() -> DatasetSpec:
    from advinterp.data.imagenet_classes import imagenet_class_names, imagenet_wnids

    return DatasetSpec(
        "imagenet",
        3,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        tuple(imagenet_class_names()),
        tuple(imagenet_wnids()),
        resizable=True,
    )


def _imagefolder_spec(root: Path) -> DatasetSpec:
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    wnids = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not wnids:
        raise UserError(f"{root} holds no class folders (expected {root}/<wnid>/<image>.JPEG)")
    return DatasetSpec(
        f"imagefolder:{root}",
        3,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        wnids,
        wnids,
        resizable=True,
        indexed_by_model=True,
    )


register_dataset("fashion-mnist", _fashion_mnist)
register_dataset("imagenet", _imagenet)
