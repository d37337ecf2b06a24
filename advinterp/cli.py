"""Command line: one verb per stage, a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from advinterp.errors import UserError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint (DIR/model.safetensors from `advinterp train`) or an ImageNet "
        "model name (efficientnet_lite0, or a torchvision/timm name with --weights)",
    )
    p.add_argument("--weights", help=_weights_help())
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (default: CUDA when available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--amp", action="store_true", help="mixed precision (autocast) on CUDA; no effect on a CPU"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes decoding image folders and probes (default min(4, CPUs); "
        "in-memory sets need none)",
    )


def _device(args):
    """``--device`` and ``--workers`` checked: ``(torch.device, workers)``."""
    from advinterp.device import default_workers, resolve_device

    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 (decode in this process) or more, got {args.workers}")
    return resolve_device(args.device), default_workers() if args.workers is None else args.workers


def _weights_help() -> str:
    from advinterp.models import WEIGHTS_HELP

    return WEIGHTS_HELP


def _attack_names() -> list[str]:
    from advinterp.attacks import ATTACKS

    return list(ATTACKS)


def _data_help() -> str:
    from advinterp.data.specs import dataset_names

    names = [n for n in dataset_names() if n != "imagenet"]
    return f"{names[0]} (default) or " + " or ".join(names[1:])


def _data_args(p: argparse.ArgumentParser, split: str = "test") -> None:
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help=_data_help() + " (folders named by wnid, e.g. ImageNet's val/n01440764/...)",
    )
    p.add_argument(
        "--data-root",
        help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--split", default=split, choices=("train", "test"))
    p.add_argument("--limit", type=_positive_int, help="use only the first N images")


def _training_data_args(p: argparse.ArgumentParser, eval_limit: int | None) -> None:
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist (default) or imagefolder:PATH, a train split in ImageNet's layout "
        "(PATH/<wnid>/<image>.JPEG), streamed from disk",
    )
    p.add_argument(
        "--data-root",
        help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--limit", type=_positive_int, help="train on the first N training images only")
    p.add_argument(
        "--eval-data",
        help="held-out images for the per-epoch accuracy (default: fashion-mnist's test split; "
        "none for an image folder unless given, e.g. imagefolder:/data/imagenet/val)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=eval_limit,
        help="held-out images for the per-epoch accuracy"
        + ("" if eval_limit is None else f" (default {eval_limit})"),
    )


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return n


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other error: one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"advinterp: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="advinterp",
        description="Interpretability analysis of deep networks with adversarial examples "
        "(Dong, Su & Zhu 2022).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="standard training of a model (SGD, the paper's settings)")
    p.add_argument(
        "--arch",
        default="resnet",
        help="on fashion-mnist: resnet (default), alexnet, vgg16, resnet18 (28×28 variants); "
        "with --weights or on an image folder: an ImageNet model (resnet18, efficientnet_lite0, "
        "any torchvision/timm name)",
    )
    p.add_argument(
        "--weights",
        help="weights of the ImageNet --arch to start from: a file (fine-tuning), 'imagenet' "
        "(local cache, else downloaded) or 'random' (from scratch)",
    )
    p.add_argument("--out", required=True, help="output folder (model.safetensors, model.json)")
    p.add_argument("--epochs", type=_positive_int, default=4)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=128,
        help="global batch; under torchrun --nproc-per-node N, split over the N processes",
    )
    p.add_argument(
        "--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule"
    )
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--shift",
        type=int,
        default=1,
        help="fashion-mnist: random shifts of up to N pixels (image folders get ImageNet's "
        "RandomResizedCrop)",
    )
    p.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    p.add_argument("--seed", type=int, default=0)
    _training_data_args(p, eval_limit=None)
    _device_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run from its last epoch"
    )

    p = sub.add_parser(
        "advtrain",
        help="adversarial fine-tuning with the feature-consistency loss (eq. 5–9); "
        "--beta 0 is plain adversarial training",
    )
    p.add_argument(
        "--init",
        required=True,
        help="model to start from: a normally trained checkpoint, or an ImageNet model name "
        "with --weights (the paper fine-tunes a pretrained ImageNet model)",
    )
    p.add_argument("--weights", help="weights of an --init given by name: " + _weights_help())
    p.add_argument("--out", required=True, help="output folder (model.safetensors, model.json)")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=128,
        help="global batch; under torchrun --nproc-per-node N, split over the N processes",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=0.003,
        help="peak one-cycle learning rate (docs/advtrain-recipe.md)",
    )
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the clean loss (eq. 5)")
    p.add_argument(
        "--beta", type=float, default=1.0, help="weight of the consistency term; 0: plain AT"
    )
    p.add_argument(
        "--consistency",
        choices=("relative", "mean", "sum"),
        default="relative",
        help="the term's scale: ‖φ(x)−φ(x_adv)‖² relative to ‖φ(x)‖² (default; the same for "
        "every architecture), per feature, or summed (the paper's eq. as written)",
    )
    p.add_argument("--eps-min", type=float, default=4.0, help="FGSM ε range, 0–255 units")
    p.add_argument("--eps-max", type=float, default=16.0)
    p.add_argument(
        "--phi", default="penultimate", help="features to pair: penultimate, logits or a layer"
    )
    p.add_argument("--seed", type=int, default=0)
    _training_data_args(p, eval_limit=1000)
    _device_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run from its last epoch"
    )

    p = sub.add_parser(
        "evaluate",
        help="Table 2: clean and FGSM top-1/top-5 accuracy",
        description="Table 2: clean and FGSM top-1/top-5 accuracy. "
        + _sharded_description(
            "evaluate", "table2.partial (with --out)", "prints and writes table2.json"
        ),
    )
    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--eps", type=float, nargs="+", default=[4.0], help="FGSM ε in 0–255 units (default 4)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=250)
    _chunk_arg(p)
    p.add_argument(
        "--out",
        help="write table2.json into this folder (and checkpoint the counts there while "
        "running, so a killed run resumes)",
    )

    p = sub.add_parser(
        "attack", help="build an adversarial set: fgsm, bim, pgd, mifgsm, opt (eq. 4)"
    )
    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--method", default="opt", help=f"one of {', '.join(_attack_names())} (default opt)"
    )
    p.add_argument(
        "--eps", type=float, help="L∞ budget in 0–255 units (fgsm/bim/pgd/mifgsm; default 4)"
    )
    p.add_argument(
        "--targeted", action="store_true", help="aim at a target class (opt is always targeted)"
    )
    p.add_argument(
        "--target",
        default="least-likely",
        help="least-likely (default), random, or a class index for every image",
    )
    p.add_argument("--steps", type=_positive_int, help="iterations (bim, pgd, mifgsm, opt)")
    p.add_argument("--lam", type=float, help="λ of eq. 4 (opt)")
    p.add_argument(
        "--keep",
        choices=("final", "closest"),
        help="opt: return the final Adam iterate (eq. 4 as written, the default) or the "
        "closest one that fools the model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--out", required=True, help="output folder for the adversarial set")
    p.add_argument("--resume", action="store_true", help="keep finished chunks of a killed run")

    p = sub.add_parser("layers", help="list a model's recordable layers with output shapes")
    p.add_argument(
        "model",
        help="a checkpoint, or a name: resnet, alexnet, vgg16, resnet18 (the 28×28 variants "
        "`advinterp train --arch` builds; with --weights the ImageNet ones), efficientnet_lite0, "
        "googlenet, inception_v3 or any torchvision/timm name",
    )
    p.add_argument(
        "--weights",
        help="weights of a named model (only shapes are listed, so any name works without)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--conv", action="store_true", help="only convolution layers")
    which.add_argument(
        "--units",
        action="store_true",
        help="only where units are read by default (after batch norm and ReLU; "
        "relu#1 is a module's first call in a pass)",
    )
    _analysis_parsers(sub)

    p = sub.add_parser(
        "report", help="static HTML report of a run directory (opens from disk, no server)"
    )
    p.add_argument("run", help="run directory written by `advinterp reproduce --out RUN`")
    p.add_argument("--out", help="output folder (default RUN/report)")
    return parser


def _version() -> str:
    from advinterp import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return COMMANDS[args.verb](args) or 0
    except UserError as e:
        print(f"advinterp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            "advinterp: interrupted; finished work is kept (run the same command again: "
            "training verbs take --resume, the others pick up what they wrote)",
            file=sys.stderr,
        )
        return 130


def _new_model_folder(out: str, resume: bool) -> Path:
    """``--out`` for a training verb: a folder holding a model needs ``--resume``."""
    out = Path(out)
    if not resume and (out / "model.json").exists():
        raise UserError(
            f"{out} already holds a model: pass --resume to continue it or choose another --out"
        )
    return out


def cmd_train(args) -> int:
    from advinterp.distributed import is_main_process
    from advinterp.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        shift=args.shift,
        flip=not args.no_flip,
        seed=args.seed,
        data=args.data,
        data_root=args.data_root,
        limit=args.limit,
        eval_limit=args.eval_limit,
        weights=args.weights,
        eval_data=args.eval_data,
    )
    device, workers = _device(args)
    out = _new_model_folder(args.out, args.resume)
    result = train(cfg, out, resume=args.resume, device=device, workers=workers, amp=args.amp)
    if not is_main_process():  # under torchrun, process 0 speaks for all
        return 0
    print(
        f"{_held_out(result['history'][-1])} after {cfg.epochs} epochs "
        f"({result['train_seconds']:.0f}s of training); model written to {out / 'model.safetensors'}"
    )
    return 0


def _held_out(last: dict) -> str:
    """The last epoch's accuracy, held-out when there were held-out images."""
    if last["test_top1"] is None:
        return f"train top-1 {last['train_top1']:.2f}% (no --eval-data)"
    fgsm = last.get("test_fgsm4_top1")
    return f"test top-1 {last['test_top1']:.2f}%" + (
        "" if fgsm is None else f", FGSM ε=4 top-1 {fgsm:.2f}%"
    )


