"""The whole paper on the embedded data, in one command: ``advinterp reproduce --out RUN``.

Stages, each cached in RUN and skipped when its inputs (settings and the
checkpoints it reads) are unchanged:

1. ``train``: the normal model ``<arch>`` (``RUN/<arch>/``);
2. ``advtrain``: ``<arch>-Adv`` (consistency loss, β = 1) and ``<arch>-AT``
   (β = 0), fine-tuned from it;
3. ``table2``: clean and FGSM top-1/top-5 at ε = 4, 8, 16 (``RUN/table2.json``);
4. ``attack``: per model, the paper's ``opt`` set on test images (``RUN/adv/``);
5. ``semantics``: LC, CS1, CS2 of every conv unit, Fig. 10 with all models
   (``RUN/semantics/``);
6. ``galleries``: Fig. 2-style galleries of one layer per model (``RUN/galleries/``);
7. ``dissect``: Table 1, real vs adversarial probe images (``RUN/dissect/``);
8. ``summary.json`` (``table1``, ``table2``, ``fig10``, the paper's numbers, one
   line per claim saying whether it held) and the HTML report (``RUN/report/``).

A killed run started again with the same command resumes: finished stages are
skipped, training and attacks continue from their last checkpoint or shard.
Before any stage runs, the architectures, the Fashion-MNIST files and the run
folder are checked, so a mistake costs no training time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from advinterp.errors import UserError
from advinterp.io import read_json, write_json

__all__ = ["ReproduceConfig", "PAPER", "findings", "reproduce"]

# The paper's numbers for the architecture we mirror (Dong et al. 2022, Tables 1 and 2;
# ImageNet/Broden). Its Table 2 row for ResNet-18-Adv is not in the text we have.
PAPER = {
    "table1": {
        "ResNet-18": {
            "real": {"color": 0.3, "texture": 14.2, "material": 0.3, "scene": 1.9}
            | {"part": 4.1, "object": 14.1},
            "adversarial": {"color": 0.3, "texture": 8.2, "material": 0.1, "scene": 0.6}
            | {"part": 2.1, "object": 4.8},
        },
        "ResNet-18-Adv": {
            "real": {"color": 0.3, "texture": 14.0, "material": 0.3, "scene": 2.1}
            | {"part": 5.3, "object": 17.2},
            "adversarial": {"color": 0.3, "texture": 10.8, "material": 0.3, "scene": 1.5}
            | {"part": 4.7, "object": 15.3},
        },
    },
    "table2": {
        "ResNet-18": {"clean_top1": 66.38, "clean_top5": 87.13, "fgsm_top1": 4.38}
        | {"fgsm_top5": 31.66},
    },
}


@dataclass
class ReproduceConfig:
    archs: Sequence[str] = ("resnet",)
    quick: bool = False
    seed: int = 0
    # Filled from the profile (default or --quick) unless set.
    train_epochs: int | None = None
    train_limit: int | None = None
    adv_epochs: int | None = None
    adv_limit: int | None = None
    eval_limit: int | None = None
    attack_images: int | None = None
    probe_images: int | None = None
    eps: Sequence[float] = (4, 8, 16)
    dissect_layers: Sequence[str] = ("layer1", "layer2", "layer3")
    gallery_units: int = 8
    saliency: str = "discrepancy"
    data_root: str | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self) -> ReproduceConfig:
        profile = QUICK if self.quick else DEFAULT
        values = asdict(self)
        for key, value in profile.items():
            if values.get(key) is None:
                values[key] = value
        values["archs"] = tuple(self.archs)
        values["eps"] = tuple(self.eps)
        values["dissect_layers"] = tuple(self.dissect_layers)
        return ReproduceConfig(**values)


# Budgets on 2 CPU cores: the default run ≤ 15 minutes, --quick ≤ 3 minutes.
DEFAULT = dict(
    train_epochs=4,
    train_limit=None,
    adv_epochs=2,
    adv_limit=30000,
    eval_limit=None,
    attack_images=4000,
    probe_images=3000,
)
QUICK = dict(
    train_epochs=1,
    train_limit=6000,
    adv_epochs=1,
    adv_limit=3000,
    eval_limit=1000,
    attack_images=300,
    probe_images=300,
)


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_costs(cfg: ReproduceConfig) -> dict[str, float]:
    """Every stage's name with its rough cost in image forward+backward passes: what the
    time-left estimate weighs the stages by (measured on the default run to ±30%)."""
    train_images, adv_images = cfg.train_limit or 60000, cfg.adv_limit or 60000
    eval_images = cfg.eval_limit or 10000
    names = [n for a in cfg.archs for n in (a, f"{a}-Adv", f"{a}-AT")]
    costs: dict[str, float] = {}
    for arch in cfg.archs:
        costs[f"train {arch}"] = 1.5 * cfg.train_epochs * train_images
        for name in (f"{arch}-Adv", f"{arch}-AT"):
            costs[f"advtrain {name}"] = 2.8 * cfg.adv_epochs * adv_images
    costs["table2"] = 0.75 * len(names) * eval_images * (0.4 + len(cfg.eps))
    for name in names:
        costs[f"attack {name}"] = 17.5 * cfg.attack_images  # the opt attack's 20 steps
    costs["semantics"] = len(names) * 2 * cfg.attack_images * 0.4
    for name in names:
        costs[f"galleries {name}"] = 20000.0  # the occlusion maps of 8 units
    for name in names:
        costs[f"dissect {name}"] = 30 * cfg.probe_images  # the attack, two passes, PNGs
    return costs


class _Stages:
    """Runs named stages once: a stage's record (``RUN/stages/<name>.json``) holds the
    key it ran with; the same key and existing outputs skip it. ``costs`` (stage name →
    relative cost) lists the stages to come and weighs the time-left estimate."""

    def __init__(self, run: Path, costs: dict[str, float]):
        self.run = run
        self.costs = costs
        self.total = len(costs)
        self.done = 0
        self.cost_done = 0.0  # of every stage passed, run or skipped
        self.cost_ran = 0.0  # of the stages that ran (skipped ones take no time)
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def __call__(self, name: str, key: dict, outputs: Sequence[Path], fn: Callable[[], object]):
        record = self.run / "stages" / f"{name}.json"
        key = json.loads(json.dumps(key))  # as stored: tuples become lists
        self.done += 1
        cost = self.costs[name]
        self.cost_done += cost
        prefix = f"reproduce [{self.done}/{self.total}] {name}"
        if record.is_file() and all(p.exists() for p in outputs):
            saved = read_json(record)
            if saved.get("key") == key:
                self.timings[name] = saved.get("seconds", 0.0)
                print(f"{prefix}: unchanged, skipped", flush=True)
                return
        print(f"{prefix} …", flush=True)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        write_json(record, {"key": key, "seconds": seconds})
        self.cost_ran += cost
        print(f"{prefix}: {seconds:.0f}s ({self.progress()})", flush=True)

    def progress(self) -> str:
        elapsed = time.perf_counter() - self.t0
        remaining = sum(self.costs.values()) - self.cost_done
        left = elapsed / self.cost_ran * remaining if self.cost_ran else 0.0
        return f"elapsed {elapsed:.0f}s, about {left:.0f}s left"


def _gallery_layer(model) -> str:
    """The last conv layer on the main path (not a shortcut projection)."""
    from advinterp.models import conv_layers

    convs = [n for n in conv_layers(model) if "downsample" not in n and "shortcut" not in n]
    return convs[-1]


def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True) -> dict:
    """Run every stage into ``out`` (see the module doc); returns ``summary.json``'s dict."""
    from advinterp.data.fashion import load_fashion_mnist
    from advinterp.io import out_folder
    from advinterp.models import SMALL_ARCHS

    cfg = cfg.resolved()
    # The same architecture twice would train and analyse the same models twice.
    cfg.archs = tuple(dict.fromkeys(cfg.archs))
    if not cfg.archs:
        raise UserError("no architecture given: name at least one, e.g. resnet")
    for arch in cfg.archs:
        if arch not in SMALL_ARCHS:
            raise UserError(f"unknown architecture {arch!r}: choose from {', '.join(SMALL_ARCHS)}")
    for split in ("train", "test"):  # fail now, not after the first stages
        load_fashion_mnist(split, cfg.data_root)
    run = out_folder(out)
    names = [n for a in cfg.archs for n in (a, f"{a}-Adv", f"{a}-AT")]
    stages = _Stages(run, stage_costs(cfg))
    data = {"data_root": cfg.data_root, "seed": cfg.seed}

    for arch in cfg.archs:
        _train_stage(stages, run, arch, cfg, data)
        for beta, name in ((1.0, f"{arch}-Adv"), (0.0, f"{arch}-AT")):
            _advtrain_stage(stages, run, arch, name, beta, cfg, data)
    fingerprints = {n: _fingerprint(run / n / "model.safetensors") for n in names}

    table2_key = {"models": fingerprints, "eps": cfg.eps, "limit": cfg.eval_limit, **data}
    stages("table2", table2_key, [run / "table2.json"], lambda: _table2(run, names, cfg))

    for name in names:
        key = {"model": fingerprints[name], "n": cfg.attack_images, **data}
        adv = run / "adv" / f"{name}-opt"
        stages(f"attack {name}", key, [adv / "attack.json"], lambda n=name: _attack(run, n, cfg))

    sem_key = {"models": fingerprints, "n": cfg.attack_images, **data}
    stages(
        "semantics",
        sem_key,
        [run / "semantics" / "semantics.json"],
        lambda: _semantics(run, names, cfg, progress),
    )
    for name in names:
        key = {"model": fingerprints[name], "n": cfg.attack_images, "units": cfg.gallery_units}
        key |= {"saliency": cfg.saliency, **data}
        stages(
            f"galleries {name}",
            key,
            [run / "galleries" / name],
            lambda n=name: _galleries(run, n, cfg, progress),
        )
    for name in names:
        key = {"model": fingerprints[name], "n": cfg.probe_images, "layers": cfg.dissect_layers}
        key |= {**data}
        stages(
            f"dissect {name}",
            key,
            [run / "dissect" / name / "table1.json"],
            lambda n=name: _dissect(run, n, cfg, progress),
        )
    summary = _summary(run, names, cfg, stages.timings)
    write_json(run / "summary.json", summary)
    from advinterp.report import write_report

    write_report(run)
    return summary


