"""LC, CS1 and CS2 of every unit (read after batch norm and ReLU), and the paper's Fig. 10.

One pass over the real images and their adversarial counterparts
(:func:`~advinterp.analysis.paired.paired_pass`) records every unit (``layers``, default ``"units"``) at
once and keeps, per unit, only its top 1% responses
(:class:`advinterp.stats.TopK`). From the classes of those images
(:func:`advinterp.metrics.semantics.unit_semantics`): ``p`` (true classes of the
top real images), ``q`` (true classes of the top adversarial images), ``q̃``
(their target classes), and LC = pᵀCp, CS1, CS2 (eq. 11–13).

A model that resists the attack keeps CS1 high for the wrong reason (its
"adversarial" images still are what they were), so every result carries the
attack's success rate and mean L2, and CS1/CS2 are computed twice: over all
adversarial images, and over the successful ones only (their own top 1%).

For an untargeted adversarial set ``q̃`` uses the model's prediction on each
adversarial image in place of a target.

Processes and resuming: ``torchrun --nproc-per-node N -m advinterp semantics …``
runs the pass on N processes (gloo on CPUs, NCCL with one GPU each); each
records its share of the batches, the top-k stores are merged (bit for bit
those of one process, so the tables are too) and process 0 writes the outputs.
With ``partial`` (the CLI's ``OUT/semantics.<i>.partial`` for its ``i``-th
model) the stores are checkpointed every chunk of images, and the same command
run again after a kill resumes from the last finished chunk. The pass can also
feed the galleries (:func:`~advinterp.analysis.onepass.semantics_and_galleries`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advinterp.analysis.paired import PairedSets, Store, paired_pass
from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.io import atomic_replace, write_json
from advinterp.metrics.semantics import fig10_bins, unit_semantics
from advinterp.record import resolve_layers
from advinterp.stats import TopK, k_for_fraction

__all__ = [
    "CSV_COLUMNS",
    "ModelSemantics",
    "check_similarity",
    "semantics_stores",
    "model_semantics",
    "semantics_from_tops",
    "units_csv",
    "plot_fig10",
    "write_semantics",
]

CSV_COLUMNS = (
    "model",
    "layer",
    "unit",
    "lc",
    "cs1",
    "cs2",
    "cs1_successful",
    "cs2_successful",
    "real_class",
    "real_share",
)


@dataclass
class ModelSemantics:
    """Per-unit LC, CS1, CS2 of one model, layer by layer, with the attack's strength.

    ``units[layer]`` maps ``lc``, ``cs1``, ``cs2``, ``cs1_successful``,
    ``cs2_successful`` (each a float64 tensor, one value per unit), ``real_class``
    (the most frequent class of the unit's top real images) and ``real_share`` (its
    share). CS is NaN where a unit's top set is empty (no successful image).
    """

    name: str
    classes: list[str]
    attack: dict
    counts: dict
    units: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def values(self, key: str) -> torch.Tensor:
        """``key`` over every unit of every layer, concatenated in layer order."""
        return torch.cat([u[key] for u in self.units.values()])

    def fig10(self, bins: int | Sequence[float] = 10, successful: bool = False) -> list[dict]:
        """Fig. 10's bins over all recorded layers: mean CS1/CS2 per LC bin."""
        suffix = "_successful" if successful else ""
        return fig10_bins(
            self.values("lc"), self.values("cs1" + suffix), self.values("cs2" + suffix), bins
        )

    def summary(self, bins: int | Sequence[float] = 10) -> dict:
        """JSON-ready: attack, counts, means and both Fig. 10 curves."""

        def mean(key: str) -> float | None:
            v = self.values(key)
            v = v[~v.isnan()]
            return float(v.mean()) if v.numel() else None

        keys = ("lc", "cs1", "cs2", "cs1_successful", "cs2_successful")
        return {
            "attack": self.attack,
            **self.counts,
            "layers": list(self.units),
            "units": int(self.values("lc").numel()),
            "mean": {key: mean(key) for key in keys},
            "fig10": self.fig10(bins),
            "fig10_successful": self.fig10(bins, successful=True),
        }


