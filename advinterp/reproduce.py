"""The whole paper on the embedded data, in one command: ``advinterp reproduce --out RUN``.

Stages, each cached in RUN and skipped when its inputs (settings and the
checkpoints it reads) are unchanged:

1. ``train``: the normal model ``<arch>`` (``RUN/<arch>/``);
2. ``advtrain``: ``<arch>-Adv`` (consistency loss, β = 1, relative to the features'
   norms, lr 0.003: ``docs/advtrain-recipe.md``) and ``<arch>-AT`` (β = 0), fine-tuned
   from it;
3. ``table2``: clean and FGSM top-1/top-5 at ε = 4, 8, 16 (``RUN/table2.json``);
4. ``robustness`` and ``autoattack``: per test image, top-1 right or not, clean and
   under FGSM (every image of Table 2), PGD-20 and AutoAttack (the first ones) at
   ε = 4 (``RUN/robustness/``);
5. ``strength``: per model, the λ (and if need be the steps) at which its ``opt``
   attack fools ≥ 95% of the first test images (``RUN/adv/<model>-strength.json``);
6. ``attack``: per model, the paper's ``opt`` set on test images at that strength
   (``RUN/adv/``);
7. ``semantics``: one pass over each model's image pairs gives LC, CS1, CS2 of every
   unit (read after batch norm and ReLU), Fig. 10 with all models (``RUN/semantics/``),
   and Fig. 2-style galleries of the model's last units (``RUN/galleries/``);
8. ``dissect``: Table 1, real vs adversarial probe images, every unit, and Table 1 on
   resamples of the probe images (``RUN/dissect/<model>/``); the untrained
   ``<arch>-random`` on real images, Table 1's floor;
9. ``summary.json`` (``table1``, ``table2``, ``fig10``, ``attacks``, the paper's
   numbers, and per claim its estimate, 95% bootstrap interval and verdict: see
   :func:`findings`) and the HTML report (``RUN/report/``).

``--sweep`` (:func:`sweep`) then reruns stages 5–8 on the same models at other
attack strengths and σ, and reports each claim's verdict per setting.

Given models (``--model SPEC [--weights W]`` or ``--models A B C [--weights WA WB WC]``,
:func:`_reproduce_given`) skip stages 1–2: the same analysis runs on them, over ``--data
imagefolder:PATH`` (or Fashion-MNIST) and a Broden-format ``--probe`` folder (or
fashion-broden), with the first given model's random-weights twin as Table 1's floor. In
``--models`` order they play the normal model, ``-Adv`` and ``-AT`` in the findings; only
the claims whose models are there are judged, and ``summary.json``'s ``roles`` says who
played what. ``--train-data`` with ``--model`` fine-tunes its ``-Adv`` and ``-AT`` there
first (stage 2 from the given model).
``--sweep`` works on them alike (:class:`_Run` holds what the two paths share).

A killed run started again with the same command resumes: finished stages are
skipped, training and attacks continue from their last checkpoint or shard.
Before any stage runs, the architectures, the Fashion-MNIST files and the run
folder are checked, so a mistake costs no training time.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from advinterp.errors import UserError
from advinterp.io import read_json, write_json

__all__ = ["Evidence", "ReproduceConfig", "PAPER", "findings", "reproduce", "verdict"]

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
    # Table 2's stronger attacks run on the first test images only (their cost).
    pgd_images: int | None = None
    autoattack_images: int | None = None
    eps: Sequence[float] = (4, 8, 16)
    # Table 1's layers: by default every unit where the network uses it (after BN and ReLU:
    # 240 units of ``resnet``) for 28² models, the last two stages (``"stages"``:
    # ``layer3 layer4`` of ResNet-18) for larger given ones, whose every unit at 224² would
    # hold gigabytes of counts.
    dissect_layers: Sequence[str] | None = None
    gallery_units: int = 8
    saliency: str = "discrepancy"
    # The opt attack's iterate: "final" (eq. 4 as written) or "closest" successful one.
    keep: str = "final"
    # Equal attacks: each model's λ is the first of ``lam_grid`` whose opt attack (20 steps)
    # fools ``success_target`` of the first ``lam_images`` test images; failing that, the
    # largest λ with the first of ``steps_grid``'s longer runs that does. ``lam`` fixes λ
    # (20 steps) instead.
    lam: float | None = None
    lam_grid: Sequence[float] = (10, 30, 100, 300)
    steps_grid: Sequence[int] = (40, 80)
    success_target: float = 0.95
    lam_images: int | None = None
    # σ of eq. 10 (the class similarity from WordNet distance) for LC, CS1 and CS2.
    sigma: float = 1.0
    data_root: str | None = None
    extra: dict = field(default_factory=dict)
    # Given models (``reproduce --model`` / ``--models``): analysed, not trained here. Each is a
    # checkpoint path or a model name; in order they play the normal model, ``-Adv`` and
    # ``-AT`` of the findings. ``weights``: one entry per model, in order (a file, ``imagenet``
    # or ``random`` for a model given by name; ``None`` or :data:`NO_WEIGHTS` for none: a
    # checkpoint's own, a name's cached or shipped weights), or one string for one model.
    # ``data``: their test images (``imagefolder:PATH``, default fashion-mnist); ``probe``: a
    # Broden-format folder (default fashion-broden); ``train_data``: fine-tune ``-Adv`` and
    # ``-AT`` from the one given model on these images (advtrain) and analyse all three.
    models: Sequence[str] = ()
    weights: str | Sequence[str | None] | None = None
    data: str | None = None
    probe: str | None = None
    train_data: str | None = None
    # The opt attack's Adam steps (default the paper's 20; the search's longer runs follow
    # ``steps_grid``).
    opt_steps: int | None = None
    # Bootstrap resamples behind each interval (default :data:`DRAWS`).
    draws: int | None = None

    def resolved(self) -> ReproduceConfig:
        profile = QUICK if self.quick else DEFAULT
        values = asdict(self)
        for key, value in profile.items():
            if values.get(key) is None:
                values[key] = value
        values["archs"] = tuple(self.archs)
        values["models"] = tuple(self.models)
        if self.weights is not None and not isinstance(self.weights, str):
            values["weights"] = tuple(self.weights)
        values["eps"] = tuple(self.eps)
        if self.dissect_layers is not None:
            values["dissect_layers"] = tuple(self.dissect_layers)
        values["lam_grid"] = tuple(self.lam_grid)
        values["steps_grid"] = tuple(self.steps_grid)
        return ReproduceConfig(**values)


#: A ``--weights`` entry that gives no weights file: a checkpoint holds its own weights, a
#: name loads its cached (or shipped) ones.
NO_WEIGHTS = "-"

#: Settings of given models only: left out of a default run's summary when unset.
GIVEN_SETTINGS = ("models", "weights", "data", "probe", "train_data", "opt_steps", "draws")


# Budgets on 2 CPU cores: the default run ≤ 15 minutes, --quick ≤ 3 minutes.
DEFAULT = dict(
    train_epochs=4,
    train_limit=None,
    adv_epochs=2,
    adv_limit=30000,
    eval_limit=None,
    attack_images=4000,
    probe_images=3000,
    pgd_images=1000,
    autoattack_images=100,
    lam_images=500,
)
QUICK = dict(
    train_epochs=1,
    train_limit=6000,
    adv_epochs=1,
    adv_limit=3000,
    eval_limit=1000,
    attack_images=300,
    probe_images=300,
    pgd_images=200,
    # AutoAttack's fixed cost (four attacks, ~10 s a model) would double --quick: the stage
    # runs and records that it measured no images; the default run measures 100.
    autoattack_images=0,
    lam_images=40,
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
    costs["robustness"] = len(names) * (0.75 * eval_images * 1.4 + 21 * cfg.pgd_images)
    # AutoAttack's four attacks: ~10 s a model for 10 images, ~40 s for 100 (2 cores).
    costs["autoattack"] = len(names) * (15000 + 600 * cfg.autoattack_images)
    for name in names:  # the opt attack's 20 steps, at one to four λ, then 40 and 80
        costs[f"strength {name}"] = 17.5 * cfg.lam_images * (1 if cfg.lam else 4)
    for name in names:
        costs[f"attack {name}"] = 17.5 * cfg.attack_images * 2  # 20 to 80 steps
    # The pairs' forward passes, and the occlusion maps of each model's 8 gallery units.
    costs["semantics"] = len(names) * (2 * cfg.attack_images * 0.4 + 20000.0)
    for name in names:
        costs[f"dissect {name}"] = 30 * cfg.probe_images  # the attack, one pass a side, PNGs
    for arch in cfg.archs:
        costs[f"dissect {random_name(arch)}"] = 3 * cfg.probe_images  # one pass, real only
    return costs


def random_name(arch: str) -> str:
    """The name of ``arch`` with random weights, Table 1's floor: ``resnet-random``."""
    return f"{arch}-random"


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
    """The last units, where the network uses them (for a ResNet, its last block's output)."""
    from advinterp.record import unit_layers

    return unit_layers(model)[-1]


