"""Unit galleries, the paper's Fig. 2 (and 4–9): what real and adversarial images excite a unit.

For each chosen unit (channel) of a layer: the ``k`` = 8 real images with the
strongest responses and the 8 strongest adversarial images, each with its
salient region (a discrepancy map, or the cheaper upsampled activation map),
labelled with its true class, the model's prediction and the response. As in
the paper, an adversarial image is boxed when the attack fooled the model on it
(:func:`~advinterp.attacks.base.attack_succeeded`) and the model classifies it
into a class close in WordNet to the real images' dominant class (distance ≤ 2
by default, which includes that class itself): the unit fires for what the
model *predicts*, not for what the image shows. An image the attack failed on
is still predicted as its own class and is never boxed.

Units are given, or the ``count`` with the highest LC (eq. 11, over the top 1%
of real images: the most class-specific units), or ``count`` drawn at random
with a seed. One pass over the real and adversarial images
(:func:`~advinterp.analysis.paired.paired_pass`) records the layer; nothing but
the top-k stores is kept. The same pass can feed the semantics too
(:func:`~advinterp.analysis.onepass.semantics_and_galleries`).

Under ``torchrun --nproc-per-node N -m advinterp topk …`` each process records
its share of the batches (the stores are merged, equal to one process's), the
saliency maps are split between the processes, and process 0 writes the
galleries; with ``partial`` (the CLI's ``OUT/topk.partial``) a killed pass
resumes from its last finished chunk of images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advinterp.analysis.paired import PairedSets, Store, paired_pass
from advinterp.analysis.saliency import SALIENCY, layer_maps, saliency_maps
from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.io import atomic_replace, save_tensors, write_json
from advinterp.metrics.semantics import class_distribution, lc
from advinterp.record import resolve_layers
from advinterp.stats import TopK, k_for_fraction

__all__ = [
    "SELECTIONS",
    "UnitGallery",
    "Galleries",
    "select_units",
    "dominant_class",
    "check_gallery",
    "gallery_stores",
    "unit_galleries",
    "galleries_from_tops",
    "plot_unit_gallery",
    "write_galleries",
]

SELECTIONS = ("lc", "random")


@dataclass
class UnitGallery:
    """One unit's gallery: ``real`` and ``adversarial`` are lists of per-image dicts
    (position, dataset_index, label, pred, response; adversarial ones also target,
    success, distance, boxed), best first; the tensors hold the images and their
    saliency maps in the same order."""

    unit: int
    lc: float | None
    real_class: int
    real_class_count: int
    real: list[dict]
    adversarial: list[dict]
    real_images: torch.Tensor
    adversarial_images: torch.Tensor
    real_maps: torch.Tensor
    adversarial_maps: torch.Tensor


@dataclass
class Galleries:
    """Every unit's gallery for one layer, with the settings and the attack's strength."""

    layer: str
    classes: list[str]
    attack: dict
    settings: dict
    units: list[UnitGallery] = field(default_factory=list)

    def to_json(self) -> dict:
        def named(rows: list[dict]) -> list[dict]:
            out = []
            for r in rows:
                r = dict(r)
                for key in ("label", "pred", "target"):
                    if key in r:
                        r[f"{key}_name"] = self.classes[r[key]] if r[key] >= 0 else None
                out.append(r)
            return out

        return {
            "layer": self.layer,
            **self.settings,
            "attack": self.attack,
            "classes": self.classes,
            "units": [
                {
                    "unit": g.unit,
                    "lc": g.lc,
                    "real_class": g.real_class,
                    "real_class_name": self.classes[g.real_class],
                    "real_class_count": g.real_class_count,
                    "boxed": sum(r["boxed"] for r in g.adversarial),
                    "real": named(g.real),
                    "adversarial": named(g.adversarial),
                }
                for g in self.units
            ],
        }


def select_units(
    num_units: int,
    units: Sequence[int] | None = None,
    select: str = "lc",
    count: int = 8,
    seed: int = 0,
    lc_values: torch.Tensor | None = None,
) -> list[int]:
    """The units to show: ``units`` as given (checked, duplicates dropped), else ``count``
    units with the highest LC (``select="lc"``, ties by index) or drawn at random
    with ``seed`` (``select="random"``, listed in ascending order)."""
    if units is not None:
        units = list(dict.fromkeys(int(u) for u in units))
        bad = [u for u in units if not 0 <= u < num_units]
        if bad or not units:
            raise UserError(
                f"unit {bad[0] if bad else '(none)'} is not in 0..{num_units - 1} of this layer; "
                "pick units in range"
            )
        return units
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    count = min(count, num_units)
    if select == "random":
        gen = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(num_units, generator=gen)[:count].tolist())
    if select == "lc":
        if lc_values is None:
            raise UserError(
                "choosing units by LC needs the classes' WordNet synsets, and the model has none: "
                "pass --synsets FILE, --select random or --units"
            )
        order = sorted(range(num_units), key=lambda u: (-float(lc_values[u]), u))
        return order[:count]
    raise UserError(f"unknown unit selection {select!r}: use one of {', '.join(SELECTIONS)}")


def dominant_class(labels: Sequence[int]) -> tuple[int, int]:
    """The most frequent class among ``labels`` (ranked best first) and its count; a tie
    goes to the class of the better-ranked image."""
    labels = [int(v) for v in labels]
    counts = {c: labels.count(c) for c in labels}
    best = max(counts.values())
    top = next(c for c in labels if counts[c] == best)
    return top, best


def check_gallery(
    model,
    pairs: PairedSets,
    layer: str,
    units: Sequence[int] | None = None,
    k: int = 8,
    saliency: str = "discrepancy",
    distances: torch.Tensor | None = None,
) -> tuple[str, torch.Tensor | None]:
    """Check a gallery request before any pass: ``(layer name, class distances)``, the
    distances from the model's wnids when not given (None without wnids)."""
    from advinterp.metrics.wordnet import class_distance_matrix

    if saliency not in SALIENCY:
        raise UserError(f"unknown saliency {saliency!r}: use one of {', '.join(SALIENCY)}")
    if k < 1:
        raise UserError(f"need at least one image per gallery row, got k={k}")
    (layer,) = resolve_layers(model, layer)
    num_classes = model.num_classes
    if distances is None and getattr(model, "wnids", None):
        distances = class_distance_matrix(model.wnids)
    if distances is not None and tuple(distances.shape) != (num_classes, num_classes):
        raise UserError(
            f"class distances are {tuple(distances.shape)} but the model has {num_classes} classes"
        )
    if units is not None:
        select_units(layer_maps(model, layer, pairs.adversarial_images([0])).shape[1], units)
    return layer, distances