def check_similarity(model, C: torch.Tensor) -> torch.Tensor:
    """``C`` as float64, checked against the model's classes before any pass."""
    C = torch.as_tensor(C, dtype=torch.float64)
    if tuple(C.shape) != (model.num_classes, model.num_classes):
        raise UserError(
            f"the class similarity matrix is {tuple(C.shape)} but the model has "
            f"{model.num_classes} classes: build it from the model's class list"
        )
    return C


def _ks(pairs: PairedSets, fraction: float) -> tuple[int, int]:
    """``(k of the real and of all adversarial images, k of the successful ones)``."""
    n_success = int(pairs.success.sum())
    return k_for_fraction(len(pairs), fraction), k_for_fraction(max(n_success, 1), fraction)


def semantics_stores(pairs: PairedSets, fraction: float = 0.01) -> dict[str, Store]:
    """The top-k stores the semantics read: each unit's top ``fraction`` of the real images,
    of the adversarial images, and of the successful adversarial images."""
    k, k_success = _ks(pairs, fraction)
    return {
        "real": Store("real", k),
        "adversarial": Store("adversarial", k),
        "successful": Store("adversarial", k_success, pairs.success),
    }


def model_semantics(
    model,
    pairs: PairedSets,
    C: torch.Tensor,
    layers: str | Sequence[str] = "units",
    fraction: float = 0.01,
    reduce: str = "max",
    batch_size: int = 128,
    name: str | None = None,
    progress: bool = False,
    *,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
) -> ModelSemantics:
    """LC, CS1, CS2 per unit of ``layers`` (default every unit, read after batch norm and ReLU) of ``model``.

    Args:
        pairs: real images and their adversarial counterparts
            (:func:`~advinterp.analysis.open_paired_sets`).
        C: ``K×K`` class similarity (eq. 10, :func:`~advinterp.metrics.wordnet.similarity_matrix`).
        fraction: a unit's top images are this share of each set (the paper's 1%).
        reduce: a unit's response to an image, ``"max"`` (default) or ``"mean"`` over space.
        world: the processes (:func:`advinterp.distributed.joined`): each records its
            share of the images; every process returns the same result.
        partial, chunk: checkpoint file and images per checkpoint
            (:func:`~advinterp.analysis.paired.paired_pass`); the file stays until the
            caller removes it.

    Example::

        C = similarity_matrix(model.wnids)
        result = model_semantics(model, open_paired_sets(model, "runs/resnet-opt"), C)
        result.fig10()      # [{"lc": …, "cs1": …, "cs2": …, "n_units": …}, …]
    """
    C = check_similarity(model, C)
    layers = resolve_layers(model, layers)
    tops = paired_pass(
        model,
        pairs,
        layers,
        semantics_stores(pairs, fraction),
        reduce=reduce,
        batch_size=batch_size,
        world=world,
        partial=partial,
        chunk=chunk,
        progress=progress,
    )
    return semantics_from_tops(model, pairs, C, tops, layers, fraction, reduce, name)


def semantics_from_tops(
    model,
    pairs: PairedSets,
    C: torch.Tensor,
    tops: Mapping[str, Mapping[str, TopK]],
    layers: Sequence[str],
    fraction: float = 0.01,
    reduce: str = "max",
    name: str | None = None,
) -> ModelSemantics:
    """The :class:`ModelSemantics` of ``layers`` from the stores of a pass that holds at
    least :func:`semantics_stores` (deeper stores are cut to their first ``k``, which are
    the same images)."""
    C = check_similarity(model, C)
    n_success = int(pairs.success.sum())
    k, k_success = _ks(pairs, fraction)
    targets = pairs.attack_classes
    result = ModelSemantics(
        name=name or getattr(model, "config", {}).get("name", "model"),
        classes=list(model.classes or [str(c) for c in range(model.num_classes)]),
        attack=pairs.attack_stats(),
        counts={
            "n_real": len(pairs),
            "n_adversarial": len(pairs),
            "n_successful": n_success,
            "k_real": k,
            "k_adversarial": k,
            "k_successful": k_success if n_success else 0,
            "fraction": fraction,
            "reduce": reduce,
        },
    )
    for layer in layers:
        real_idx = tops["real"][layer].result()[1][:, :k]
        adv_idx = tops["adversarial"][layer].result()[1][:, :k]
        ok_idx = tops["successful"][layer].result()[1][:, :k_success]
        every = unit_semantics(real_idx, pairs.labels, adv_idx, pairs.labels, targets, C)
        ok = unit_semantics(real_idx, pairs.labels, ok_idx, pairs.labels, targets, C)
        share, top_class = every["p"].max(1)
        result.units[layer] = {
            "lc": every["lc"].cpu(),
            "cs1": every["cs1"].cpu(),
            "cs2": every["cs2"].cpu(),
            "cs1_successful": ok["cs1"].cpu(),
            "cs2_successful": ok["cs2"].cpu(),
            "real_class": top_class.cpu(),
            "real_share": share.cpu(),
        }
    return result