def _train_stage(stages, run, arch, cfg, data) -> None:
    from advinterp.train import TrainConfig, train

    tc = TrainConfig(
        arch=arch,
        epochs=cfg.train_epochs,
        limit=cfg.train_limit,
        seed=cfg.seed,
        data_root=cfg.data_root,
    )
    folder = run / arch

    def go():
        resume = (folder / "train_state.json").is_file()
        if resume and read_json(folder / "train_state.json").get("train") != asdict(tc):
            shutil.rmtree(folder)  # another recipe: start over
            resume = False
        train(tc, folder, resume=resume, progress=True)

    stages(f"train {arch}", asdict(tc), [folder / "model.safetensors"], go)


def _advtrain_stage(stages, run, arch, name, beta, cfg, data) -> None:
    from advinterp.advtrain import AdvTrainConfig, advtrain

    init = run / arch / "model.safetensors"
    ac = AdvTrainConfig(
        init=str(init),
        epochs=cfg.adv_epochs,
        beta=beta,
        limit=cfg.adv_limit,
        seed=cfg.seed,
        data_root=cfg.data_root,
        eval_limit=min(1000, cfg.eval_limit or 1000),
    )
    folder = run / name
    key = {**asdict(ac), "init": _fingerprint(init)}

    def go():
        resume = (folder / "train_state.json").is_file()
        if resume and read_json(folder / "train_state.json").get("train") != asdict(ac):
            shutil.rmtree(folder)
            resume = False
        advtrain(ac, folder, resume=resume, progress=True)

    stages(f"advtrain {name}", key, [folder / "model.safetensors"], go)