@dataclass
class _Run:
    """A run's models as its analysis stages see them, whoever made the models: what the
    default run and given models share, and what :func:`sweep` reruns the analysis on."""

    folder: Path
    #: Resolved; for given models with their specs (``extra["given"]``) and ``data`` set.
    cfg: ReproduceConfig
    names: list[str]
    #: Model → the digest every stage's key holds of it.
    fingerprints: dict[str, str]
    #: The data (and probe) part of every analysis stage's key.
    data: dict
    #: Table 1's random-weights floors (``RUN/dissect/<floor>/``).
    floors: list[str]
    #: The models made in this run, in ``RUN/<name>/``: every model of a default run, the
    #: fine-tuned ``-Adv`` and ``-AT`` of given models (``--train-data``).
    local: list[str]
    #: The stages' costs at a setting (:func:`stage_costs` or :func:`_given_costs`).
    costs: Callable[[ReproduceConfig], dict[str, float]]
    #: Given models only: name → role, as ``summary.json``'s ``roles``.
    roles: dict | None = None

    def given(self) -> dict | None:
        """:func:`_summary`'s ``given``: None for the default run."""
        return None if self.roles is None else {"roles": self.roles, "floors": self.floors}


def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True) -> dict:
    """Run every stage into ``out`` (see the module doc); returns ``summary.json``'s dict."""
    return _reproduce(cfg, out, progress)[0]


def _reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool) -> tuple[dict, _Run]:
    """:func:`reproduce`, and the run it made (for :func:`sweep`)."""
    from advinterp.data.fashion import load_fashion_mnist
    from advinterp.io import out_folder
    from advinterp.models import SMALL_ARCHS

    cfg = cfg.resolved()
    if cfg.models:
        return _reproduce_given(cfg, out, progress)
    if cfg.dissect_layers is None:
        cfg.dissect_layers = ("units",)
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
    ctx = _Run(
        folder=run,
        cfg=cfg,
        names=names,
        fingerprints={n: _fingerprint(run / n / "model.safetensors") for n in names},
        data=data,
        floors=[random_name(a) for a in cfg.archs],
        local=names,
        costs=stage_costs,
    )
    return _analyse(ctx, stages, progress), ctx


def _analyse(ctx: _Run, stages, progress: bool) -> dict:
    """Every stage after training, on the run's models: Table 2 and its attacks, the
    analysis, Table 1's floors; then ``summary.json`` and the report. Returns the summary."""
    from advinterp.report import write_report

    run, cfg, names = ctx.folder, ctx.cfg, ctx.names
    _evaluation(stages, run, names, cfg, ctx.fingerprints, ctx.data)
    _analysis(stages, run, names, cfg, ctx.fingerprints, ctx.data, progress)
    if ctx.roles is None:  # the default run: each architecture untrained
        for arch in cfg.archs:
            key = {"arch": arch, "n": cfg.probe_images, "layers": cfg.dissect_layers}
            key |= ctx.data
            if cfg.draws is not None:
                key["draws"] = cfg.draws
            _floor_stage(
                stages,
                run,
                random_name(arch),
                key,
                lambda a=arch: _dissect_random(run, a, cfg, progress),
            )
    else:  # given models: the normal model's network, reset
        normal = names[0]
        key = {"model": ctx.fingerprints[normal], "twin": "reset", "n": cfg.probe_images}
        key |= {"draws": cfg.draws or DRAWS}
        key |= {"layers": cfg.dissect_layers, **ctx.data}
        _floor_stage(
            stages,
            run,
            ctx.floors[0],
            key,
            lambda: _dissect_random(
                run, normal, cfg, progress, twin=lambda: _random_twin(run, normal, cfg)
            ),
        )
    summary = _summary(run, names, cfg, stages.timings, ctx.given())
    write_json(run / "summary.json", summary)
    write_report(run)
    return summary


def _floor_stage(stages, run: Path, floor: str, key: dict, go: Callable[[], None]) -> None:
    """The stage of Table 1's floor ``floor``, which ``go()`` dissects."""
    outputs = [run / "dissect" / floor / n for n in ("table1.json", "bootstrap.json")]
    stages(f"dissect {floor}", key, outputs, go)


#: What each position of ``--models`` is judged as in the findings.
ROLES = {
    "normal": "judged as the normally trained model (the paper's <arch>)",
    "adv": "judged as the adversarially fine-tuned model, consistency loss "
    "(the paper's <arch>-Adv)",
    "at": "judged as the plainly adversarially trained model (the paper's <arch>-AT)",
    "other": "compared in the tables and Fig. 10; no finding judges it",
}


def _is_checkpoint(spec: str) -> bool:
    path = Path(spec)
    return (
        path.exists()
        or Path(spec + ".json").exists()
        or path.suffix in (".safetensors", ".json")
        or "/" in spec
    )


def _given_name(spec: str, weights: str | None = None) -> str:
    """A model's name in the run: a checkpoint's folder (``runs/r18/model.safetensors`` →
    ``r18``) or file stem, else the model name itself; with ``weights`` (for a name given
    more than once) ``<name>+<weights file stem>``."""
    import re

    if _is_checkpoint(spec):
        path = Path(spec).resolve()
        if path.is_dir() or path.stem == "model":
            name = path.name if path.is_dir() else path.parent.name
        else:
            name = path.stem
    else:
        name = spec
    if weights is not None:
        name += f"+{Path(weights).stem}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "model"


def _given_weights(cfg) -> list[str | None]:
    """``cfg.weights`` as one entry per model of ``cfg.models`` (``None``: no weights file,
    :data:`NO_WEIGHTS` included); a count that does not match is one error line."""
    specs, weights = list(cfg.models), cfg.weights
    if weights is None:
        return [None] * len(specs)
    weights = [weights] if isinstance(weights, str) else list(weights)
    if len(weights) != len(specs):
        n, m = len(weights), len(specs)
        raise UserError(
            f"--weights has {n} {'entry' if n == 1 else 'entries'} for {m} "
            f"{'model' if m == 1 else 'models'}: give one per model, in --models order "
            f"({NO_WEIGHTS} for a checkpoint, or a name without a weights file)"
        )
    return [None if w in (None, NO_WEIGHTS) else str(w) for w in weights]


def _check_given(cfg) -> dict[str, dict]:
    """Every given model, its data and probe checked before any stage runs; returns name →
    ``{"spec", "weights", "role", "description"}`` in ``cfg.models`` order (the fine-tuned
    ``-Adv`` and ``-AT`` added with ``train_data``). Sets ``cfg.data`` to fashion-mnist
    when unset. A name given twice with other weights files is named after them
    (``resnet18+r18``, ``resnet18+r18-adv``)."""
    from advinterp.analysis.dissection import map_layers
    from advinterp.data import open_dataset
    from advinterp.models import checkpoint_config, load_model

    specs = list(cfg.models)
    weights = _given_weights(cfg)
    if cfg.train_data is not None and len(specs) != 1:
        raise UserError("--train-data fine-tunes one given model: use it with --model")
    pairs = list(zip(specs, weights, strict=True))
    for spec, w in pairs:
        if pairs.count((spec, w)) > 1:
            raise UserError(f"--models lists {spec} twice" + (f" with --weights {w}" if w else ""))
        if w is not None and checkpoint_config(spec) is not None:
            raise UserError(
                f"--weights {w} is given for {spec}, a checkpoint that holds its own weights: "
                f"give {NO_WEIGHTS} in its place"
            )
    if cfg.data is None:
        cfg.data = "fashion-mnist"
    if cfg.data != "fashion-mnist" and not cfg.data.startswith("imagefolder:"):
        raise UserError(
            f"--data {cfg.data}: give imagefolder:PATH (test images in PATH/<wnid>/) or "
            "fashion-mnist"
        )
    given: dict[str, dict] = {}
    roles = ["normal", "adv", "at"]
    for i, (spec, w) in enumerate(pairs):
        model = load_model(spec, w)
        if cfg.dissect_layers is None:
            cfg.dissect_layers = ("units",) if model.input_size <= 64 else ("stages",)
        map_layers(model, cfg.dissect_layers)  # names checked before any stage runs
        name = _given_name(spec, w if specs.count(spec) > 1 else None)
        while name in given:  # two checkpoints in folders of the same name
            name += "+"
        role = roles[i] if i < len(roles) else "other"
        given[name] = {"spec": spec, "weights": w, "role": role}
        data = open_dataset(cfg.data, "test", cfg.data_root, limit=1, model=model)
        if len(data) == 0:
            raise UserError(f"--data {cfg.data} holds no images")
        if cfg.probe is None and cfg.data != "fashion-mnist":
            raise UserError(
                "give --probe: a Broden-format folder (broden1_224, ...) for Table 1 on "
                f"{cfg.data}'s models"
            )
        if cfg.probe is not None or i == 0:
            _probe(cfg, model)  # the embedded probe is written to the cache once
        if cfg.train_data is not None:
            open_dataset(cfg.train_data, "train", cfg.data_root, limit=1, model=model)
    if cfg.train_data is not None:
        (normal,) = given
        for role, suffix in (("adv", "-Adv"), ("at", "-AT")):
            given[normal + suffix] = {"spec": None, "weights": None, "role": role}
    for entry in given.values():
        entry["description"] = ROLES[entry["role"]]
    return given