def cmd_advtrain(args) -> int:
    from advinterp.advtrain import AdvTrainConfig, advtrain
    from advinterp.distributed import is_main_process

    cfg = AdvTrainConfig(
        init=args.init,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        beta=args.beta,
        consistency=args.consistency,
        eps_min=args.eps_min / 255,
        eps_max=args.eps_max / 255,
        phi=args.phi,
        seed=args.seed,
        data=args.data,
        data_root=args.data_root,
        limit=args.limit,
        eval_limit=args.eval_limit,
        weights=args.weights,
        eval_data=args.eval_data,
    )
    device, workers = _device(args)
    out = _new_model_folder(args.out, args.resume)
    result = advtrain(cfg, out, resume=args.resume, device=device, workers=workers, amp=args.amp)
    if not is_main_process():  # under torchrun, process 0 speaks for all
        return 0
    print(
        f"{result['name']}: {_held_out(result['history'][-1])} after {cfg.epochs} epochs; "
        f"model written to {out / 'model.safetensors'}"
    )
    return 0


def _open_data(args, model):
    from advinterp.data import open_dataset

    return open_dataset(args.data, args.split, args.data_root, limit=args.limit, model=model)


def _check_eps(values: list[float]) -> None:
    for eps in values:
        if not 0 < eps <= 255:
            raise UserError(
                f"--eps {eps:g} is outside (0, 255]: give ε in 0–255 pixel units, e.g. --eps 4"
            )