def _load(run: Path, name: str):
    from advinterp.models import load_model

    return load_model(str(run / name / "model.safetensors"))


def _test_set(cfg, limit):
    from advinterp.data import open_dataset

    return open_dataset("fashion-mnist", "test", cfg.data_root, limit=limit)


def _table2(run: Path, names, cfg) -> None:
    from advinterp.metrics.accuracy import format_table2, table2

    data = _test_set(cfg, cfg.eval_limit)
    rows = {}
    for name in names:
        rows[name] = table2(_load(run, name), data, eps=[e / 255 for e in cfg.eps], progress=True)
    print(format_table2(rows))
    write_json(run / "table2.json", rows)


def _attack(run: Path, name: str, cfg) -> None:
    from advinterp.attacks.advset import build_adversarial_set

    folder = run / "adv" / f"{name}-opt"
    settings = folder / "settings.json"
    if settings.is_file() and read_json(settings).get("n") != cfg.attack_images:
        shutil.rmtree(folder)
    build_adversarial_set(
        _load(run, name),
        _test_set(cfg, cfg.attack_images),
        folder,
        method="opt",
        targeted=True,
        target="least-likely",
        seed=cfg.seed,
        resume=True,
        model_spec=str(run / name / "model.safetensors"),
    )


def _pairs(run: Path, name: str, model, cfg):
    from advinterp.analysis import open_paired_sets

    return open_paired_sets(model, run / "adv" / f"{name}-opt", data_root=cfg.data_root)