def _given_costs(cfg, names, tuned, floor: str) -> dict[str, float]:
    """:func:`stage_costs` for given models: the same weights, no training of the normal
    model, one random-weights floor."""
    eval_images = cfg.eval_limit or 10000
    costs = {f"advtrain {n}": 2.8 * cfg.adv_epochs * (cfg.adv_limit or 60000) for n in tuned}
    costs["table2"] = 0.75 * len(names) * eval_images * (0.4 + len(cfg.eps))
    costs["robustness"] = len(names) * (0.75 * eval_images * 1.4 + 21 * cfg.pgd_images)
    costs["autoattack"] = len(names) * (15000 + 600 * cfg.autoattack_images)
    for name in names:
        costs[f"strength {name}"] = 17.5 * cfg.lam_images * (1 if cfg.lam else 4)
    for name in names:
        costs[f"attack {name}"] = 17.5 * cfg.attack_images * 2
    costs["semantics"] = len(names) * (2 * cfg.attack_images * 0.4 + 20000.0)
    for name in names:
        costs[f"dissect {name}"] = 30 * cfg.probe_images
    costs[f"dissect {floor}"] = 3 * cfg.probe_images
    return costs


def _state_fingerprint(model) -> str:
    """A digest of a model's parameters and buffers (its normalisation included)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{value.dtype}:{value.numel()};".encode())
        h.update(value.view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(getattr(model, "wnids", None)).encode())
    return h.hexdigest()[:16]


def _random_twin(run: Path, name: str, cfg):
    """``name``'s network with random weights (the caller seeds): a compact Fashion-MNIST
    architecture built afresh, as for the default run's floor; any other network with
    every layer's parameters and statistics reset (PyTorch's default initialisation)."""
    import copy

    from advinterp.models import SMALL_ARCHS, create_model

    model = _load(run, name, cfg)
    config = getattr(model, "config", None) or {}
    arch = config.get("arch")
    if arch in SMALL_ARCHS and model.input_size == 28 and "num_classes" in config:
        twin = create_model(arch, model.num_classes, model.in_chans)
    else:
        twin = copy.deepcopy(model)
        for module in twin.net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    twin.classes, twin.wnids = model.classes, model.wnids
    return twin


def _given_advtrain_stage(stages, run: Path, normal: str, name: str, beta: float, cfg, init_fp):
    """``name`` fine-tuned from the given model ``normal`` on ``cfg.train_data`` (advtrain,
    β = ``beta``), into ``RUN/<name>/``."""
    from advinterp.advtrain import AdvTrainConfig, advtrain

    spec, weights = _spec(run, normal, cfg)
    ac = AdvTrainConfig(
        init=spec,
        weights=weights,
        epochs=cfg.adv_epochs,
        beta=beta,
        limit=cfg.adv_limit,
        seed=cfg.seed,
        data=cfg.train_data,
        data_root=cfg.data_root,
        eval_limit=min(1000, cfg.eval_limit or 1000),
        eval_data=cfg.data if cfg.train_data.startswith("imagefolder:") else None,
    )
    key = {**asdict(ac), "init": init_fp}
    _training_stage(stages, f"advtrain {name}", key, run / name, ac, advtrain)


def _reproduce_given(cfg: ReproduceConfig, out: str | Path, progress: bool) -> tuple[dict, _Run]:
    """:func:`_reproduce` on given models (``cfg.models``): no training of their own; with
    ``cfg.train_data`` the one given model's ``-Adv`` and ``-AT`` fine-tuned first. Every
    analysis stage, keyed by the models' fingerprints, the data and the probe."""
    from advinterp.io import out_folder

    given = _check_given(cfg)
    run = out_folder(out)
    names = list(given)
    normal = names[0]
    tuned = [n for n, e in given.items() if e["spec"] is None]
    for name in tuned:
        given[name]["spec"] = str(run / name / "model.safetensors")
    cfg.extra = {**cfg.extra, "given": given}
    floor = random_name(normal)
    data = {"data": cfg.data, "probe": cfg.probe, "data_root": cfg.data_root, "seed": cfg.seed}
    stages = _Stages(run, _given_costs(cfg, names, tuned, floor))
    fingerprints = {normal: _state_fingerprint(_load(run, normal, cfg))}
    for name in tuned:
        beta = 1.0 if given[name]["role"] == "adv" else 0.0
        _given_advtrain_stage(stages, run, normal, name, beta, cfg, fingerprints[normal])
    for name in names[1:]:
        fingerprints[name] = _state_fingerprint(_load(run, name, cfg))
    roles = {
        n: {"role": e["role"], "description": e["description"], "spec": e["spec"]}
        | ({"weights": e["weights"]} if e["weights"] else {})
        for n, e in given.items()
    }
    ctx = _Run(
        folder=run,
        cfg=cfg,
        names=names,
        fingerprints=fingerprints,
        data=data,
        floors=[floor],
        local=tuned,
        costs=lambda c: _given_costs(c, names, tuned, floor),
        roles=roles,
    )
    return _analyse(ctx, stages, progress), ctx


def _evaluation(stages, run: Path, names, cfg, fingerprints, data) -> None:
    """Table 2 and the stronger attacks' robustness (PGD, AutoAttack) of every model."""
    table2_key = {"models": fingerprints, "eps": cfg.eps, "limit": cfg.eval_limit, **data}
    stages("table2", table2_key, [run / "table2.json"], lambda: _table2(run, names, cfg))
    robust_key = {"models": fingerprints, "eps": cfg.eps[0], "limit": cfg.eval_limit, **data}
    robust_key |= {"pgd": {"images": cfg.pgd_images, "steps": PGD_STEPS}}
    stages(
        "robustness",
        robust_key,
        [run / "robustness" / "correct.safetensors", run / "robustness" / "pgd.safetensors"],
        lambda: _robustness(run, names, cfg),
    )
    aa_key = {"models": fingerprints, "eps": cfg.eps[0], "images": cfg.autoattack_images, **data}
    stages(
        "autoattack",
        aa_key,
        [run / "robustness" / "autoattack.json"],
        lambda: _autoattack(run, names, cfg),
    )


def _analysis(
    stages, run: Path, names, cfg, fingerprints, data, progress: bool, galleries: bool = True
) -> None:
    """The stages that analyse the trained models at one attack strength and σ: the
    strength search, the opt attacks, semantics (Fig. 10), galleries and dissection."""
    for name in names:
        key = {"model": fingerprints[name], "n": cfg.lam_images, "keep": cfg.keep, **data}
        key |= {"lam": cfg.lam, "grid": cfg.lam_grid, "steps": cfg.steps_grid}
        key |= {"target": cfg.success_target}
        if cfg.opt_steps is not None:
            key["opt_steps"] = cfg.opt_steps
        stages(
            f"strength {name}",
            key,
            [_strength_file(run, name)],
            lambda n=name: _strength(run, n, cfg),
        )
    attacks = {name: _attack_options(run, name, cfg) for name in names}
    for name in names:
        key = {"model": fingerprints[name], "n": cfg.attack_images, "attack": attacks[name]}
        key |= data
        adv = run / "adv" / f"{name}-opt"
        stages(f"attack {name}", key, [adv / "attack.json"], lambda n=name: _attack(run, n, cfg))

    sem_key = {"models": fingerprints, "n": cfg.attack_images, "attack": attacks, **data}
    sem_key["sigma"] = cfg.sigma
    if galleries:  # one pass over the image pairs feeds both
        sem_key["galleries"] = {"units": cfg.gallery_units, "saliency": cfg.saliency}
        stages(
            "semantics",
            sem_key,
            [run / "semantics" / "semantics.json", *(run / "galleries" / n for n in names)],
            lambda: _semantics_and_galleries(run, names, cfg, progress),
        )
    else:
        stages(
            "semantics",
            sem_key,
            [run / "semantics" / "semantics.json"],
            lambda: _semantics(run, names, cfg, progress),
        )
    for name in names:
        key = {"model": fingerprints[name], "n": cfg.probe_images, "layers": cfg.dissect_layers}
        key |= {"attack": attacks[name], **data}
        if cfg.draws is not None:
            key["draws"] = cfg.draws
        stages(
            f"dissect {name}",
            key,
            [run / "dissect" / name / "table1.json", run / "dissect" / name / "bootstrap.json"],
            lambda n=name: _dissect(run, n, cfg, progress),
        )


#: The settings ``reproduce --sweep`` reruns the analysis at, one factor at a time around
#: the default run: the paper's λ range at its 20 Adam steps (λ fixed for every model, so
#: the models are attacked alike rather than to the same success rate), and σ of eq. 10.
SWEEP: tuple[dict, ...] = ({"lam": 1.0}, {"lam": 10.0}, {"sigma": 0.5}, {"sigma": 2.0})


