"""Semantics and galleries of one model from one pass over its real and adversarial images.

:func:`~advinterp.analysis.model_semantics` and
:func:`~advinterp.analysis.unit_galleries` each walk the image pairs; both read
nothing but per-unit top-k stores, so one walk can fill the stores of both (as
davidbau/dissect's ``tally`` feeds many statistics from one loop). Where they
ask for the same images a store is shared at the larger ``k``: the galleries'
top 8 are the first 8 of the semantics' top 1% (ties go to the smaller
position, so the cut is exact), and the galleries' LC is the semantics' LC of
that layer. The results equal the two separate calls'.

It runs as they do under ``torchrun --nproc-per-node N`` (pass ``world``) and
resumes from ``partial``; process 0 writes with :func:`write_semantics` and
:func:`write_galleries`, then removes ``partial``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from advinterp.analysis.galleries import (
    Galleries,
    check_gallery,
    galleries_from_tops,
    gallery_stores,
)
from advinterp.analysis.paired import PairedSets, Store, paired_pass
from advinterp.analysis.semantics import (
    ModelSemantics,
    check_similarity,
    semantics_from_tops,
    semantics_stores,
)
from advinterp.distributed import World
from advinterp.record import resolve_layers

__all__ = ["semantics_and_galleries", "shared_stores"]


def shared_stores(*requests: Mapping[str, Store]) -> dict[str, Store]:
    """Several analyses' stores as one set: stores of the same name (the same images, the
    same ``allowed``) become one at the largest ``k``."""
    out: dict[str, Store] = {}
    for stores in requests:
        for name, store in stores.items():
            have = out.get(name)
            if have is None:
                out[name] = store
                continue
            same_mask = (have.allowed is None and store.allowed is None) or (
                have.allowed is not None
                and store.allowed is not None
                and torch.equal(have.allowed, store.allowed)
            )
            if have.images != store.images or not same_mask:
                raise ValueError(f"store {name!r} is asked for over other images")
            out[name] = Store(store.images, max(have.k, store.k), store.allowed)
    return out


def semantics_and_galleries(
    model,
    pairs: PairedSets,
    C: torch.Tensor,
    gallery_layer: str,
    *,
    layers: str | Sequence[str] = "units",
    fraction: float = 0.01,
    reduce: str = "max",
    batch_size: int = 128,
    name: str | None = None,
    units: Sequence[int] | None = None,
    select: str = "lc",
    count: int = 8,
    seed: int = 0,
    k: int = 8,
    saliency: str = "discrepancy",
    distances: torch.Tensor | None = None,
    sigma: float = 1.0,
    box_distance: float = 2.0,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
    progress: bool = False,
    **saliency_options,
) -> tuple[ModelSemantics, Galleries]:
    """:func:`~advinterp.analysis.model_semantics` over ``layers`` and
    :func:`~advinterp.analysis.unit_galleries` of ``gallery_layer``, from one pass.

    The arguments are theirs (``fraction`` and ``reduce`` serve both; ``C`` is the
    similarity of eq. 10 with ``sigma``, ``distances`` the WordNet distances it
    comes from). Every process returns both results.

    Example::

        pairs = open_paired_sets(model, "runs/adv/resnet-opt")
        sem, gal = semantics_and_galleries(
            model, pairs, similarity_matrix(model.wnids), "layer3.2.conv2",
            saliency="discrepancy", partial="runs/semantics/resnet.partial")
        write_semantics([sem], "runs/semantics")
        write_galleries(gal, "runs/galleries/resnet/layer3.2.conv2")
    """
    C = check_similarity(model, C)
    layers = resolve_layers(model, layers)
    gallery_layer, distances = check_gallery(
        model, pairs, gallery_layer, units, k, saliency, distances
    )
    recorded = layers + [gallery_layer] * (gallery_layer not in layers)
    stores = shared_stores(semantics_stores(pairs, fraction), gallery_stores(pairs, k, fraction))
    tops = paired_pass(
        model,
        pairs,
        recorded,
        stores,
        reduce=reduce,
        batch_size=batch_size,
        world=world,
        partial=partial,
        chunk=chunk,
        progress=progress,
    )
    semantics = semantics_from_tops(model, pairs, C, tops, layers, fraction, reduce, name)
    galleries = galleries_from_tops(
        model,
        pairs,
        gallery_layer,
        tops,
        units=units,
        select=select,
        count=count,
        seed=seed,
        k=k,
        saliency=saliency,
        distances=distances,
        sigma=sigma,
        box_distance=box_distance,
        fraction=fraction,
        reduce=reduce,
        progress=progress,
        world=world,
        **saliency_options,
    )
    return semantics, galleries