def gallery_stores(pairs: PairedSets, k: int = 8, fraction: float = 0.01) -> dict[str, Store]:
    """The top-k stores galleries read: the top ``k`` real and adversarial images of each
    unit, and (the same real store, deeper) the top ``fraction`` real images for LC."""
    return {
        "real": Store("real", max(k, k_for_fraction(len(pairs), fraction))),
        "adversarial": Store("adversarial", k),
    }


def unit_galleries(
    model,
    pairs: PairedSets,
    layer: str,
    units: Sequence[int] | None = None,
    select: str = "lc",
    count: int = 8,
    seed: int = 0,
    k: int = 8,
    saliency: str = "discrepancy",
    distances: torch.Tensor | None = None,
    sigma: float = 1.0,
    box_distance: float = 2.0,
    fraction: float = 0.01,
    reduce: str = "max",
    batch_size: int = 128,
    progress: bool = False,
    *,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
    **saliency_options,
) -> Galleries:
    """Galleries of units of ``layer``: top-``k`` real and adversarial images with saliency maps.

    Args:
        pairs: real and adversarial images (:func:`~advinterp.analysis.open_paired_sets`).
        units, select, count, seed: which units (see :func:`select_units`).
        saliency: ``"discrepancy"`` (Zhou et al. 2015, default) or ``"activation"``;
            ``saliency_options`` go to :func:`~advinterp.analysis.saliency.discrepancy_maps`
            (``patch``, ``stride``, ``fill``).
        distances: ``K×K`` WordNet class distances (default: from the model's wnids;
            without them, no LC and no boxes).
        box_distance: box adversarial images the attack fooled the model on and that it
            predicts within this distance of the real images' dominant class.
        fraction: share of the real images whose classes define LC (the paper's 1%).
        world, partial, chunk: processes, checkpoint file and images per checkpoint of
            the pass (:func:`~advinterp.analysis.paired.paired_pass`); the saliency maps
            are split between the processes too, and every process returns the galleries.

    Example::

        g = unit_galleries(model, open_paired_sets(model, "runs/resnet-opt"), "layer3.0.conv2",
                           select="lc", count=4)
        write_galleries(g, "runs/galleries")
    """
    layer, distances = check_gallery(model, pairs, layer, units, k, saliency, distances)
    tops = paired_pass(
        model,
        pairs,
        [layer],
        gallery_stores(pairs, k, fraction),
        reduce=reduce,
        batch_size=batch_size,
        world=world,
        partial=partial,
        chunk=chunk,
        progress=progress,
    )
    return galleries_from_tops(
        model,
        pairs,
        layer,
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


def galleries_from_tops(
    model,
    pairs: PairedSets,
    layer: str,
    tops: Mapping[str, Mapping[str, TopK]],
    *,
    units: Sequence[int] | None = None,
    select: str = "lc",
    count: int = 8,
    seed: int = 0,
    k: int = 8,
    saliency: str = "discrepancy",
    distances: torch.Tensor | None = None,
    sigma: float = 1.0,
    box_distance: float = 2.0,
    fraction: float = 0.01,
    reduce: str = "max",
    progress: bool = False,
    world: World | None = None,
    **saliency_options,
) -> Galleries:
    """The galleries of :func:`unit_galleries` from the stores of a pass that holds at least
    :func:`gallery_stores` (``tops["real"][layer]``, ``tops["adversarial"][layer]``; deeper
    stores are cut to their first ``k``, which are the same images)."""
    from advinterp.metrics.wordnet import similarity_from_distances

    world = world or World()
    num_classes = model.num_classes
    classes = list(model.classes or [str(c) for c in range(num_classes)])
    real_values, real_pos = tops["real"][layer].result()
    adv_values, adv_pos = tops["adversarial"][layer].result()
    num_units = real_values.shape[0]
    lc_values = None
    if distances is not None:
        lc_pos = real_pos[:, : k_for_fraction(len(pairs), fraction)]
        p = class_distribution(_gather(pairs.labels, lc_pos), num_classes)
        lc_values = lc(p, similarity_from_distances(distances, sigma))
    real_values, real_pos = real_values[:, :k], real_pos[:, :k]
    adv_values, adv_pos = adv_values[:, :k], adv_pos[:, :k]
    chosen = select_units(num_units, units, select, count, seed, lc_values)

    success = pairs.success
    galleries = Galleries(
        layer=layer,
        classes=classes,
        attack=pairs.attack_stats(),
        settings={
            "k": k,
            "saliency": saliency,
            "selection": {
                "mode": "units" if units is not None else select,
                "count": len(chosen),
                "seed": seed if units is None and select == "random" else None,
            },
            "reduce": reduce,
            "lc_fraction": fraction,
            "sigma": sigma,
            "box_distance": box_distance if distances is not None else None,
            **{f"saliency_{key}": value for key, value in saliency_options.items()},
        },
    )
    pending = []
    for u in chosen:
        r_keep = real_pos[u] >= 0
        a_keep = adv_pos[u] >= 0
        r_pos, r_val = real_pos[u][r_keep].cpu(), real_values[u][r_keep].cpu()
        a_pos, a_val = adv_pos[u][a_keep].cpu(), adv_values[u][a_keep].cpu()
        real_images = pairs.real_images(r_pos.tolist())
        adv_images = pairs.adversarial_images(a_pos)
        model.eval()
        with torch.inference_mode():
            real_preds = model(real_images).argmax(1).cpu()
        top_class, top_count = dominant_class(pairs.labels[r_pos].tolist())
        real_rows = [
            {
                "position": int(p),
                "dataset_index": int(pairs.indices[p]),
                "label": int(pairs.labels[p]),
                "pred": int(pred),
                "response": float(v),
            }
            for p, pred, v in zip(r_pos, real_preds, r_val, strict=True)
        ]
        adv_rows = []
        for p, v in zip(a_pos, a_val, strict=True):
            pred = int(pairs.preds[p])
            dist = float(distances[pred, top_class]) if distances is not None else None
            adv_rows.append(
                {
                    "position": int(p),
                    "dataset_index": int(pairs.indices[p]),
                    "label": int(pairs.labels[p]),
                    "pred": pred,
                    "target": int(pairs.targets[p]),
                    "success": bool(success[p]),
                    "response": float(v),
                    "distance": dist,
                    # Misclassified by the attack into a class near the real images' one.
                    "boxed": bool(success[p]) and dist is not None and dist <= box_distance,
                }
            )
        gallery = UnitGallery(
            unit=u,
            lc=None if lc_values is None else float(lc_values[u]),
            real_class=top_class,
            real_class_count=top_count,
            real=real_rows,
            adversarial=adv_rows,
            real_images=real_images,
            adversarial_images=adv_images,
            real_maps=torch.empty(0),
            adversarial_maps=torch.empty(0),
        )
        galleries.units.append(gallery)
        pending.append(gallery)
    # All saliency maps of all units in batched calls, the images split between the processes.
    images = torch.cat([t for g in pending for t in (g.real_images, g.adversarial_images)])
    unit_ids = torch.cat(
        [
            torch.full((len(t),), g.unit, dtype=torch.int64)
            for g in pending
            for t in (g.real_images, g.adversarial_images)
        ]
    )
    options = dict(saliency_options)
    if saliency == "discrepancy":
        options.setdefault("progress", progress and world.is_main)
    shard = world.shard(len(images))
    mine = shard.take(images)
    if len(mine):
        mine = saliency_maps(saliency, model, layer, mine, shard.take(unit_ids), **options).cpu()
    else:
        mine = images.new_empty(0, *images.shape[2:])
    maps = torch.cat(world.all_gather(mine))
    start = 0
    for g in pending:
        g.real_maps = maps[start : start + len(g.real_images)]
        start += len(g.real_images)
        g.adversarial_maps = maps[start : start + len(g.adversarial_images)]
        start += len(g.adversarial_images)
    return galleries


def _gather(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    picked = labels.to(positions.device)[positions.clamp(min=0)]
    return torch.where(positions >= 0, picked, torch.full_like(picked, -1))


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _show(ax, image: torch.Tensor, heat: torch.Tensor) -> None:
    import matplotlib

    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    heat = heat.detach().float().cpu().clamp(min=0)
    if float(heat.max()) > 0:
        heat = heat / heat.max()
        rgba = matplotlib.colormaps["jet"](heat.numpy())
        rgba[..., 3] = 0.6 * heat.numpy()
        ax.imshow(rgba, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_unit_gallery(
    gallery: UnitGallery,
    classes: Sequence[str],
    path: str | Path,
    layer: str,
    attack: dict | None = None,
    saliency: str = "discrepancy",
    box_distance: float | None = 2.0,
) -> Path:
    """Draw one unit's gallery to a PNG (written atomically): real images on the upper
    row, adversarial on the lower, salient regions as a heat overlay, boxed adversarial
    images framed in red; under each image its true class, prediction and response."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cols = max(len(gallery.real), len(gallery.adversarial), 1)
    fig = Figure(figsize=(1.35 * cols + 0.6, 5.0))
    axes = fig.subplots(2, cols, squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.83, bottom=0.10, hspace=0.75, wspace=0.12)
    rows = [
        ("real", gallery.real, gallery.real_images, gallery.real_maps),
        ("adversarial", gallery.adversarial, gallery.adversarial_images, gallery.adversarial_maps),
    ]
    for r, (label, entries, images, maps) in enumerate(rows):
        axes[r, 0].text(
            -0.12,
            0.5,
            label,
            rotation=90,
            ha="right",
            va="center",
            transform=axes[r, 0].transAxes,
            fontsize=9,
            fontweight="bold",
        )
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(entries):
                ax.axis("off")
                continue
            e = entries[c]
            _show(ax, images[c], maps[c])
            lines = [
                (f"true {_short(classes[e['label']])}", "black"),
                (
                    f"pred {_short(classes[e['pred']])}",
                    "black" if e["pred"] == e["label"] else "firebrick",
                ),
                (f"r = {e['response']:.2f}", "black"),
            ]
            for i, (text, color) in enumerate(lines):
                ax.text(
                    0.5,
                    -0.05 - 0.15 * i,
                    text,
                    ha="center",
                    va="top",
                    transform=ax.transAxes,
                    fontsize=7,
                    color=color,
                )
            if e.get("boxed"):
                ax.add_patch(
                    Rectangle(
                        (0, 0),
                        1,
                        1,
                        transform=ax.transAxes,
                        fill=False,
                        edgecolor="red",
                        linewidth=3,
                        clip_on=False,
                    )
                )
    name = classes[gallery.real_class]
    lc_text = "" if gallery.lc is None else f", LC {gallery.lc:.2f}"
    title = [
        f"{layer} · unit {gallery.unit}: top-{cols} real (upper) and adversarial (lower) images",
        f"real images mostly {name} ({gallery.real_class_count}/{len(gallery.real)}){lc_text}"
        f" · heat: {saliency} map",
    ]
    if attack:
        l2 = attack.get("mean_l2")
        title.append(
            f"attack {attack.get('method') or '?'}: success {100 * attack['success_rate']:.1f}%"
            + ("" if l2 is None else f", mean L2 {l2:.2f}")
            + (
                f" · red box: fooled, predicted within WordNet distance {box_distance:g} of {name}"
                if box_distance is not None
                else ""
            )
        )
    fig.suptitle("\n".join(title), fontsize=8.5)
    path = Path(path)
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def write_galleries(galleries: Galleries, out: str | Path, extra: dict | None = None) -> dict:
    """Write ``unit_NNNN.png`` per unit, ``gallery.json`` (every number shown, plus the
    settings and attack) and ``saliency.safetensors`` (the maps) into ``out``."""
    out = Path(out)
    data = {**(extra or {}), **galleries.to_json()}
    maps = {}
    for g, entry in zip(galleries.units, data["units"], strict=True):
        png = plot_unit_gallery(
            g,
            galleries.classes,
            out / f"unit_{g.unit:04d}.png",
            galleries.layer,
            galleries.attack,
            galleries.settings["saliency"],
            galleries.settings["box_distance"],
        )
        entry["png"] = png.name
        maps[f"unit_{g.unit:04d}.real"] = g.real_maps
        maps[f"unit_{g.unit:04d}.adversarial"] = g.adversarial_maps
    save_tensors(out / "saliency.safetensors", maps)
    write_json(out / "gallery.json", data)
    return data