def _semantics(run: Path, names, cfg, progress: bool) -> None:
    from advinterp.analysis import model_semantics, write_semantics
    from advinterp.metrics.wordnet import similarity_matrix

    results, extra = [], {}
    for name in names:
        model = _load(run, name)
        result = model_semantics(
            model,
            _pairs(run, name, model, cfg),
            similarity_matrix(model.wnids, 1.0),
            name=name,
            progress=progress,
        )
        results.append(result)
        extra[name] = {"model": str(run / name / "model.safetensors")}
    write_semantics(results, run / "semantics", extra=extra, settings={"sigma": 1.0})


def _galleries(run: Path, name: str, cfg, progress: bool) -> None:
    from advinterp.analysis import unit_galleries, write_galleries
    from advinterp.metrics.wordnet import class_distance_matrix

    model = _load(run, name)
    layer = _gallery_layer(model)
    galleries = unit_galleries(
        model,
        _pairs(run, name, model, cfg),
        layer,
        count=cfg.gallery_units,
        saliency=cfg.saliency,
        distances=class_distance_matrix(model.wnids),
        progress=progress,
    )
    folder = run / "galleries" / name
    if folder.exists():
        shutil.rmtree(folder)
    write_galleries(galleries, folder / layer, extra={"model": name})


def _dissect(run: Path, name: str, cfg, progress: bool) -> None:
    from advinterp.analysis.dissection import dissect_model, write_dissection
    from advinterp.data.broden import open_probe

    model = _load(run, name)
    probe = open_probe("fashion-broden", model, size=cfg.probe_images, seed=cfg.seed)
    folder = run / "dissect" / name
    # dissect_model itself rebuilds a set made from another model, probe size or seed.
    result = dissect_model(
        model,
        probe,
        layers=cfg.dissect_layers,
        adversarial=folder / "adversarial-set",
        seed=cfg.seed,
        progress=progress,
    )
    write_dissection(result, folder, name=name)


