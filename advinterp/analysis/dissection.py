"""Table 1: Network Dissection of a model on a probe's real images and on their adversarial versions.

:func:`dissect_model` runs :func:`advinterp.metrics.dissect.dissect` on a
Broden-format probe (:class:`advinterp.data.broden.BrodenProbe`), optionally
attacks every probe image (the paper's ``opt``, least-likely target, §4.1) and
dissects the adversarial images the same way: each side gets its own per-unit
thresholds, and the adversarial images keep their real image's concept masks.
:func:`write_dissection` writes what NetDissect writes, and Table 1:

- ``real/tally_<layer>.csv`` and ``adversarial/tally_<layer>.csv``: per unit
  its best concept (``unit, category, label, iou``);
- ``iou.safetensors``: every unit × label IoU, per layer and side;
- ``table1.json``: per category the % of interpretable units (best IoU above
  the threshold), real and adversarial, over all dissected layers' units and
  per layer; ``table1.png``: the same as a bar chart.

Writing into a folder that holds an earlier dissection replaces it: tallies of
layers (or of an adversarial side) not dissected this time are removed, so the
folder always describes one dissection.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from advinterp.attacks.advset import AdversarialSet, build_adversarial_set, default_chunk
from advinterp.data.broden import BrodenProbe, collate_masks, probe_batches
from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.io import atomic_replace, read_json, save_tensors, write_json
from advinterp.metrics.dissect import Dissection, dissect
from advinterp.models import layer_shapes
from advinterp.record import Recorder, resolve_layers
from advinterp.tally import weights_fingerprint

__all__ = [
    "DissectionResult",
    "adversarial_probe_batches",
    "default_dissect_layers",
    "dissect_model",
    "format_table1",
    "map_layers",
    "plot_table1",
    "remove_partials",
    "table1",
    "write_dissection",
]

SIDES = ("real", "adversarial")


def default_dissect_layers(model) -> list[str]:
    """The last two stages of the network that output maps and hold a convolution
    (``layer2, layer3`` of the compact ResNet, ``layer3, layer4`` of ResNet-18). Stages
    grouped in one container are looked for inside it (``blocks.5, blocks.6`` of timm's
    EfficientNets, ``stages.2, stages.3`` of ConvNeXt); a network with fewer such stages
    (AlexNet, VGG: one ``features``) gives its last two ``Conv2d`` layers."""
    shapes = {name: shape for name, _, shape in layer_shapes(model)}

    def stages(parent: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
        return [
            (prefix + name, module)
            for name, module in parent.named_children()
            if len(shapes.get(prefix + name, ())) == 3
            and any(isinstance(m, nn.Conv2d) for m in module.modules())
            and not isinstance(module, nn.Conv2d)
        ]

    found = stages(model.net)
    if len(found) == 1:
        name, module = found[0]
        found = stages(module, name + ".") or found
    if len(found) >= 2:
        return [name for name, _ in found[-2:]]
    convs = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("the model has no convolution to dissect")
    return convs[-2:]


def map_layers(model, layers: Sequence[str]) -> list[str]:
    """``layers`` checked before any work: each must exist (raises the recorder's
    "unknown layer" error) and give ``C×H×W`` maps (a ``Linear`` layer's vector has no
    spatial extent to compare with a mask). ``["stages"]`` is
    :func:`default_dissect_layers`."""
    layers = list(layers)
    if layers == ["stages"]:
        layers = default_dissect_layers(model)
    names = resolve_layers(model, layers)
    found = {name: (kind, shape) for name, kind, shape in layer_shapes(model)}
    modules = dict(getattr(model, "net", model).named_modules())
    # Names with a call number (``relu#1``, a module's first call in a pass) are measured
    # by recording them; the module's last call is what ``layer_shapes`` lists.
    numbered = [n for n in names if "#" in n]
    if numbered:
        with Recorder(model, numbered, reduce=None) as rec, torch.inference_mode():
            was = model.training
            model.eval()(torch.zeros(1, model.in_chans, model.input_size, model.input_size))
            model.train(was)
        for n in numbered:
            out = rec.responses.get(n)
            kind = type(modules[n.rpartition("#")[0]]).__name__
            found[n] = (kind, tuple(out.shape[1:]) if torch.is_tensor(out) else ())
    for name in names:
        kind, shape = found.get(name, ("", ()))
        if len(shape) != 3:
            maps = [n for n, (_, s) in found.items() if len(s) == 3 and s[1] * s[2] > 1]
            raise UserError(
                f"layer {name} ({kind or 'no tensor output'}) gives "
                f"{'×'.join(map(str, shape)) or 'no'} values per image, not C×H×W maps: "
                f"dissect a convolutional layer, e.g. {', '.join(maps[-2:])} "
                "(`advinterp layers MODEL` lists them)"
            )
    return names


def _model_fingerprint(model) -> str:
    """A short hash of the model's weights: tells an adversarial set which model made it."""
    return "weights:" + weights_fingerprint(model)