def cmd_evaluate(args) -> int:
    from advinterp.device import autocast
    from advinterp.distributed import joined
    from advinterp.io import out_folder, write_json
    from advinterp.metrics.accuracy import format_table2, table2
    from advinterp.models import load_model

    _check_eps(args.eps)
    device, workers = _device(args)
    model = load_model(args.model, args.weights).to(device)
    data = _open_data(args, model)
    # Under torchrun each process evaluates its share of the batches (see table2).
    with joined() as world:
        out = Path(args.out) if args.out else None
        if out is not None and world.is_main:
            out_folder(out)
        partial = out / "table2.partial" if out is not None else None
        with autocast(device, args.amp):
            row = table2(
                model,
                data,
                eps=[e / 255 for e in args.eps],
                batch_size=args.batch_size,
                progress=True,
                workers=workers,
                world=world,
                partial=partial,
                chunk=args.chunk,
            )
        if not world.is_main:  # process 0 speaks for all
            return 0
    name = getattr(model, "config", {}).get("name", args.model)
    print(format_table2({name: row}))
    if out is not None:
        write_json(out / "table2.json", {name: row})
        partial.unlink(missing_ok=True)
        print(f"written to {out / 'table2.json'}")
    return 0


def cmd_attack(args) -> int:
    from advinterp.attacks.advset import build_adversarial_set
    from advinterp.device import autocast
    from advinterp.distributed import joined
    from advinterp.models import load_model

    if args.method not in _attack_names():
        raise UserError(
            f"unknown attack method {args.method!r}: choose from {', '.join(_attack_names())}"
        )
    _check_eps([] if args.eps is None else [args.eps])
    target = args.target
    if target not in ("least-likely", "random"):
        try:
            target = int(target)
        except ValueError:
            raise UserError(
                f"unknown target {target!r}: use least-likely, random or a class index"
            ) from None
    device, workers = _device(args)
    model = load_model(args.model, args.weights).to(device)
    if isinstance(target, int) and not 0 <= target < model.num_classes:
        raise UserError(f"target class {target} is outside 0..{model.num_classes - 1}")
    data = _open_data(args, model)
    options = (("steps", args.steps), ("lam", args.lam), ("keep", args.keep))
    kwargs = {k: v for k, v in options if v is not None}
    t0 = time.perf_counter()
    # Under torchrun each process attacks its share of the chunks (see build_adversarial_set).
    with joined() as world, autocast(device, args.amp):
        meta = build_adversarial_set(
            model,
            data,
            Path(args.out),
            method=args.method,
            eps=None if args.eps is None else args.eps / 255,
            targeted=args.targeted or args.method == "opt",
            target=target,
            seed=args.seed,
            batch_size=args.batch_size,
            resume=args.resume,
            model_spec=args.model,
            workers=workers,
            **kwargs,
        )
    if not world.is_main:  # process 0 speaks for all
        return 0
    s = meta["stats"]
    print(
        f"{args.method}: success {100 * s['success_rate']:.1f}%, mean L2 {s['mean_l2']:.4f}, "
        f"mean L∞ {s['mean_linf'] * 255:.2f}/255 over {s['attacked']} images"
        + (
            f" ({meta['n'] - s['attacked']} undecodable skipped)"
            if meta["n"] > s["attacked"]
            else ""
        )
        + f" ({time.perf_counter() - t0:.0f}s); written to {args.out}"
    )
    return 0