def _slope(bins: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` against LC over the bins, weighted by their units."""
    points = [(b["lc"], b[key], b["n_units"]) for b in bins if b.get(key) is not None]
    weight = sum(w for _, _, w in points)
    if len(points) < 2 or weight == 0:
        return None
    mx = sum(x * w for x, _, w in points) / weight
    my = sum(y * w for _, y, w in points) / weight
    var = sum(w * (x - mx) ** 2 for x, _, w in points)
    if var == 0:
        return None
    return sum(w * (x - mx) * (y - my) for x, y, w in points) / var


def findings(summary: dict, arch: str) -> list[dict]:
    """One line per claim of the paper: did it hold on this run's data?"""
    normal, adv = arch, f"{arch}-Adv"
    t1, t2, fig10 = summary["table1"], summary["table2"], summary["fig10"]
    out = []

    def total(name: str, side: str) -> float:
        return sum(t1[name][side].values())

    def claim(text: str, held: bool | None, detail: str) -> None:
        out.append({"claim": text, "held": held, "detail": detail})

    real, fooled = total(normal, "real"), total(normal, "adversarial")
    claim(
        f"{normal}: the share of interpretable units drops sharply on adversarial images",
        fooled < 0.8 * real if real > 0 else None,
        f"{real:.1f}% of units on real probe images, {fooled:.1f}% on adversarial ones",
    )
    a_real, a_fooled = total(adv, "real"), total(adv, "adversarial")
    keeps = a_fooled / a_real if a_real > 0 else None
    normal_keeps = fooled / real if real > 0 else None
    claim(
        f"{adv}: the share stays close to the real-image share (closer than {normal}'s)",
        None if keeps is None or normal_keeps is None else keeps >= 0.8 and keeps > normal_keeps,
        f"{a_real:.1f}% real, {a_fooled:.1f}% adversarial"
        + (
            f" (keeps {100 * keeps:.0f}%, {normal} keeps {100 * normal_keeps:.0f}%)"
            if keeps is not None and normal_keeps is not None
            else ""
        ),
    )
    s1, s2 = _slope(fig10[normal], "cs1"), _slope(fig10[normal], "cs2")
    claim(
        f"{normal}: CS1 falls as LC rises (Fig. 10)",
        None if s1 is None else s1 < 0,
        "slope of CS1 against LC " + ("n/a" if s1 is None else f"{s1:+.2f}"),
    )
    claim(
        f"{normal}: CS2 rises with LC (Fig. 10)",
        None if s2 is None else s2 > 0,
        "slope of CS2 against LC " + ("n/a" if s2 is None else f"{s2:+.2f}"),
    )
    a1 = _slope(fig10[adv], "cs1")
    mean = summary.get("mean_cs1", {})
    claim(
        f"{adv}: CS1 stays high (above {normal}'s)",
        None if adv not in mean or normal not in mean else mean[adv] > mean[normal],
        f"mean CS1 {mean.get(adv, float('nan')):.3f} vs {mean.get(normal, float('nan')):.3f}; "
        "slope " + ("n/a" if a1 is None else f"{a1:+.2f}"),
    )
    gain = t2[adv]["fgsm_top1"] - t2[normal]["fgsm_top1"]
    claim(
        f"{adv}: FGSM (ε=4) top-1 well above {normal}'s, at a small clean cost",
        gain > 10,
        f"FGSM top-1 {t2[adv]['fgsm_top1']:.2f}% vs {t2[normal]['fgsm_top1']:.2f}%; clean "
        f"{t2[adv]['clean_top1']:.2f}% vs {t2[normal]['clean_top1']:.2f}%",
    )
    return out


def _summary(run: Path, names, cfg, timings: dict) -> dict:
    table2 = read_json(run / "table2.json")
    semantics = read_json(run / "semantics" / "semantics.json")
    table1, fig10, mean_cs1 = {}, {}, {}
    for name in names:
        t = read_json(run / "dissect" / name / "table1.json")
        table1[name] = {"real": t["real"], "adversarial": t["adversarial"]}
        fig10[name] = semantics["models"][name]["fig10"]
        mean_cs1[name] = semantics["models"][name]["mean"]["cs1"]
    summary = {
        "models": names,
        "table1": table1,
        "table2": {n: table2[n] for n in names},
        "fig10": fig10,
        "mean_cs1": mean_cs1,
        "paper": PAPER,
        "timings": timings,
        "total_seconds": sum(timings.values()),
        "settings": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "dissect_layers": list(cfg.dissect_layers),
        "gallery_layers": sorted(p.name for p in (run / "galleries").glob("*/*") if p.is_dir()),
    }
    summary["findings"] = [f for arch in cfg.archs for f in findings(summary, arch)]
    return summary


def format_summary(summary: dict) -> str:
    """The printed summary: Table 1 and 2 beside the paper's, then one line per claim."""
    from advinterp.analysis.dissection import format_table1
    from advinterp.metrics.accuracy import format_table2

    paper = summary["paper"]
    lines = ["Table 2 (%, FGSM untargeted):", format_table2(summary["table2"])]
    lines.append(
        "paper, ResNet-18 on ImageNet: "
        + ", ".join(f"{k} {v:.2f}" for k, v in paper["table2"]["ResNet-18"].items())
    )
    lines += ["", "Table 1:", format_table1(summary["table1"])]
    for name, row in paper["table1"].items():
        lines.append(
            f"paper, {name} on Broden: real "
            + " ".join(f"{k[:3]} {v:.1f}" for k, v in row["real"].items())
            + " | adversarial "
            + " ".join(f"{k[:3]} {v:.1f}" for k, v in row["adversarial"].items())
        )
    lines += ["", "The paper's findings on this data:"]
    for f in summary["findings"]:
        held = {True: "held", False: "did not hold", None: "undecided"}[f["held"]]
        lines.append(f"- {f['claim']}: {held} ({f['detail']})")
    return "\n".join(lines)
