"""ImageNet-1k's 1000 classes in index order, from the synset list timm ships (no download)."""

from __future__ import annotations

import functools

__all__ = ["imagenet_class_names", "imagenet_wnids"]


@functools.lru_cache(maxsize=1)
def _imagenet_info() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = tuple(info.label_names())
    names = tuple(info.index_to_description(i) for i in range(len(wnids)))
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise RuntimeError(f"timm's ImageNet-1k synset list has {len(wnids)} entries, not 1000")
    return wnids, names


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (index 281 is ``n02123045``, tabby)."""
    return list(_imagenet_info()[0])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas) in class-index order,
    e.g. ``"tabby, tabby cat"`` at index 281."""
    return list(_imagenet_info()[1])