def cmd_layers(args) -> int:
    from advinterp.models import (
        SMALL_ARCHS,
        checkpoint_config,
        create_model,
        layer_shapes,
        load_model,
    )

    is_name = checkpoint_config(args.model) is None and not Path(args.model).suffix
    if is_name and args.model in SMALL_ARCHS and args.weights is None:
        model = create_model(args.model)
    elif is_name:
        # Listing shapes needs no trained weights: a bare name is built untrained.
        model = load_model(args.model, args.weights or "random")
    else:
        model = load_model(args.model, args.weights)
    print(
        f"# {args.model}: {model.in_chans}×{model.input_size}×{model.input_size} input, "
        f"{model.num_classes} classes",
        file=sys.stderr,
    )
    rows = layer_shapes(model)
    if args.conv:
        rows = [r for r in rows if r[1] == "Conv2d"]
    if args.units:
        import torch

        from advinterp.record import Recorder, unit_layers

        names = unit_layers(model)
        with Recorder(model, names, reduce=None) as rec, torch.inference_mode():
            rec(torch.zeros(1, model.in_chans, model.input_size, model.input_size))
        kinds = {r[0]: r[1] for r in rows}
        rows = [
            (n, kinds.get(n.partition("#")[0], ""), tuple(rec.responses[n].shape[1:]))
            for n in names
        ]
    width = max(len(r[0]) for r in rows)
    for name, kind, shape in rows:
        print(f"{name:<{width}}  {kind:<20} {'×'.join(map(str, shape))}")
    return 0