def setting_name(setting: dict, cfg: ReproduceConfig | None = None) -> str:
    """``{"lam": 10.0}`` → ``"λ=10, 20 steps"`` (the opt attack's steps, ``cfg.opt_steps``
    where set); ``{}`` → the default run's, as ``cfg`` attacks (λ searched unless fixed)."""
    steps = (cfg.opt_steps if cfg is not None else None) or 20
    if not setting:
        if cfg is None or (cfg.lam is None and cfg.sigma == 1.0 and cfg.opt_steps is None):
            return "default (λ searched to ≥ 95% success, σ = 1)"
        if cfg.lam is None:
            attack = f"λ searched to ≥ {100 * cfg.success_target:g}% success"
        else:
            attack = f"λ={cfg.lam:g}"
        return f"default ({attack}, {steps} steps, σ = {cfg.sigma:g})"
    parts = []
    if "lam" in setting:
        parts.append(f"λ={setting['lam']:g}, {steps} steps")
    if "sigma" in setting:
        parts.append(f"σ={setting['sigma']:g}")
    return ", ".join(parts)


def _setting_folder(setting: dict) -> str:
    return "-".join(f"{k}{v:g}" for k, v in sorted(setting.items()))


def sweep(
    cfg: ReproduceConfig,
    out: str | Path,
    settings: Sequence[dict] = SWEEP,
    progress: bool = True,
) -> dict:
    """The sensitivity of every verdict: the run (:func:`reproduce`, the default run or given
    models, its stages reused when done), then its analysis again, reusing its models and
    Table 2, at each setting: ``{"lam": λ}`` attacks every model with λ at 20 steps (or
    ``cfg.opt_steps``; strength search off), re-running the attacks, semantics and
    dissection; ``{"sigma": σ}`` only recomputes the semantics, on the run's adversarial
    images. Each setting's run is ``RUN/sweep/<setting>/`` (its own stages, resumable; the
    models made in RUN are links to RUN's, given models are read where they were given).
    Writes ``RUN/sweep.json``: per claim, per setting, the verdict with its estimate and
    interval (:func:`sweep_table`); returns it."""
    from advinterp.report import write_report

    for setting in settings:  # before any stage runs
        if set(setting) - {"lam", "sigma"} or not setting:
            raise UserError(f"a sweep setting varies lam or sigma, got {setting}")
    summary, ctx = _reproduce(cfg, out, progress)
    run = ctx.folder
    summaries = {setting_name({}, ctx.cfg): summary}
    for setting in settings:
        sub = run / "sweep" / _setting_folder(setting)
        _setting_run(ctx, sub, setting)
        scfg = replace(
            ctx.cfg, lam=setting.get("lam", ctx.cfg.lam), sigma=setting.get("sigma", ctx.cfg.sigma)
        )
        print(f"reproduce --sweep: {setting_name(setting, scfg)} in {sub}", flush=True)
        if "lam" in setting:
            floors = {f"dissect {f}" for f in ctx.floors}
            costs = {
                k: v
                for k, v in ctx.costs(scfg).items()
                if k.split(" ")[0] in ("strength", "attack", "semantics", "dissect")
                and k not in floors
            }
            stages = _Stages(sub, costs)
            _analysis(
                stages, sub, ctx.names, scfg, ctx.fingerprints, ctx.data, progress, galleries=False
            )
        else:
            stages = _Stages(sub, {"semantics": ctx.costs(scfg)["semantics"]})
            attacks = {n: _attack_options(sub, n, scfg) for n in ctx.names}
            key = {"models": ctx.fingerprints, "n": scfg.attack_images, "attack": attacks}
            key |= {**ctx.data, "sigma": scfg.sigma}
            stages(
                "semantics",
                key,
                [sub / "semantics" / "semantics.json"],
                lambda c=scfg, d=sub: _semantics(d, ctx.names, c, progress),
            )
        summary = _summary(sub, ctx.names, scfg, stages.timings, ctx.given())
        write_json(sub / "summary.json", summary)
        summaries[setting_name(setting, scfg)] = summary
    table = sweep_table(summaries)
    write_json(run / "sweep.json", table)
    write_report(run)
    return table


def _setting_run(ctx: _Run, sub: Path, setting: dict) -> None:
    """``RUN/sweep/<setting>/`` made ready for its stages: links to the models made in RUN
    and to Table 1's floors (and, at RUN's attacks, to its attacks and dissections: read
    only), and copies of Table 2 and its robustness files."""
    run = ctx.folder
    for path in (sub / "dissect", sub / "robustness"):
        path.mkdir(parents=True, exist_ok=True)
    links = {n: Path("..", "..", n) for n in ctx.local}
    links |= {f"dissect/{f}": Path("..", "..", "..", "dissect", f) for f in ctx.floors}
    if "lam" not in setting:  # RUN's attacks and dissections, read only
        links["adv"] = Path("..", "..", "adv")
        links |= {f"dissect/{n}": Path("..", "..", "..", "dissect", n) for n in ctx.names}
    for rel, target in links.items():
        if not (sub / rel).is_symlink():
            (sub / rel).symlink_to(target, target_is_directory=True)
    for rel in (
        "table2.json",
        "robustness/correct.safetensors",
        "robustness/pgd.safetensors",
        "robustness/autoattack.json",
        "robustness/autoattack.safetensors",
    ):
        if (run / rel).is_file():
            shutil.copyfile(run / rel, sub / rel)


def sweep_table(summaries: dict[str, dict]) -> dict:
    """Setting → summary (with ``findings``) into the sweep's table: for each claim (in
    the order of the first summary), per setting its verdict, estimate, interval and
    unit, and how many settings each verdict got; with each setting's attack (λ, steps,
    success rate per model). A claim whose verdict changes between settings is
    ``"robust": False``."""
    claims: dict[str, dict] = {}
    for setting, summary in summaries.items():
        for f in summary["findings"]:
            row = claims.setdefault(f["claim"], {"claim": f["claim"], "settings": {}})
            row["settings"][setting] = {
                k: f.get(k) for k in ("verdict", "estimate", "interval", "unit", "bound", "above")
            }
    for row in claims.values():
        verdicts = [v["verdict"] for v in row["settings"].values()]
        row["verdicts"] = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
        row["robust"] = len(row["verdicts"]) == 1 and len(verdicts) == len(summaries)
    attacks = {
        setting: {
            name: {k: a.get(k) for k in ("lam", "steps", "success_rate", "probe_success_rate")}
            for name, a in summary.get("attacks", {}).items()
        }
        for setting, summary in summaries.items()
    }
    sigma = {s: summary.get("settings", {}).get("sigma", 1.0) for s, summary in summaries.items()}
    return {
        "settings": list(summaries),
        "attacks": attacks,
        "sigma": sigma,
        "claims": list(claims.values()),
    }


def format_sweep(table: dict) -> str:
    """The sweep's table as printed: one block per claim, one line per setting."""
    lines = ["Sensitivity (reproduce --sweep): each claim's verdict per setting"]
    for setting in table["settings"]:
        rates = ", ".join(
            f"{n} {100 * a['success_rate']:.0f}%"
            for n, a in table["attacks"].get(setting, {}).items()
            if a.get("success_rate") is not None
        )
        lines.append(f"  [{setting}] opt success: {rates}")
    for row in table["claims"]:
        flag = "same verdict at every setting" if row["robust"] else "verdict depends on setting"
        lines.append(f"- {row['claim']} ({flag})")
        for setting, v in row["settings"].items():
            lines.append(f"    {setting}: {v['verdict']} — {format_estimate(v)}")
    return "\n".join(lines)


def _train_stage(stages, run, arch, cfg, data) -> None:
    from advinterp.train import TrainConfig, train

    tc = TrainConfig(
        arch=arch,
        epochs=cfg.train_epochs,
        limit=cfg.train_limit,
        seed=cfg.seed,
        data_root=cfg.data_root,
    )
    _training_stage(stages, f"train {arch}", asdict(tc), run / arch, tc, train)


def _training_stage(stages, stage: str, key: dict, folder: Path, config, fit) -> None:
    """Stage ``stage``: ``fit(config, folder, …)`` (train or advtrain) into ``folder``,
    resuming a killed run of the same recipe and starting over one of another."""

    def go():
        resume = (folder / "train_state.json").is_file()
        if resume and read_json(folder / "train_state.json").get("train") != asdict(config):
            shutil.rmtree(folder)  # another recipe: start over
            resume = False
        fit(config, folder, resume=resume, progress=True)

    stages(stage, key, [folder / "model.safetensors"], go)


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
    key = {**asdict(ac), "init": _fingerprint(init)}
    _training_stage(stages, f"advtrain {name}", key, run / name, ac, advtrain)


def _spec(run: Path, name: str, cfg) -> tuple[str, str | None]:
    """The model ``name`` as :func:`advinterp.models.load_model` takes it: (spec, weights)."""
    given = cfg.extra.get("given", {}).get(name)
    if given is None:
        return str(run / name / "model.safetensors"), None
    return given["spec"], given["weights"]


def _load(run: Path, name: str, cfg):
    from advinterp.models import load_model

    return load_model(*_spec(run, name, cfg))