def units_csv(results: Sequence[ModelSemantics]) -> str:
    """The per-unit table: one row per model, layer and unit (columns :data:`CSV_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(v: torch.Tensor) -> str:
        v = float(v)
        return "" if math.isnan(v) else f"{v:.6f}"

    for r in results:
        for layer, u in r.units.items():
            for i in range(len(u["lc"])):
                writer.writerow(
                    [
                        r.name,
                        layer,
                        i,
                        *(num(u[key][i]) for key in CSV_COLUMNS[3:8]),
                        r.classes[int(u["real_class"][i])],
                        num(u["real_share"][i]),
                    ]
                )
    return buf.getvalue()


def _legend_label(name: str, attack: Mapping) -> str:
    parts = [f"success {100 * attack['success_rate']:.1f}%"]
    if attack.get("mean_l2") is not None:
        parts.append(f"mean L2 {attack['mean_l2']:.2f}")
    method = attack.get("method")
    return f"{name} ({method + ': ' if method else ''}{', '.join(parts)})"


def plot_fig10(
    curves: Mapping[str, Mapping],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Fig. 10 for several models on one plot, written atomically as a PNG.

    ``curves`` maps a model name to its :meth:`ModelSemantics.summary` (or any
    mapping with ``fig10``, ``fig10_successful`` and ``attack`` holding
    ``success_rate`` and ``mean_l2``). Left panel: CS over all adversarial images;
    right: over the successful ones. One colour per model, CS1 solid, CS2 dashed;
    the legend gives each model's attack success rate and mean L2.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    panels = [
        ("fig10", "all adversarial images"),
        ("fig10_successful", "successful adversarial images only"),
    ]
    colors = [f"C{i}" for i in range(10)]
    for ax, (key, subtitle) in zip(axes, panels, strict=True):
        for i, (name, data) in enumerate(curves.items()):
            bins = [b for b in data.get(key) or [] if b.get("lc") is not None]
            color = colors[i % len(colors)]
            label = _legend_label(name, data["attack"])
            for metric, style, marker in (("cs1", "-", "o"), ("cs2", "--", "s")):
                pts = [(b["lc"], b[metric]) for b in bins if b.get(metric) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker=marker,
                    color=color,
                    markersize=4,
                    label=f"{metric.upper()} · {label}",
                )
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel("LC (eq. 11), mean over the units of each bin")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean CS1 (solid), CS2 (dashed)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or "Fig. 10: CS1 and CS2 against LC over all units", fontsize=11)
    rows = math.ceil(len(labels) / 2)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.17 + 0.045 * rows, wspace=0.06)
    path = Path(path)
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def write_semantics(
    results: Sequence[ModelSemantics],
    out: str | Path,
    bins: int | Sequence[float] = 10,
    extra: Mapping[str, Mapping] | None = None,
    settings: Mapping | None = None,
) -> dict:
    """Write ``units.csv`` (per unit), ``semantics.json`` (per model: attack, counts,
    means, both Fig. 10 curves; ``fig10`` at the top level as ``reproduce`` reads it)
    and ``fig10.png`` into ``out``. ``extra`` adds fields per model (e.g. file paths),
    ``settings`` top-level fields (e.g. σ)."""
    out = Path(out)
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise UserError(f"model names must differ, got {', '.join(names)}")
    models = {r.name: {**(extra or {}).get(r.name, {}), **r.summary(bins)} for r in results}
    data = {
        **(settings or {}),
        "bins": bins if isinstance(bins, int) else list(bins),
        "models": models,
        "fig10": {name: m["fig10"] for name, m in models.items()},
    }

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(units_csv(results))

    atomic_replace(out / "units.csv", write_csv)
    plot_fig10(models, out / "fig10.png")
    write_json(out / "semantics.json", data)
    return data