def _analysis_parsers(sub) -> None:
    p = sub.add_parser(
        "topk",
        help="unit galleries (Fig. 2): top-8 real vs adversarial images with salient regions",
        description="Unit galleries (Fig. 2): top-8 real vs adversarial images with salient "
        "regions. "
        + _sharded_description(
            "topk",
            "topk.partial",
            "writes the galleries; the saliency maps are split between the processes too",
        ),
    )
    _model_args(p)
    p.add_argument(
        "--adversarial",
        required=True,
        help="adversarial set folder written by `advinterp attack` for this model",
    )
    p.add_argument("--layer", required=True, help="layer name (`advinterp layers CKPT --conv`)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--units", type=int, nargs="+", help="unit (channel) indices to show")
    which.add_argument(
        "--select",
        default="lc",
        help="lc (default: the units with the highest LC, eq. 11) or random",
    )
    p.add_argument("--count", type=_positive_int, default=8, help="units to select (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of --select random")
    p.add_argument(
        "--saliency",
        default="discrepancy",
        help="discrepancy (default: occlusion maps of Zhou et al. 2015) or activation "
        "(the unit's upsampled map, cheaper)",
    )
    p.add_argument("--k", type=_positive_int, default=8, help="images per row (default 8)")
    p.add_argument("--patch", type=_positive_int, help="occlusion patch side (default 5 on 28×28)")
    p.add_argument("--stride", type=_positive_int, help="occlusion stride (default 2 on 28×28)")
    p.add_argument(
        "--box-distance",
        type=float,
        default=2.0,
        help="box adversarial images predicted within this WordNet distance of the real "
        "images' class (default 2)",
    )
    _semantic_args(p)
    _chunk_arg(p)
    p.add_argument("--out", required=True, help="output folder (unit_NNNN.png, gallery.json)")

    p = sub.add_parser(
        "semantics",
        help="LC, CS1, CS2 per unit over all conv layers; Fig. 10 curves",
        description="LC, CS1, CS2 per unit (eq. 11-13); Fig. 10 curves. "
        + _sharded_description(
            "semantics", "semantics.<i>.partial", "writes units.csv, fig10.png and the JSON"
        ),
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="checkpoint or ImageNet model name; repeat --model/--adversarial pairs to put "
        "several models on one plot",
    )
    p.add_argument(
        "--weights",
        action="append",
        help="weights of a --model given by name (one per --model, in order; 'none' for a "
        "checkpoint): " + _weights_help(),
    )
    p.add_argument(
        "--adversarial",
        action="append",
        required=True,
        help="adversarial set of the --model at the same position",
    )
    p.add_argument("--name", action="append", help="name of each model in the plot and tables")
    p.add_argument(
        "--layers",
        nargs="+",
        default=["units"],
        help='layer names (relu#1: a module\'s first call in a pass), "units" (default: every '
        "unit where the network uses it, after batch norm and ReLU; `advinterp layers MODEL "
        '--units` lists them) or "conv" (every conv layer\'s raw output)',
    )
    p.add_argument("--bins", type=_positive_int, default=10, help="LC bins of Fig. 10")
    p.add_argument(
        "--fraction", type=float, default=0.01, help="top share of images per unit (default 1%%)"
    )
    p.add_argument("--reduce", default="max", help="a unit's response: max (default) or mean")
    _semantic_args(p)
    _device_args(p)
    _chunk_arg(p)
    p.add_argument("--out", required=True, help="output folder (units.csv, fig10.png, JSON)")

    p = sub.add_parser(
        "reproduce",
        help="the whole paper on the embedded data: Tables 1-2, Fig. 10, galleries, report",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run folder (summary.json, report/, ...); the same command again resumes a "
        "killed run, skipping finished stages",
    )
    p.add_argument(
        "--archs",
        help="comma-separated architectures (default resnet; alexnet,vgg16,resnet18 allowed)",
    )
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--model",
        help="analyse this model instead of training one: a checkpoint (advinterp train/"
        "advtrain's model.safetensors) or an ImageNet model name (efficientnet_lite0, or "
        "resnet18 ... with --weights); no training, every analysis stage",
    )
    given.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="compare given models (checkpoints, or names such as efficientnet_lite0, or "
        "resnet18 with its --weights entry), one row and one Fig. 10 curve each; the findings "
        "judge them in this order as the normal model, -Adv (consistency loss) and -AT",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="W",
        help="weights of the given models, one per --model/--models entry in order: a "
        ".pth/.safetensors file (or imagenet, random) for a model given by name, - for none "
        "(a checkpoint holds its own; a name loads its cached or shipped weights), e.g. "
        "--models runs/a/model.safetensors resnet18 --weights - r18.pth",
    )
    p.add_argument(
        "--data",
        help="test images of given models: imagefolder:PATH (PATH/<wnid>/*.JPEG) or "
        "fashion-mnist (default)",
    )
    p.add_argument(
        "--probe",
        help="Broden-format probe folder (broden1_224, ...) for Table 1 of given models "
        "(default fashion-broden, the embedded probe; needed with --data imagefolder:)",
    )
    p.add_argument(
        "--train-data",
        help="with --model: fine-tune its -Adv and -AT on these images (imagefolder:PATH or "
        "fashion-mnist) with advtrain, then analyse all three",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        help="test images of Table 2; also caps the images of the attacks (strength search, "
        "opt sets, PGD, AutoAttack)",
    )
    p.add_argument(
        "--probe-size",
        type=_positive_int,
        help="probe images of Table 1 (default 3000; 300 --quick)",
    )
    p.add_argument(
        "--attack-images",
        type=_positive_int,
        help="test images of the opt sets behind Fig. 10 and the galleries (default 4000)",
    )
    p.add_argument(
        "--steps", type=_positive_int, help="Adam steps of the opt attack (default 20, the paper's)"
    )
    p.add_argument(
        "--adv-limit",
        type=_positive_int,
        help="training images of each fine-tuning (--train-data; default 30000)",
    )
    p.add_argument(
        "--draws",
        type=_positive_int,
        help="bootstrap resamples behind each finding's 95%% interval (default 2000)",
    )
    p.add_argument(
        "--dissect-layers",
        nargs="+",
        metavar="LAYER",
        help='layers of Table 1: "units" (every unit where the network uses it; `advinterp '
        'layers MODEL --units` lists them; the default for 28² models), "stages" (the last '
        "two stages, e.g. layer3 layer4: the default for larger given models) or names",
    )
    p.add_argument(
        "--saliency",
        choices=("discrepancy", "activation"),
        default="discrepancy",
        help="galleries' heat maps: discrepancy (Zhou et al. 2015, default) or activation "
        "(the unit's map, far cheaper at 224²)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer images and epochs, same stages (≈3 min)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of training, attacks and the probe (0)"
    )
    p.add_argument(
        "--keep",
        choices=("final", "closest"),
        default="final",
        help="the opt attack's image: its final Adam iterate (eq. 4 as written, default) or "
        "the closest one that fools the model",
    )
    p.add_argument(
        "--lam",
        type=float,
        help="one λ of eq. 4 for every model, 20 steps (default: per model, the first of 10, "
        "30, 100, 300 whose attack fools ≥ 95%% of the images, then 40 and 80 steps at 300)",
    )
    p.add_argument(
        "--sigma", type=float, default=1.0, help="σ of eq. 10 for LC, CS1 and CS2 (default 1)"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="then rerun the analysis, reusing the models (trained or given) and Table 2, at "
        "λ = 1 and 10 (20 steps, or --steps) and σ = 0.5 and 2, and report each claim's "
        "verdict per setting (RUN/sweep.json)",
    )
    p.add_argument(
        "--data-root",
        help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    )

    p = sub.add_parser(
        "dissect",
        help="Network Dissection on a Broden-format probe, real vs adversarial (Table 1)",
        description="Network Dissection (Bau et al. 2017) on a Broden-format probe, on its "
        "real images and, with --adversarial, on their opt adversarial versions (Table 1). "
        + _sharded_description(
            "dissect",
            "{real,adversarial}.partial",
            "writes the tallies and Table 1 (with --adversarial each process attacks its "
            "share of the probe's chunks too)",
        ),
    )
    _model_args(p)
    p.add_argument(
        "--probe",
        default="fashion-broden",
        help="fashion-broden (default: the embedded probe, written to the cache on first use) "
        "or a Broden folder (broden1_224, ... holding index.csv)",
    )
    p.add_argument(
        "--probe-size", type=_positive_int, default=3000, help="images of fashion-broden (3000)"
    )
    p.add_argument("--probe-seed", type=int, default=0, help="seed of fashion-broden (0)")
    p.add_argument("--categories", nargs="+", help="probe categories to score (default: all)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N probe images")
    p.add_argument(
        "--layer",
        nargs="+",
        help="layers to dissect, each giving C×H×W maps (default stages: the last two stages, "
        'e.g. layer3 layer4 of ResNet-18; "units": every unit where the network uses it; '
        "`advinterp layers MODEL [--units]` lists them)",
    )
    p.add_argument(
        "--adversarial",
        action="store_true",
        help="also attack every probe image (opt, least-likely target) and dissect those",
    )
    p.add_argument(
        "--iou-threshold",
        type=float,
        default=0.04,
        help="a unit is interpretable when its best IoU exceeds this (0.04, NetDissect's; "
        "the paper's text says 0.4)",
    )
    p.add_argument(
        "--quantile", type=float, default=0.995, help="per-unit threshold quantile (0.995)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=100, help="images per forward pass (100)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (0)")
    _chunk_arg(p)
    p.add_argument(
        "--out",
        required=True,
        help="output folder (tally CSVs, table1.json/png; the adversarial set in "
        "OUT/adversarial-set, reused for the same model and probe); a later dissection "
        "into it replaces the tallies of this one",
    )


def _sharded_description(verb: str, partial: str, writes: str) -> str:
    return (
        f"On several processes: torchrun --nproc-per-node N -m advinterp {verb} ... (the same "
        "arguments; gloo on CPUs, NCCL with one GPU per process): each process reads its "
        f"share of the batches, the statistics are merged (the results equal one process's) "
        f"and process 0 {writes}. While it runs, OUT/{partial} holds the statistics of the "
        "finished chunks of images: the same command run again after a kill resumes from "
        "there, on any number of processes."
    )


def _chunk_arg(p: argparse.ArgumentParser) -> None:
    from advinterp.tally import CHUNK_IMAGES

    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=CHUNK_IMAGES,
        help=f"images between checkpoints of the statistics (default {CHUNK_IMAGES}); "
        "at most this much work is lost when a run is killed",
    )