def _test_set(cfg, limit, model=None):
    """The test images: Fashion-MNIST's, or the given models' ``cfg.data``, read for ``model``."""
    from advinterp.data import open_dataset

    if cfg.data is None:
        return open_dataset("fashion-mnist", "test", cfg.data_root, limit=limit)
    return open_dataset(cfg.data, "test", cfg.data_root, limit=limit, model=model)


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """A set's images (float, [0, 1]) and labels, all in memory; an image folder is decoded
    (its undecodable images left out)."""
    from advinterp.data import TensorImageSet, batches

    if isinstance(data, TensorImageSet):
        return data.images.float() / 255, data.labels
    xs, ys = [], []
    for x, y, _ in batches(data, 64):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _probe(cfg, model):
    """The dissection probe: the embedded fashion-broden, or the Broden folder ``cfg.probe``
    (its first ``probe_images`` images)."""
    from advinterp.data.broden import open_probe

    if cfg.probe is None:
        return open_probe("fashion-broden", model, size=cfg.probe_images, seed=cfg.seed)
    return open_probe(cfg.probe, model, limit=cfg.probe_images)


def _table2(run: Path, names, cfg) -> None:
    from advinterp.metrics.accuracy import format_table2, table2

    rows = {}
    for name in names:
        model = _load(run, name, cfg)
        data = _test_set(cfg, cfg.eval_limit, model)
        rows[name] = table2(model, data, eps=[e / 255 for e in cfg.eps], progress=True)
    print(format_table2(rows))
    write_json(run / "table2.json", rows)


#: PGD for Table 2: 20 steps of 2.5·ε/20 from a random start (Madry et al.), at Table 2's ε.
PGD_STEPS = 20


def _robustness(run: Path, names, cfg) -> None:
    """Per test image of Table 2 and per model, whether its top-1 prediction is right,
    clean and under FGSM at the first ε (as Table 2 computes it; ``correct.safetensors``),
    and under PGD-20 at that ε on the first ``pgd_images`` (``pgd.safetensors``): what
    Table 2's PGD column and the intervals of the accuracy claims come from."""
    from advinterp.attacks import FGSM, make_attack
    from advinterp.attacks.fgsm import fgsm_step
    from advinterp.data import batches
    from advinterp.io import save_tensors

    eps = cfg.eps[0] / 255
    correct = {}
    for name in names:
        model = _load(run, name, cfg).eval()
        data = _test_set(cfg, cfg.eval_limit, model)
        attack = FGSM(model, eps=eps)
        clean, fgsm = [], []
        for x, y, _ in batches(data, 250):
            with torch.inference_mode():
                clean.append(model(x).argmax(1) == y)
            grad = attack.loss_grad(x, y, None)
            with torch.inference_mode():
                fgsm.append(model(fgsm_step(x, grad, attack.eps)).argmax(1) == y)
        correct[f"{name}/clean"] = torch.cat(clean).to(torch.uint8)
        correct[f"{name}/fgsm"] = torch.cat(fgsm).to(torch.uint8)
    save_tensors(run / "robustness" / "correct.safetensors", correct)

    def pgd(model):
        return make_attack("pgd", model, eps=eps, steps=PGD_STEPS, seed=cfg.seed)

    right = _attacked_correct(run, names, cfg, "pgd20", cfg.pgd_images, pgd)
    save_tensors(run / "robustness" / "pgd.safetensors", right)


def _attacked_correct(run: Path, names, cfg, label: str, n: int, attack_for) -> dict:
    """Per model and image of the first ``n`` test images, top-1 right under the attack
    ``attack_for(model)`` (untargeted, true labels) or not: ``{"<model>/<label>": uint8}``."""
    from advinterp.attacks.base import predict_logits

    out = {}
    for name in names:
        model = _load(run, name, cfg).eval()
        x, y = _tensors(_test_set(cfg, n, model))
        x_adv = attack_for(model).run(x, y, batch_size=250, progress=True)
        right = predict_logits(model, x_adv).argmax(1) == y
        out[f"{name}/{label}"] = right.to(torch.uint8)
    return out


def _autoattack(run: Path, names, cfg) -> None:
    """AutoAttack (Croce & Hein 2020; torchattacks' standard version: APGD-CE, APGD-T,
    FAB-T, Square) at Table 2's first ε on the first ``autoattack_images`` test images,
    where torchattacks is installed (the ``attacks`` extra): ``autoattack.safetensors``
    per image, ``autoattack.json`` saying what ran."""
    from advinterp.attacks.adapter import TorchattacksAdapter
    from advinterp.io import save_tensors

    try:
        import torchattacks
    except ImportError:
        write_json(run / "robustness" / "autoattack.json", {"available": False, "images": 0})
        return
    if not cfg.autoattack_images:
        write_json(run / "robustness" / "autoattack.json", {"available": True, "images": 0})
        (run / "robustness" / "autoattack.safetensors").unlink(missing_ok=True)
        return

    def autoattack(model):
        aa = torchattacks.AutoAttack(
            model,
            norm="Linf",
            eps=cfg.eps[0] / 255,
            version="standard",
            n_classes=model.num_classes,
            seed=cfg.seed,  # else its attacks draw their starts from the clock
        )
        return TorchattacksAdapter(aa, seed=cfg.seed)

    right = _attacked_correct(run, names, cfg, "autoattack", cfg.autoattack_images, autoattack)
    save_tensors(run / "robustness" / "autoattack.safetensors", right)
    write_json(
        run / "robustness" / "autoattack.json",
        {"available": True, "version": "standard", "images": cfg.autoattack_images},
    )


def _attack(run: Path, name: str, cfg) -> None:
    from advinterp.attacks.advset import build_adversarial_set

    folder = run / "adv" / f"{name}-opt"
    settings = folder / "settings.json"
    options = _attack_options(run, name, cfg)
    if settings.is_file():
        saved = read_json(settings)
        if saved.get("n") != cfg.attack_images or any(
            saved.get(k) != v for k, v in options.items()
        ):
            shutil.rmtree(folder)  # another size or attack: start over
    model = _load(run, name, cfg)
    build_adversarial_set(
        model,
        _test_set(cfg, cfg.attack_images, model),
        folder,
        method="opt",
        targeted=True,
        target="least-likely",
        seed=cfg.seed,
        resume=True,
        model_spec=_spec(run, name, cfg)[0],
        **options,
    )


def _attack_options(run: Path, name: str, cfg) -> dict:
    """The opt attack's options for ``name``: the iterate it keeps, its λ and steps (from
    the strength stage)."""
    strength = read_json(_strength_file(run, name))
    return {"keep": cfg.keep, "lam": strength["lam"], "steps": strength["steps"]}


def _strength_file(run: Path, name: str) -> Path:
    return run / "adv" / f"{name}-strength.json"


def _strength(run: Path, name: str, cfg) -> None:
    """Equal attacks: the strength at which ``name``'s opt attack reaches the target
    success rate on the first ``lam_images`` test images. First λ, at the paper's 20 steps:
    the first of ``lam_grid`` that does. Adam's step does not grow with the gradient, so
    past the λ where the classification term dominates, λ barely changes how far 20 steps
    reach; a model they do not fool enough gets the largest λ with the first of
    ``steps_grid``'s longer runs that does (the last tried if none does). ``cfg.lam``
    fixes λ at 20 steps instead. A model that resists the attack would otherwise be
    compared on images still what they were."""
    from advinterp.attacks import attack_stats, make_attack
    from advinterp.attacks.opt import DEFAULT_STEPS

    model = _load(run, name, cfg)
    x, y = _tensors(_test_set(cfg, cfg.lam_images, model))
    steps = cfg.opt_steps or DEFAULT_STEPS
    if cfg.lam:
        grid = [(cfg.lam, steps)]
    else:
        grid = [(lam, steps) for lam in cfg.lam_grid]
        grid += [(cfg.lam_grid[-1], steps) for steps in cfg.steps_grid]
    tried = []
    for lam, steps in grid:
        attack = make_attack("opt", model, lam=lam, steps=steps, keep=cfg.keep, seed=cfg.seed)
        x_adv = attack.run(x, y, batch_size=250, progress=True)
        stats = attack_stats(model, x, x_adv, y, target=attack.targets_for(x, y))
        tried.append(
            {
                "lam": lam,
                "steps": steps,
                "success_rate": stats["success_rate"],
                "mean_l2": stats["mean_l2"],
            }
        )
        print(
            f"{name}: opt λ={lam:g}, {steps} steps: success {100 * stats['success_rate']:.1f}%",
            flush=True,
        )
        if stats["success_rate"] >= cfg.success_target:
            break
    write_json(
        _strength_file(run, name),
        {
            "lam": tried[-1]["lam"],
            "steps": tried[-1]["steps"],
            "reached": tried[-1]["success_rate"] >= cfg.success_target,
            "target": cfg.success_target,
            "images": len(y),
            "keep": cfg.keep,
            "tried": tried,
        },
    )


def _pairs(run: Path, name: str, model, cfg):
    from advinterp.analysis import open_paired_sets

    return open_paired_sets(model, run / "adv" / f"{name}-opt", data_root=cfg.data_root)