def _drop_foreign_set(folder: Path, expected: Mapping[str, object], progress: bool) -> None:
    """Remove an adversarial set in ``folder`` made from another model or probe (an earlier
    dissection into the same ``--out``): it is a by-product of that run, and resuming it
    would pair another model's images with this probe."""
    settings = folder / "settings.json"
    if not settings.is_file():
        return
    try:
        saved = read_json(settings)
    except UserError:
        saved = {}
    if any(saved.get(k) != v for k, v in expected.items()):
        if progress:
            print(f"{folder} holds the adversarial set of another model or probe: rebuilding it")
        shutil.rmtree(folder)


class _ProbeImages(torch.utils.data.Dataset):
    """Probe images as ``(image, -1, index)``: what the attack builder iterates (a
    probe has concept masks, not class labels)."""

    def __init__(self, probe: BrodenProbe):
        self.probe = probe
        self.name = probe.name

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        return self.probe.image(i), -1, i


class _AdversarialProbe:
    """Re-iterable ``(adversarial images, masks)`` batches: images streamed from the
    set's shards a batch at a time, each with its real image's masks."""

    def __init__(
        self, adversarial: str | Path | AdversarialSet, probe: BrodenProbe, batch_size: int
    ):
        if not isinstance(adversarial, AdversarialSet):
            adversarial = AdversarialSet(adversarial)
        self.adversarial = adversarial
        self.probe = probe
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Batches in one pass (the progress bar's total)."""
        return -(-len(self.adversarial) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        for images, pos in self.adversarial.batches(self.batch_size):
            yield images, self._masks(pos)

    def numbered(
        self, numbers: Sequence[int]
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Batches ``numbers`` of a pass (as the probe's, :func:`probe_batches`)."""
        n, b = len(self.adversarial), self.batch_size
        for i in numbers:
            start, stop = i * b, min((i + 1) * b, n)
            yield self.adversarial.rows(start, stop), self._masks(torch.arange(start, stop))

    def _masks(self, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = self.adversarial.indices[pos]
        return collate_masks([self.probe.masks(int(i)) for i in idx], self.probe.mask_size)


def adversarial_probe_batches(
    adversarial: str | Path | AdversarialSet, probe: BrodenProbe, batch_size: int = 100
) -> _AdversarialProbe:
    """Re-iterable ``(adversarial images, masks)`` batches of a set made from ``probe``'s
    images (its ``indices`` are probe rows), each image with its real image's masks: what
    :func:`~advinterp.metrics.dissect.dissect` reads for the adversarial side."""
    return _AdversarialProbe(adversarial, probe, batch_size)


@dataclass
class DissectionResult:
    """Dissections of some layers on real (and adversarial) probe images."""

    real: dict[str, Dissection]
    adversarial: dict[str, Dissection] = field(default_factory=dict)
    attack: dict | None = None
    probe: str = ""
    iou_threshold: float = 0.04
    quantile: float = 0.995

    @property
    def layers(self) -> list[str]:
        return list(self.real)

    def sides(self) -> dict[str, dict[str, Dissection]]:
        return {
            "real": self.real,
            **({"adversarial": self.adversarial} if self.adversarial else {}),
        }


def dissect_model(
    model,
    probe: BrodenProbe,
    layers: Sequence[str] | None = None,
    adversarial: str | Path | None = None,
    quantile: float = 0.995,
    iou_threshold: float = 0.04,
    batch_size: int = 100,
    attack_batch_size: int = 250,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    attack_options: Mapping[str, object] | None = None,
    per_image: bool = False,
    world: World | None = None,
    partials: str | Path | None = None,
    chunk: int | None = None,
) -> DissectionResult:
    """Dissect ``layers`` (default :func:`default_dissect_layers`) of ``model`` on ``probe``.

    With ``adversarial`` (a folder), every probe image is attacked first (``opt``,
    least-likely target, seeded; the set is written there and a killed run
    resumes it) and the adversarial images are dissected too. ``attack_options``
    (``lam``, ``steps``, ``keep``) go to the attack; a set made with other ones is rebuilt.
    ``per_image`` keeps the IoU counts per probe image (for a bootstrap of Table 1).

    Under ``torchrun`` (``world``, :func:`advinterp.distributed.joined`) each process
    attacks its share of the probe's chunks and reads its share of every pass; the
    statistics are merged (:func:`~advinterp.metrics.dissect.dissect`), so every process
    returns the result of one. With ``partials`` (a folder) each side's pass is
    checkpointed every ``chunk`` images into ``real.partial`` / ``adversarial.partial``
    there and a killed run resumes from them; the caller removes them once the results
    are written.
    """
    world = world or World()
    layers = map_layers(model, layers if layers else default_dissect_layers(model))
    spec = _model_fingerprint(model)  # once: the passes' checkpoints and the attack's set
    identity = {"probe": str(probe.root), "images": len(probe), "size": probe.input_size}
    identity["model"] = spec

    def common(side: str, extra: Mapping | None = None) -> dict:
        return dict(
            categories=probe.categories,
            labels=probe.labels,
            quantile=quantile,
            iou_threshold=iou_threshold,
            progress=progress,
            per_image=per_image,
            world=world,
            partial=None if partials is None else Path(partials) / f"{side}.partial",
            chunk=chunk,
            fingerprint={**identity, **dict(extra or {})},
            desc=f"dissect {side}",
        )

    real = dissect(model, layers, probe_batches(probe, batch_size, workers), **common("real"))
    result = DissectionResult(
        real=real,
        probe=str(probe.root),
        iou_threshold=iou_threshold,
        quantile=quantile,
    )
    if adversarial is not None:
        adversarial = Path(adversarial)
        images = _ProbeImages(probe)
        attack_chunk = default_chunk((model.in_chans, probe.input_size, probe.input_size))
        options = dict(attack_options or {})
        expected = {"model": spec, "dataset": images.name, "n": len(images), "seed": seed}
        expected |= options
        if world.is_main:
            _drop_foreign_set(adversarial, expected | {"chunk": attack_chunk}, progress)
        world.barrier()
        meta = build_adversarial_set(
            model,
            images,
            adversarial,
            method="opt",
            targeted=True,
            target="least-likely",
            seed=seed,
            batch_size=attack_batch_size,
            chunk=attack_chunk,
            resume=True,
            model_spec=spec,
            progress=progress,
            workers=workers,
            **options,
        )
        stats = meta.get("stats", {})
        result.attack = {
            "method": "opt",
            "target": "least-likely",
            "folder": str(adversarial),
            "n": meta.get("n"),
            "success_rate": stats.get("success_rate"),
            "mean_l2": stats.get("mean_l2"),
            "mean_linf": stats.get("mean_linf"),
        }
        result.adversarial = dissect(
            model,
            layers,
            _AdversarialProbe(adversarial, probe, batch_size),
            **common("adversarial", {"attack": expected | {"chunk": attack_chunk}}),
        )
    return result


def remove_partials(folder: str | Path) -> None:
    """Remove the passes' checkpoints :func:`dissect_model` kept in ``folder`` (``partials``):
    once the results are written they are not needed."""
    for side in SIDES:
        for path in Path(folder).glob(f"{side}*.partial"):
            path.unlink(missing_ok=True)


def table1(result: DissectionResult) -> dict:
    """Per category the % of interpretable units, real and adversarial: pooled over
    all dissected layers' units (``real``/``adversarial``) and per layer (``layers``)."""

    def pooled(dissections: Mapping[str, Dissection]) -> dict[str, float]:
        units = sum(d.iou.shape[0] for d in dissections.values())
        first = next(iter(dissections.values()))
        return {
            cat: sum(d.interpretable()[cat] * d.iou.shape[0] for d in dissections.values()) / units
            for cat in first.categories
        }

    out = {side: pooled(d) for side, d in result.sides().items()}
    out["layers"] = {
        layer: {side: d[layer].interpretable() for side, d in result.sides().items()}
        for layer in result.layers
    }
    out["units"] = {layer: int(d.iou.shape[0]) for layer, d in result.real.items()}
    out["iou_threshold"] = result.iou_threshold
    out["quantile"] = result.quantile
    out["probe"] = result.probe
    if result.attack is not None:
        out["attack"] = result.attack
    return out


def format_table1(tables: Mapping[str, dict]) -> str:
    """A plain-text Table 1: one row per model, the categories for real then adversarial."""
    first = next(iter(tables.values()))
    cats = list(first["real"])
    sides = [s for s in SIDES if s in first]
    width = max(16, *(len(name) + 1 for name in tables))
    head = f"{'model':<{width}}" + "".join(
        f"{(s[:4] + ' ' + c[:3]):>10}" for s in sides for c in cats
    )
    lines = ["% of units interpretable (best IoU > threshold), per category", head]
    for name, t in tables.items():
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{t.get(s, {}).get(c, float('nan')):>10.1f}" for s in sides for c in cats)
        )
    return "\n".join(lines)


def plot_table1(table: dict, path: str | Path, title: str = "") -> None:
    """Bar chart: per category, % of interpretable units on real and adversarial images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(table["real"])
    sides = [s for s in SIDES if s in table]
    fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(cats), 3.2))
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(cats))]
        bars = ax.bar(xs, [table[side][c] for c in cats], width, label=side)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("% interpretable units")
    ax.set_title(title or f"Network Dissection (IoU > {table.get('iou_threshold', 0.04)})")
    ax.legend(frameon=False)
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def tally_csv(dissection: Dissection) -> str:
    """NetDissect's tally: per unit its best concept (``unit, category, label, iou``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["unit", "category", "label", "iou"])
    for row in dissection.best():
        writer.writerow(
            [row.unit, row.category, row.label if row.category else "", f"{row.iou:.6f}"]
        )
    return buf.getvalue()


def _file_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)


def write_dissection(result: DissectionResult, out: str | Path, name: str = "") -> dict:
    """Write the tallies, ``iou.safetensors``, ``table1.json`` and ``table1.png`` into
    ``out`` (see the module doc); returns Table 1's dict.

    Each file is replaced atomically; tallies of an earlier dissection in ``out`` whose
    layer or side this one lacks are removed once the new ones are written, so no
    stale tally sits beside the new Table 1.
    """
    out = Path(out)
    tensors = {}
    written = set()
    for side, dissections in result.sides().items():
        for layer, d in dissections.items():
            text = tally_csv(d)

            def write(tmp, text=text):
                with open(tmp, "w", newline="") as f:
                    f.write(text)

            path = out / side / f"tally_{_file_name(layer)}.csv"
            atomic_replace(path, write)
            written.add(path)
            tensors[f"{side}/{layer}/iou"] = d.iou.float()
            tensors[f"{side}/{layer}/thresholds"] = d.thresholds.float()
    save_tensors(out / "iou.safetensors", tensors)
    for side in SIDES:
        for stale in (out / side).glob("tally_*.csv"):
            if stale not in written:
                stale.unlink(missing_ok=True)
        if (out / side).is_dir() and not any((out / side).iterdir()):
            (out / side).rmdir()
    table = table1(result)
    first = next(iter(result.real.values()))
    table["labels"] = first.labels
    table["label_category"] = [
        first.categories[int(k)] if k >= 0 else "" for k in first.label_category
    ]
    if name:
        table["model"] = name
    plot_table1(table, out / "table1.png", title=f"{name} — Network Dissection" if name else "")
    write_json(out / "table1.json", table)
    return table