def _semantic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sigma", type=float, default=1.0, help="σ of eq. 10 (default 1)")
    p.add_argument(
        "--synsets", help="class→WordNet id file (one 'name<TAB>wnid' a line, in class order)"
    )
    p.add_argument(
        "--data", help="dataset the sets were made from (default: the one attack.json names)"
    )
    p.add_argument("--split", choices=("train", "test"), help="split of --data")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files")
    p.add_argument(
        "--batch-size", type=_positive_int, default=128, help="images per forward pass (128)"
    )


def _class_wnids(args, model) -> list[str] | None:
    if not args.synsets:
        return model.wnids
    from advinterp.metrics.wordnet import read_synset_file

    wnids = [w for _, w in read_synset_file(args.synsets)]
    if len(wnids) != model.num_classes:
        raise UserError(
            f"{args.synsets} lists {len(wnids)} classes but the model has {model.num_classes}"
        )
    return wnids


def cmd_topk(args) -> int:
    from advinterp.analysis import open_paired_sets, unit_galleries, write_galleries
    from advinterp.device import autocast
    from advinterp.distributed import joined
    from advinterp.metrics.wordnet import class_distance_matrix
    from advinterp.models import load_model

    if args.sigma <= 0:
        raise UserError(f"--sigma must be positive, got {args.sigma:g}")
    device, workers = _device(args)
    model = load_model(args.model, args.weights).to(device)
    wnids = _class_wnids(args, model)
    pairs = open_paired_sets(
        model, args.adversarial, args.data, args.split, args.data_root, workers=workers
    )
    options = {k: v for k, v in (("patch", args.patch), ("stride", args.stride)) if v}
    if options and args.saliency != "discrepancy":
        raise UserError("--patch and --stride apply to --saliency discrepancy only")
    out = Path(args.out)
    # Under torchrun each process records its share of the batches (see unit_galleries).
    with joined() as world, autocast(device, args.amp):
        galleries = unit_galleries(
            model,
            pairs,
            args.layer,
            units=args.units,
            select=args.select,
            count=args.count,
            seed=args.seed,
            k=args.k,
            saliency=args.saliency,
            distances=class_distance_matrix(wnids) if wnids else None,
            sigma=args.sigma,
            box_distance=args.box_distance,
            batch_size=args.batch_size,
            progress=True,
            world=world,
            partial=out / "topk.partial",
            chunk=args.chunk,
            **options,
        )
    if not world.is_main:  # process 0 speaks for all
        return 0
    data = write_galleries(
        galleries, out, extra={"model": args.model, "adversarial": str(args.adversarial)}
    )
    (out / "topk.partial").unlink(missing_ok=True)
    for unit in data["units"]:
        lc = "" if unit["lc"] is None else f", LC {unit['lc']:.2f}"
        print(
            f"unit {unit['unit']}: real images mostly {unit['real_class_name']} "
            f"({unit['real_class_count']}/{len(unit['real'])}){lc}; "
            f"{unit['boxed']}/{len(unit['adversarial'])} adversarial images boxed"
        )
    s = galleries.attack
    print(
        f"{len(data['units'])} galleries of {galleries.layer} "
        f"({s['method']}: success {100 * s['success_rate']:.1f}%) written to {out}"
    )
    return 0