def _semantics(run: Path, names, cfg, progress: bool) -> None:
    from advinterp.analysis import model_semantics, write_semantics
    from advinterp.metrics.wordnet import similarity_matrix

    results, extra = [], {}
    for name in names:
        model = _load(run, name, cfg)
        result = model_semantics(
            model,
            _pairs(run, name, model, cfg),
            similarity_matrix(model.wnids, cfg.sigma),
            name=name,
            progress=progress,
        )
        results.append(result)
        extra[name] = {"model": _spec(run, name, cfg)[0]}
    write_semantics(results, run / "semantics", extra=extra, settings={"sigma": cfg.sigma})


def _semantics_and_galleries(run: Path, names, cfg, progress: bool) -> None:
    """Semantics (LC, CS1, CS2, Fig. 10) of every model and each model's galleries (Fig. 2)
    from one pass over its image pairs; a killed pass resumes from its last chunk."""
    from advinterp.analysis import semantics_and_galleries, write_galleries, write_semantics
    from advinterp.metrics.wordnet import class_distance_matrix, similarity_matrix

    results, extra = [], {}
    for name in names:
        model = _load(run, name, cfg)
        sem, gal = semantics_and_galleries(
            model,
            _pairs(run, name, model, cfg),
            similarity_matrix(model.wnids, cfg.sigma),
            _gallery_layer(model),
            name=name,
            count=cfg.gallery_units,
            saliency=cfg.saliency,
            distances=class_distance_matrix(model.wnids),
            sigma=cfg.sigma,
            partial=run / "semantics" / f"{name}.partial",
            progress=progress,
        )
        folder = run / "galleries" / name
        if folder.exists():
            shutil.rmtree(folder)
        write_galleries(gal, folder / gal.layer, extra={"model": name})
        results.append(sem)
        extra[name] = {"model": _spec(run, name, cfg)[0]}
    write_semantics(results, run / "semantics", extra=extra, settings={"sigma": cfg.sigma})
    for name in names:
        (run / "semantics" / f"{name}.partial").unlink(missing_ok=True)


def _dissect(run: Path, name: str, cfg, progress: bool) -> None:
    from advinterp.analysis.dissection import dissect_model

    model = _load(run, name, cfg)
    probe = _probe(cfg, model)
    folder = run / "dissect" / name
    # dissect_model itself rebuilds a set made from another model, probe size or seed; a
    # killed stage resumes from the last finished chunk of each pass (FOLDER/*.partial).
    result = dissect_model(
        model,
        probe,
        layers=cfg.dissect_layers,
        adversarial=folder / "adversarial-set",
        attack_options=_attack_options(run, name, cfg),
        seed=cfg.seed,
        progress=progress,
        per_image=True,
        partials=folder,
    )
    _write_table1(result, folder, name, len(probe), cfg)


def _dissect_random(run: Path, arch: str, cfg, progress: bool, twin=None) -> None:
    """Table 1's floor: ``arch`` untrained (random weights drawn with seed 0) dissected on
    the same probe and layers, real images only. Network Dissection's paper reads its
    shares against the same control. ``twin()``, where given, builds that network (for a
    given model: :func:`_random_twin`)."""
    from advinterp.analysis.dissection import dissect_model
    from advinterp.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = (create_model(arch) if twin is None else twin()).eval()
    probe = _probe(cfg, model)
    folder = run / "dissect" / random_name(arch)
    result = dissect_model(
        model,
        probe,
        layers=cfg.dissect_layers,
        seed=cfg.seed,
        progress=progress,
        per_image=True,
        partials=folder,
    )
    _write_table1(result, folder, random_name(arch), len(probe), cfg)


def _write_table1(result, folder: Path, name: str, n_images: int, cfg) -> None:
    """A dissection stage's outputs: the tallies and Table 1, its bootstrap; then the
    passes' checkpoints go."""
    from advinterp.analysis.dissection import remove_partials, write_dissection

    write_dissection(result, folder, name=name)
    write_json(
        folder / "bootstrap.json", _table1_resamples(result, n_images, cfg.seed, cfg.draws or DRAWS)
    )
    remove_partials(folder)


def _table1_resamples(result, n_images: int, seed: int, draws: int | None = None) -> dict:
    """Table 1 on :data:`DRAWS` resamples of the probe images: per side, each resample's
    count of interpretable units per category (all dissected layers). The resamples
    depend only on the number of images and the seed, so every model on the same probe
    gets the same ones."""
    from advinterp.stats.bootstrap import resample_counts

    draws = draws or DRAWS
    weights = resample_counts(n_images, draws, seed)
    out = {
        "draws": draws,
        "seed": seed,
        "images": n_images,
        "units": sum(d.iou.shape[0] for d in result.real.values()),
        "categories": next(iter(result.real.values())).categories,
    }
    for side, layers in result.sides().items():
        counts = sum(_interpretable_resampled(d, weights) for d in layers.values())
        out[side] = counts.tolist()
    return out


#: Most IoU values (draws × units × labels) one resampling call holds in memory.
RESAMPLE_BLOCK = 50_000_000