def _model_names(specs: list[str], models: list, names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(specs):
            raise UserError(f"give one --name per --model ({len(specs)}), got {len(names)}")
        if len(set(names)) != len(names):
            raise UserError("--name values must differ")
        return names
    out = [getattr(m, "config", {}).get("name") or s for s, m in zip(specs, models, strict=True)]
    if len(set(out)) != len(out):
        # Same architecture twice: tell the models apart by their checkpoint folders.
        out = [f"{n} ({Path(s).parent.name or s})" for n, s in zip(out, specs, strict=True)]
    if len(set(out)) != len(out):
        out = [f"{n} #{i + 1}" for i, n in enumerate(out)]
    return out


def cmd_semantics(args) -> int:
    from advinterp.analysis import model_semantics, open_paired_sets, write_semantics
    from advinterp.device import autocast
    from advinterp.distributed import joined
    from advinterp.metrics.wordnet import similarity_matrix
    from advinterp.models import load_model

    if len(args.model) != len(args.adversarial):
        raise UserError(
            f"give one --adversarial per --model: got {len(args.model)} models and "
            f"{len(args.adversarial)} adversarial sets"
        )
    if args.sigma <= 0:
        raise UserError(f"--sigma must be positive, got {args.sigma:g}")
    if not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {args.fraction:g}")
    if args.reduce not in ("max", "mean"):
        raise UserError(f"unknown --reduce {args.reduce!r}: use max or mean")
    weights = args.weights or [None] * len(args.model)
    if len(weights) != len(args.model):
        raise UserError(
            f"give one --weights per --model ({len(args.model)}), got {len(weights)}: "
            "write --weights none for a checkpoint"
        )
    weights = [None if w in (None, "none") else w for w in weights]
    device, workers = _device(args)
    models = [load_model(spec, w).to(device) for spec, w in zip(args.model, weights, strict=True)]
    names = _model_names(args.model, models, args.name)
    layers = args.layers[0] if args.layers in (["units"], ["conv"]) else args.layers
    out = Path(args.out)
    partials = [out / f"semantics.{i}.partial" for i in range(len(models))]
    results, extra = [], {}
    # Under torchrun each process records its share of the batches (see model_semantics).
    with joined() as world:
        for spec, adv, name, model, partial in zip(
            args.model, args.adversarial, names, models, partials, strict=True
        ):
            wnids = _class_wnids(args, model)
            if not wnids:
                raise UserError(
                    f"model {spec} has no WordNet synsets for its classes: pass --synsets FILE"
                )
            pairs = open_paired_sets(
                model, adv, args.data, args.split, args.data_root, workers=workers
            )
            with autocast(device, args.amp):
                result = model_semantics(
                    model,
                    pairs,
                    similarity_matrix(wnids, args.sigma),
                    layers=layers,
                    fraction=args.fraction,
                    reduce=args.reduce,
                    batch_size=args.batch_size,
                    name=name,
                    progress=True,
                    world=world,
                    partial=partial,
                    chunk=args.chunk,
                )
            results.append(result)
            extra[name] = {"model": spec, "adversarial": str(adv)}
            if world.is_main:  # process 0 speaks for all
                _print_semantics(result, args.bins)
    if not world.is_main:
        return 0
    write_semantics(results, out, bins=args.bins, extra=extra, settings={"sigma": args.sigma})
    for partial in partials:
        partial.unlink(missing_ok=True)
    print(f"written to {out / 'units.csv'}, {out / 'fig10.png'} and {out / 'semantics.json'}")
    return 0


def _print_semantics(result, bins: int) -> None:
    summary = result.summary(bins)
    m, s = summary["mean"], result.attack

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    l2 = "" if s["mean_l2"] is None else f", mean L2 {s['mean_l2']:.2f}"
    print(
        f"{result.name}: {summary['units']} units in {len(summary['layers'])} layers; mean LC "
        f"{fmt(m['lc'])}, CS1 {fmt(m['cs1'])}, CS2 {fmt(m['cs2'])} (successful only: "
        f"CS1 {fmt(m['cs1_successful'])}, CS2 {fmt(m['cs2_successful'])}); "
        f"{s['method']}: success {100 * s['success_rate']:.1f}%{l2}"
    )


def cmd_dissect(args) -> int:
    from advinterp.analysis.dissection import (
        dissect_model,
        format_table1,
        map_layers,
        remove_partials,
        write_dissection,
    )
    from advinterp.data.broden import open_probe
    from advinterp.device import autocast
    from advinterp.distributed import joined
    from advinterp.io import out_folder
    from advinterp.models import load_model

    if not 0 <= args.iou_threshold <= 1:
        raise UserError(f"--iou-threshold must be in [0, 1], got {args.iou_threshold}")
    if not 0 < args.quantile < 1:
        raise UserError(f"--quantile must be in (0, 1), got {args.quantile}")
    device, workers = _device(args)
    # Everything a user can get wrong is checked before the probe is written or read.
    model = load_model(args.model, args.weights).to(device)
    if args.layer:
        map_layers(model, args.layer)
    out = out_folder(args.out)
    probe = open_probe(
        args.probe,
        model,
        size=args.probe_size,
        seed=args.probe_seed,
        categories=args.categories,
        limit=args.limit,
    )
    name = (getattr(model, "config", None) or {}).get("name") or Path(args.model).parent.name
    print(
        f"dissecting {name} on {len(probe)} probe images ({probe.root}); "
        f"categories {', '.join(probe.category_names)}"
    )
    # Under torchrun each process attacks and reads its share of the probe (see dissect).
    try:
        with joined() as world, autocast(device, args.amp):
            result = dissect_model(
                model,
                probe,
                layers=args.layer,
                adversarial=out / "adversarial-set" if args.adversarial else None,
                quantile=args.quantile,
                iou_threshold=args.iou_threshold,
                batch_size=args.batch_size,
                seed=args.seed,
                workers=workers,
                world=world,
                partials=out,
                chunk=args.chunk,
            )
    except KeyboardInterrupt:
        print(
            "advinterp: interrupted: run the same command again to resume (the finished "
            "chunks of the dissection"
            + (" and shards of the adversarial set" if args.adversarial else "")
            + " are kept)",
            file=sys.stderr,
        )
        return 130
    if not world.is_main:  # process 0 speaks for all
        return 0
    table = write_dissection(result, out, name=name)
    remove_partials(out)
    if result.attack:
        a = result.attack
        print(
            f"opt attack on the probe: success {100 * a['success_rate']:.1f}%, "
            f"mean L2 {a['mean_l2']:.3f}"
        )
    print(f"layers {', '.join(result.layers)} ({sum(table['units'].values())} units)")
    print(format_table1({name: table}))
    print(f"written to {out / 'table1.json'}, {out / 'table1.png'} and {out}/*/tally_*.csv")
    return 0


def cmd_reproduce(args) -> int:
    from advinterp.attacks.base import check_positive
    from advinterp.io import read_json
    from advinterp.reproduce import (
        DEFAULT,
        QUICK,
        ReproduceConfig,
        format_summary,
        format_sweep,
        reproduce,
        sweep,
    )

    models = [args.model] if args.model else args.models or []
    if models and args.archs is not None:
        raise UserError(
            "--archs trains models of its own: drop it with --model/--models (given models)"
        )
    for flag, value in (
        ("--weights", args.weights),
        ("--data", args.data),
        ("--probe", args.probe),
        ("--train-data", args.train_data),
    ):
        if value is not None and not models:
            raise UserError(f"{flag} goes with --model or --models (models you already have)")
    if args.train_data is not None and not args.model:
        raise UserError("--train-data fine-tunes one given model: use it with --model")
    archs = tuple(a.strip() for a in (args.archs or "resnet").split(",") if a.strip())
    if not archs:
        raise UserError("--archs is empty: name at least one architecture, e.g. resnet")
    if args.lam is not None:
        check_positive("--lam", args.lam)
    sizes = {}
    profile = QUICK if args.quick else DEFAULT
    if args.limit is not None:
        sizes = {
            k: min(profile[k], args.limit)
            for k in ("attack_images", "lam_images", "pgd_images", "autoattack_images")
        }
        sizes["eval_limit"] = args.limit
    if args.attack_images is not None:
        sizes["attack_images"] = args.attack_images
        lam_images = sizes.get("lam_images", profile["lam_images"])
        sizes["lam_images"] = min(lam_images, args.attack_images)
    if args.probe_size is not None:
        sizes["probe_images"] = args.probe_size
    if args.adv_limit is not None:
        sizes["adv_limit"] = args.adv_limit
    if args.draws is not None:
        sizes["draws"] = args.draws
    if args.dissect_layers:
        sizes["dissect_layers"] = tuple(args.dissect_layers)
    cfg = ReproduceConfig(
        archs=archs,
        quick=args.quick,
        seed=args.seed,
        keep=args.keep,
        lam=args.lam,
        sigma=check_positive("--sigma", args.sigma),
        data_root=args.data_root,
        saliency=args.saliency,
        models=tuple(models),
        # One model's one file as before (a string); else one entry per model (- for none).
        weights=args.weights[0]
        if args.model and args.weights and len(args.weights) == 1
        else args.weights and tuple(args.weights),
        data=args.data,
        probe=args.probe,
        train_data=args.train_data,
        opt_steps=args.steps,
        **sizes,
    )
    try:
        if args.sweep:  # the run (reproduce), then its analysis at each setting
            table = sweep(cfg, args.out)
            summary = read_json(Path(args.out) / "summary.json")
        else:
            table, summary = None, reproduce(cfg, args.out)
    except KeyboardInterrupt:
        print(
            "advinterp: interrupted; finished stages are kept: run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return 130
    print()
    print(format_summary(summary))
    if table is not None:
        print()
        print(format_sweep(table))
    out = Path(args.out)
    print(
        f"\ndone in {summary['total_seconds']:.0f}s of stage time; summary in "
        f"{out / 'summary.json'}, report in {out / 'report' / 'index.html'}"
    )
    return 0


def cmd_report(args) -> int:
    from advinterp.report import write_report

    run = Path(args.run)
    if run.is_file():
        raise UserError(
            f"{run} is a file: give the run folder (written by `advinterp reproduce --out RUN`, "
            "holding summary.json)"
        )
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: give a folder (it is created when missing)")
    index = write_report(run, args.out)
    print(f"report written to {index} (open it in a browser, no server needed)")
    return 0


COMMANDS = {
    "train": cmd_train,
    "advtrain": cmd_advtrain,
    "evaluate": cmd_evaluate,
    "attack": cmd_attack,
    "layers": cmd_layers,
    "topk": cmd_topk,
    "semantics": cmd_semantics,
    "dissect": cmd_dissect,
    "reproduce": cmd_reproduce,
    "report": cmd_report,
}