def _interpretable_resampled(dissection, weights: torch.Tensor) -> torch.Tensor:
    """``dissection.interpretable_resampled(weights)``, over blocks of the draws when one call
    would hold more than :data:`RESAMPLE_BLOCK` IoU values (every unit of an ImageNet model
    against Broden's labels): each draw is resampled on its own, so the counts are the same."""
    iou = dissection.iou
    size = iou.shape[0] * iou.shape[-1]
    step = max(1, RESAMPLE_BLOCK // max(1, size))
    if step >= len(weights):
        return dissection.interpretable_resampled(weights)
    return torch.cat(
        [
            dissection.interpretable_resampled(weights[i : i + step])
            for i in range(0, len(weights), step)
        ]
    )


# -- the paper's claims, each judged on a 95% bootstrap interval ---------------------------

#: Bootstrap resamples behind every interval, and the intervals' level.
DRAWS = 2000
LEVEL = 0.95
#: The clean top-1 the paper's adversarially fine-tuned models give up: 1–5 points.
CLEAN_COST_POINTS = 5.0
HELD = {"holds": True, "fails": False, "undecided": None}


def verdict(low: float | None, high: float | None, bound: float = 0.0, above: bool = True) -> str:
    """Judge the claim "the quantity lies above ``bound``" (below it when ``above`` is False)
    on the quantity's interval ``[low, high]``: ``"holds"`` when the whole interval lies on
    the claim's side of ``bound`` (for a plain claim of an effect, ``bound`` is "no
    effect", 0), ``"fails"`` when none of it does, ``"undecided"`` when it straddles the
    bound or is unknown."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "undecided"
    if not above:
        low, high, bound = -high, -low, -bound
    if low > bound:
        return "holds"
    if high <= bound:
        return "fails"
    return "undecided"


@dataclass
class Evidence:
    """What the intervals resample, read from a run's stage outputs.

    ``probe``: model → side (``real``/``adversarial``) → ``B×K`` counts of interpretable
    units per category on ``B`` resamples of the probe images, the same resamples for every
    model (so models are compared image by image); ``probe_units``: model → units dissected.
    ``units``: model → column of ``units.csv`` (``lc``, ``cs1``, ``cs2``, ``cs1_successful``)
    → one value per unit. ``images``: model → measure (``clean``, ``fgsm``) → per test
    image, top-1 correct or not, on the same images for every model.
    """

    probe: dict = field(default_factory=dict)
    probe_units: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    draws: int = DRAWS
    seed: int = 0


def _interval(replicates) -> list[float | None]:
    from advinterp.stats.bootstrap import percentile_interval

    low, high = percentile_interval(replicates, LEVEL)
    return [None if math.isnan(low) else low, None if math.isnan(high) else high]


def _claim(text, estimate, replicates, bound=0.0, above=True, unit="", detail="") -> dict:
    low, high = _interval(replicates)
    v = verdict(low, high, bound, above)
    estimate = None if estimate is None or not math.isfinite(estimate) else float(estimate)
    return {
        "claim": text,
        "verdict": v,
        "held": HELD[v],
        "estimate": estimate,
        "interval": [low, high],
        "bound": bound,
        "above": above,
        "unit": unit,
        "detail": detail,
    }


def _with_floor(text: str, main: dict, floor_part: dict | None, detail: str, floor) -> dict:
    """A Table 1 claim: ``main`` alone, or with its part judged against the random floor."""
    if floor_part is None:
        return {**main, "claim": text, "detail": detail + "; resampled over probe images"}
    return _all_parts(
        text, [main, floor_part], detail + f", floor {floor:.1f}%; resampled over probe images"
    )


def _all_parts(text: str, parts: list[dict], detail: str = "") -> dict:
    """A claim made of parts: holds when every part holds, fails when one fails."""
    verdicts = [p["verdict"] for p in parts]
    v = (
        "fails"
        if "fails" in verdicts
        else "holds"
        if all(x == "holds" for x in verdicts)
        else "undecided"
    )
    first = parts[0]
    return {
        **first,
        "claim": text,
        "verdict": v,
        "held": HELD[v],
        "detail": detail,
        "parts": parts,
    }


def findings(
    summary: dict, arch: str, evidence: Evidence, adv: str | None = None, at: str | None = None
) -> list[dict]:
    """The paper's claims about ``arch`` and its fine-tuned models, each with its estimate,
    95% interval and verdict (:func:`verdict`): Table 1 shares resampled over the probe
    images, Fig. 10 slopes and mean CS1 over units, accuracies over test images.

    ``adv`` and ``at`` name the models judged as ``arch``'s adversarially fine-tuned one
    (consistency loss) and its plain adversarially trained one (default ``<arch>-Adv`` and
    ``<arch>-AT``; ``""``: none); only the claims whose models are in the summary are
    judged."""
    from advinterp.stats.bootstrap import resample_counts, weighted_mean, weighted_slope

    normal = arch
    adv = f"{arch}-Adv" if adv is None else adv
    at = f"{arch}-AT" if at is None else at
    t1 = summary["table1"]
    draws, seed = evidence.draws, evidence.seed
    out = []

    def share(model: str, side: str):
        """% of units interpretable (all categories): estimate and probe resamples."""
        reps = evidence.probe[model][side].double().sum(1) / evidence.probe_units[model]
        return sum(t1[model][side].values()), 100 * reps

    def unit_resamples(model: str, keys: Sequence[str]):
        """Per-unit values where every key is known, and the unit resamples of ``model``."""
        values = torch.stack([torch.as_tensor(evidence.units[model][k]).double() for k in keys])
        values = values[:, values.isfinite().all(0)]
        if values.shape[1] == 0:
            return values, None
        # Each model's units resampled on their own: its own seed, from its name.
        return values, resample_counts(values.shape[1], draws, seed + zlib.crc32(model.encode()))

    def mean_cs(model: str, key: str):
        values, counts = unit_resamples(model, [key])
        if counts is None:
            return float("nan"), torch.full((draws,), float("nan"))
        return float(values[0].mean()), weighted_mean(counts, values[0])

    def slope(model: str, key: str):
        values, counts = unit_resamples(model, ["lc", key])
        if counts is None:
            return float("nan"), torch.full((draws,), float("nan"))
        every = torch.ones(1, values.shape[1], dtype=torch.float64)
        return float(weighted_slope(every, *values)[0]), weighted_slope(counts, *values)

    image_counts = {}

    def accuracy(model: str, measure: str):
        """Top-1 % on the test images: estimate and image resamples (shared by models)."""
        correct = torch.as_tensor(evidence.images[model][measure]).float()
        n = len(correct)
        if n not in image_counts:
            image_counts[n] = resample_counts(n, draws, seed, dtype=torch.float32)
        return 100 * float(correct.mean()), 100 * weighted_mean(image_counts[n], correct)

    # Table 1: the drop on adversarial images, and how much of it the fine-tuning keeps,
    # read against the floor of the same network with random weights where it was dissected.
    floor_name = random_name(arch)
    has_floor = floor_name in t1 and floor_name in evidence.probe
    floor = None
    if has_floor:
        floor, floor_r = share(floor_name, "real")
    real, real_r = share(normal, "real")
    fooled, fooled_r = share(normal, "adversarial")
    drops = _claim(
        "the share drops (real − adversarial)",
        real - fooled,
        real_r - fooled_r,
        unit="points",
        detail=f"{real:.1f}% of units on real probe images, {fooled:.1f}% on adversarial ones",
    )
    text = f"{normal}: the share of interpretable units drops sharply on adversarial images"
    detail = f"{real:.1f}% of units on real probe images, {fooled:.1f}% on adversarial ones"
    sharp = None
    if has_floor:
        out.append(
            _claim(
                f"{normal}: on real images more units are interpretable than with random "
                "weights (the floor Table 1 is read against)",
                real - floor,
                real_r - floor_r,
                unit="points",
                detail=f"{real:.1f}% vs {floor:.1f}% for {floor_name}; resampled over probe images",
            )
        )
        sharp = _claim(
            "it loses more than half of its share above the random-weights floor "
            "((real + floor)/2 − adversarial)",
            (real + floor) / 2 - fooled,
            (real_r + floor_r) / 2 - fooled_r,
            unit="points",
            detail=f"floor {floor:.1f}% ({floor_name})",
        )
    out.append(_with_floor(text, drops, sharp, detail, floor))
    if adv in t1 and adv in evidence.probe:
        a_real, a_real_r = share(adv, "real")
        a_fooled, a_fooled_r = share(adv, "adversarial")
        keeps = a_fooled / a_real if a_real else float("nan")
        normal_keeps = fooled / real if real else float("nan")
        closer = _claim(
            f"it keeps more of its real-image share than {normal} (adversarial ÷ real, difference)",
            keeps - normal_keeps,
            a_fooled_r / a_real_r - fooled_r / real_r,
            detail=f"keeps {100 * keeps:.0f}%, {normal} keeps {100 * normal_keeps:.0f}%",
        )
        text = f"{adv}: the share stays close to the real-image share (closer than {normal}'s)"
        detail = (
            f"{a_real:.1f}% real, {a_fooled:.1f}% adversarial: keeps {100 * keeps:.0f}%, "
            f"{normal} keeps {100 * normal_keeps:.0f}%"
        )
        kept = None
        if has_floor:
            kept = _claim(
                "it keeps more than half of its share above the random-weights floor "
                "(adversarial − (real + floor)/2)",
                a_fooled - (a_real + floor) / 2,
                a_fooled_r - (a_real_r + floor_r) / 2,
                unit="points",
                detail=f"floor {floor:.1f}% ({floor_name})",
            )
        out.append(_with_floor(text, closer, kept, detail, floor))
        if at in t1:
            t_fooled, t_fooled_r = share(at, "adversarial")
            out.append(
                _claim(
                    f"{adv} vs {at}: more interpretable units on adversarial images (the "
                    "consistency loss over plain adversarial training)",
                    a_fooled - t_fooled,
                    a_fooled_r - t_fooled_r,
                    unit="points",
                    detail=f"{a_fooled:.1f}% vs {t_fooled:.1f}% of units on adversarial probe images",
                )
            )

    # Fig. 10: slopes against LC, and mean CS1.
    s1, s1_r = slope(normal, "cs1")
    out.append(
        _claim(
            f"{normal}: CS1 falls as LC rises (Fig. 10)",
            s1,
            s1_r,
            above=False,
            unit="slope",
            detail="least-squares slope of CS1 on LC over units; resampled over units",
        )
    )
    s2, s2_r = slope(normal, "cs2")
    out.append(
        _claim(
            f"{normal}: CS2 rises with LC (Fig. 10)",
            s2,
            s2_r,
            unit="slope",
            detail="least-squares slope of CS2 on LC over units; resampled over units",
        )
    )
    # Models compared on the adversarial images that fooled them (each unit's top 1% of
    # the successful ones), each attacked at the strength that fools most of its images.
    cs1 = {m: mean_cs(m, "cs1_successful") for m in (normal, adv, at) if m in evidence.units}
    for other, text in ((normal, f"above {normal}'s"), (at, f"above {at}'s")):
        if other not in cs1 or adv not in cs1:
            continue
        (a, a_r), (o, o_r) = cs1[adv], cs1[other]
        out.append(
            _claim(
                f"{adv}: CS1 stays high ({text}), on successful adversarial images",
                a - o,
                a_r - o_r,
                unit="CS1",
                detail=f"mean CS1 over units {a:.3f} vs {o:.3f}"
                + _strengths(summary, (adv, other))
                + "; each model's units resampled",
            )
        )

    # Table 2: robustness gained, and the clean accuracy it costs.
    if adv in evidence.images and normal in evidence.images:
        a_fgsm, a_fgsm_r = accuracy(adv, "fgsm")
        n_fgsm, n_fgsm_r = accuracy(normal, "fgsm")
        a_clean, a_clean_r = accuracy(adv, "clean")
        n_clean, n_clean_r = accuracy(normal, "clean")
        n_images = len(evidence.images[adv]["fgsm"])
        gain = _claim(
            "FGSM top-1 gain",
            a_fgsm - n_fgsm,
            a_fgsm_r - n_fgsm_r,
            unit="points",
            detail=f"{a_fgsm:.2f}% vs {n_fgsm:.2f}%",
        )
        cost = _claim(
            f"clean top-1 cost ≤ {CLEAN_COST_POINTS:g} points (the paper's 1–5)",
            n_clean - a_clean,
            n_clean_r - a_clean_r,
            bound=CLEAN_COST_POINTS,
            above=False,
            unit="points",
            detail=f"{a_clean:.2f}% vs {n_clean:.2f}%",
        )
        out.append(
            _all_parts(
                f"{adv}: FGSM (ε=4) top-1 well above {normal}'s, at a small clean cost",
                [gain, cost],
                f"FGSM top-1 {a_fgsm:.2f}% vs {n_fgsm:.2f}%; clean {a_clean:.2f}% vs "
                f"{n_clean:.2f}%; resampled over the {n_images} test images",
            )
        )
        # Stronger attacks: the gain is not an artefact of the attack it was trained on.
        for measure, label in (("pgd20", "PGD-20"), ("autoattack", "AutoAttack")):
            if measure not in evidence.images[adv] or measure not in evidence.images[normal]:
                continue
            a_acc, a_r = accuracy(adv, measure)
            n_acc, n_r = accuracy(normal, measure)
            n_images = len(evidence.images[adv][measure])
            out.append(
                _claim(
                    f"{adv}: {label} (ε=4) top-1 above {normal}'s",
                    a_acc - n_acc,
                    a_r - n_r,
                    unit="points",
                    detail=f"{a_acc:.1f}% vs {n_acc:.1f}% on the first {n_images} test "
                    "images; resampled over them",
                )
            )
    return out


def _strengths(summary: dict, models: Sequence[str]) -> str:
    """``" (opt λ=10, 99% fooled vs λ=100, 96%)"`` from the summary's attacks, if any."""
    attacks = summary.get("attacks") or {}
    if not all(m in attacks for m in models):
        return ""
    parts = [
        f"λ={attacks[m]['lam']:g}, {attacks[m]['steps']} steps, "
        f"{100 * attacks[m]['success_rate']:.0f}% fooled"
        for m in models
    ]
    return " (opt " + " vs ".join(parts) + ")"


def load_evidence(run: Path, names: Sequence[str], seed: int = 0) -> Evidence:
    """The resampling inputs of :func:`findings` from a run folder (see :class:`Evidence`)."""
    import csv

    from advinterp.analysis.semantics import CSV_COLUMNS
    from advinterp.io import read_state_dict

    evidence = Evidence(seed=seed)
    for name in names:
        path = run / "dissect" / name / "bootstrap.json"
        if path.is_file():
            data = read_json(path)
            evidence.probe[name] = {
                side: torch.tensor(data[side]) for side in ("real", "adversarial") if side in data
            }
            evidence.probe_units[name] = data["units"]
            evidence.draws = data["draws"]
    keys = [k for k in CSV_COLUMNS if k in ("lc", "cs1", "cs2", "cs1_successful")]
    with open(run / "semantics" / "units.csv", newline="") as f:
        for row in csv.DictReader(f):
            values = evidence.units.setdefault(row["model"], {k: [] for k in keys})
            for k in keys:
                values[k].append(float(row[k]) if row[k] not in ("", "nan") else math.nan)
    evidence.units = {
        m: {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}
        for m, cols in evidence.units.items()
    }
    for part in ("correct", "pgd", "autoattack"):
        path = run / "robustness" / f"{part}.safetensors"
        if path.is_file():
            for key, value in read_state_dict(path).items():
                model, measure = key.split("/")
                evidence.images.setdefault(model, {})[measure] = value.bool()
    return evidence


def _summary(run: Path, names, cfg, timings: dict, given: dict | None = None) -> dict:
    """``summary.json``'s dict. ``given`` (given models only): the models' roles, from
    :func:`_roles`, and the name of the normal model's random-weights floor."""
    table2 = read_json(run / "table2.json")
    semantics = read_json(run / "semantics" / "semantics.json")
    table1, fig10, mean_cs1 = {}, {}, {}
    for name in names:
        t = read_json(run / "dissect" / name / "table1.json")
        table1[name] = {"real": t["real"], "adversarial": t["adversarial"]}
        fig10[name] = semantics["models"][name]["fig10"]
        mean_cs1[name] = semantics["models"][name]["mean"]["cs1"]
    floors = [random_name(a) for a in cfg.archs] if given is None else given["floors"]
    for floor in floors:
        t = read_json(run / "dissect" / floor / "table1.json")
        table1[floor] = {"real": t["real"]}
    evidence = load_evidence(run, [*names, *floors], cfg.seed)
    table2 = {n: dict(table2[n]) for n in names}
    robust = read_json(run / "robustness" / "autoattack.json")
    for name in names:
        for measure in ("pgd20", "autoattack"):
            right = evidence.images.get(name, {}).get(measure)
            if right is not None:
                table2[name][f"{measure}_top1"] = 100 * float(right.float().mean())
    attacks = {}
    for name in names:
        strength = read_json(_strength_file(run, name))
        test = read_json(run / "adv" / f"{name}-opt" / "attack.json")
        probe = read_json(run / "dissect" / name / "table1.json").get("attack") or {}
        attacks[name] = {
            "method": "opt",
            "lam": strength["lam"],
            "keep": cfg.keep,
            "steps": strength["steps"],
            "success_rate": test["stats"]["success_rate"],
            "mean_l2": test["stats"]["mean_l2"],
            "images": test["n"],
            "probe_success_rate": probe.get("success_rate"),
            "probe_mean_l2": probe.get("mean_l2"),
            "strength_search": strength,
        }
    summary = {
        "models": names,
        "attacks": attacks,
        "table1": table1,
        "table2": table2,
        "robustness": {
            "eps": cfg.eps[0],
            "pgd": {"steps": PGD_STEPS, "images": cfg.pgd_images, "random_start": True},
            "autoattack": {
                "version": "standard",
                "images": robust.get("images", 0),
                "available": robust.get("available", False),
            },
            "note": "untargeted, true labels, top-1 %, on the first test images",
        },
        "fig10": fig10,
        "mean_cs1": mean_cs1,
        "paper": PAPER,
        "timings": timings,
        "total_seconds": sum(timings.values()),
        "settings": {
            k: v
            for k, v in asdict(cfg).items()
            if k != "extra" and not (k in GIVEN_SETTINGS and v in (None, ()))
        },
        "dissect_layers": list(cfg.dissect_layers),
        "gallery_layers": sorted(p.name for p in (run / "galleries").glob("*/*") if p.is_dir()),
        "verdicts": {
            "level": LEVEL,
            "draws": cfg.draws or DRAWS,
            "rule": "holds when the 95% interval lies beyond the bound (no effect, or the "
            "paper's limit) on the claim's side, fails when it lies on the other side, "
            "undecided when it straddles the bound",
        },
    }
    if given is None:
        summary["findings"] = [f for arch in cfg.archs for f in findings(summary, arch, evidence)]
        return summary
    summary["roles"] = given["roles"]
    by_role = {r["role"]: n for n, r in given["roles"].items()}
    summary["findings"] = findings(
        summary,
        by_role["normal"],
        evidence,
        adv=by_role.get("adv", ""),
        at=by_role.get("at", ""),
    )
    return summary


def format_summary(summary: dict) -> str:
    """The printed summary: Table 1 and 2 beside the paper's, then one line per claim."""
    from advinterp.analysis.dissection import format_table1
    from advinterp.metrics.accuracy import format_table2

    paper = summary["paper"]
    lines = ["Table 2 (%, FGSM untargeted):", format_table2(summary["table2"])]
    robust = summary.get("robustness", {})
    for measure, label, part in (
        ("pgd20", "PGD-20", "pgd"),
        ("autoattack", "AutoAttack", "autoattack"),
    ):
        values = {
            n: r[f"{measure}_top1"] for n, r in summary["table2"].items() if f"{measure}_top1" in r
        }
        if values:
            lines.append(
                f"{label} (ε={robust.get('eps', 4):g}) top-1 on the first "
                f"{robust.get(part, {}).get('images', '?')} test images: "
                + ", ".join(f"{n} {v:.2f}" for n, v in values.items())
            )
    lines.append(
        "paper, ResNet-18 on ImageNet: "
        + ", ".join(f"{k} {v:.2f}" for k, v in paper["table2"]["ResNet-18"].items())
    )
    table1 = {n: t for n, t in summary["table1"].items() if "adversarial" in t}
    lines += ["", "Table 1:", format_table1(table1)]
    for name, t in summary["table1"].items():
        if name not in table1:  # the random-weights floor: real images only
            lines.append(
                f"{name} (random weights, the floor): real "
                + " ".join(f"{k[:3]} {v:.1f}" for k, v in t["real"].items())
            )
    for name, row in paper["table1"].items():
        lines.append(
            f"paper, {name} on Broden: real "
            + " ".join(f"{k[:3]} {v:.1f}" for k, v in row["real"].items())
            + " | adversarial "
            + " ".join(f"{k[:3]} {v:.1f}" for k, v in row["adversarial"].items())
        )
    if summary.get("roles"):
        lines += ["", "Roles in the findings (given models, in --models order):"]
        lines += [f"- {n}: {r['description']} ({r['spec']})" for n, r in summary["roles"].items()]
    lines += ["", "The paper's findings on this data (estimate [95% interval]):"]
    for f in summary["findings"]:
        parts = f.get("parts") or [f]
        numbers = "; ".join(
            (f"{p['claim']}: " if len(parts) > 1 else "") + format_estimate(p) for p in parts
        )
        lines.append(f"- {f['claim']}: {f.get('verdict', f['held'])} — {numbers} ({f['detail']})")
    return "\n".join(lines)


def format_estimate(f: dict) -> str:
    """``+1.23 [0.45, 2.01] points`` — a finding's estimate, interval and unit; the bound
    too when it is not 0 (``≤ 5``)."""

    def num(v) -> str:
        return "n/a" if v is None else f"{v:+.3g}" if abs(v) < 1 else f"{v:+.2f}"

    low, high = f.get("interval") or (None, None)
    text = f"{num(f.get('estimate'))} [{num(low)}, {num(high)}]"
    if f.get("unit"):
        text += f" {f['unit']}"
    if f.get("bound"):
        text += f" ({'>' if f.get('above', True) else '<'} {f['bound']:g})"
    return text
