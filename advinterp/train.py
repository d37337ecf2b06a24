"""Standard training: SGD with the paper's momentum (0.9) and weight decay (5e-5).

Read top to bottom: the starting model, a seeded shuffle per epoch, augmentation,
a one-cycle learning rate, and after each epoch the held-out accuracy and an
atomic checkpoint, so ``resume=True`` continues a killed run to the same numbers.

Two kinds of data, each with its own augmentation:

- Fashion-MNIST (28×28) sits in memory; each batch is augmented at once (random
  shifts of up to ``shift`` pixels and left-right flips) from the epoch's generator.
  The model is a small architecture built here (``resnet``, ``alexnet``, ...).
- An image folder (``imagefolder:PATH``, a train split in ImageNet's layout) streams
  from disk through a DataLoader with ``workers`` decoding processes and never sits
  in memory whole; each image gets ImageNet's training augmentation
  (``RandomResizedCrop`` to the model's input size, a random horizontal flip; see
  :meth:`~advinterp.data.ImageFolderSet.augmented`). The model is an ImageNet
  architecture by name with its ``weights`` (a file to fine-tune, ``imagenet``, or
  ``random`` to train from scratch), as :func:`~advinterp.models.load_model` loads it.

Several processes: under ``torchrun --nproc-per-node N`` the run is data
parallel (DistributedDataParallel; gloo on CPUs, NCCL with one GPU per process)
and trains the model one process would with the same ``batch_size``, which is
the global batch (see :mod:`advinterp.distributed`). Every process draws the
same shuffle from the epoch's generator and keeps its rows of each global batch;
batch norm normalises with the global batch's statistics. Fashion-MNIST batches
are augmented whole in every process, which then keeps its rows. From an image
folder each process reads and decodes only its own rows; an image's crop and
flip are drawn from a generator seeded by (seed, epoch, image index), so they do
not depend on which process or worker decodes it. Runs agree to float rounding
(``tests/test_train_ddp.py``). An image that cannot be decoded is left out of
its batch, and the batch's loss still divides by the global batch size, so the
update is the same in one process or N; should some process be left with no
decodable row of a batch, every process skips that batch. Dropout is the one
random draw made per process (each seeds its own masks, :func:`seed_per_process`),
so a model with dropout (alexnet, vgg16, ...) trains an equivalent run, not the
same one. Process 0 alone evaluates, prints and writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from advinterp.data import TensorImageSet, dataset_spec, decoded_batches, open_dataset
from advinterp.device import autocast, default_workers, resolve_device
from advinterp.distributed import World, global_batch_norm, joined
from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict, save_tensors, write_json
from advinterp.metrics.accuracy import accuracy
from advinterp.models import create_model, load_model, load_state, model_config, save_checkpoint
from advinterp.progress import progress as tqdm


def check_schedule(cfg) -> None:
    """The settings every training loop shares: epochs, batch size and SGD's."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if not (cfg.lr > 0 and 0 <= cfg.momentum < 1 and cfg.weight_decay >= 0):
        raise UserError("need --lr > 0, 0 ≤ --momentum < 1 and --weight-decay ≥ 0")


def check_data(data: str, eval_data: str | None) -> None:
    """Training reads Fashion-MNIST or an image folder; both exist (checked before any work)."""
    if data != "fashion-mnist" and not data.startswith("imagefolder:"):
        raise UserError(
            f"training reads fashion-mnist or imagefolder:PATH (a train split in ImageNet's "
            f"layout, PATH/<wnid>/<image>.JPEG), not {data!r}"
        )
    for spec in (data, eval_data):
        if spec is not None and spec != "imagenet":
            dataset_spec(spec)  # an unknown name, a missing or empty folder: one line
    if eval_data == "imagenet":
        raise UserError("ImageNet is not shipped: give --eval-data imagefolder:/data/imagenet/val")


@dataclass
class TrainConfig:
    arch: str = "resnet"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    shift: int = 1
    flip: bool = True
    seed: int = 0
    data: str = "fashion-mnist"
    data_root: str | None = None
    limit: int | None = None
    eval_limit: int | None = None
    #: weights of an ImageNet ``arch`` to start from (see :func:`initial_model`)
    weights: str | None = None
    #: held-out images (default: the test split of ``data``; none for an image folder)
    eval_data: str | None = None

    def check(self) -> None:
        check_schedule(self)
        if not (0 <= self.label_smoothing < 1 and 0 <= self.shift <= 8):
            raise UserError("need 0 ≤ --label-smoothing < 1 and 0 ≤ --shift ≤ 8")
        check_data(self.data, self.eval_data)


def initial_model(cfg: TrainConfig):
    """The model training starts from.

    On Fashion-MNIST without ``weights``: ``cfg.arch`` built for its 28×28 images,
    randomly initialised. Otherwise the ImageNet model ``cfg.arch`` with
    ``cfg.weights`` (:func:`~advinterp.models.load_model`): a file to fine-tune,
    ``"imagenet"``, or ``"random"`` to train from scratch.
    """
    if cfg.weights is None and not cfg.data.startswith("imagefolder:"):
        return create_model(cfg.arch, dataset=cfg.data)
    if cfg.arch == "resnet":
        raise UserError(
            "'resnet' is the compact 28×28 Fashion-MNIST network: for ImageNet-style data name "
            "an ImageNet architecture (resnet18, efficientnet_lite0, any torchvision/timm "
            "classifier) with --weights"
        )
    from advinterp.models import imagenet

    imagenet.check_model_name(cfg.arch)
    if cfg.weights is None and cfg.arch != "efficientnet_lite0":
        if imagenet.cached_weights(cfg.arch) is None:
            raise UserError(
                f"no weights for {cfg.arch!r} in the local torchvision/timm cache: pass "
                "--weights FILE to fine-tune, --weights imagenet to download them, or "
                "--weights random to train from scratch"
            )
    return load_model(cfg.arch, cfg.weights)


def eval_set(cfg, model):
    """The held-out images of the per-epoch accuracy: the first ``cfg.eval_limit`` of
    ``cfg.eval_data``, by default the test split of a registered dataset such as
    Fashion-MNIST; ``None`` for an image folder without ``eval_data`` (a folder is one split)."""
    spec = cfg.eval_data or (None if cfg.data.startswith("imagefolder:") else cfg.data)
    if spec is None:
        return None
    return open_dataset(spec, "test", cfg.data_root, limit=cfg.eval_limit, model=model)


def eval_batch_size(data, cfg) -> int:
    """Images per forward pass of the held-out accuracy: 500 from memory, the training
    batch size from a folder (224² images take 150× the memory of 28² ones)."""
    return 500 if isinstance(data, TensorImageSet) else cfg.batch_size


def augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to ``shift`` pixels (zero fill) and left-right flips, per image."""
    n, _, h, w = x.shape
    if flip:
        flips = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    if shift:
        padded = nn.functional.pad(x, (shift,) * 4)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(x.shape[1])[None, :, None, None],
            rows,
            cols,
        ]
    return x


def one_cycle(step: int, total: int, peak: float, warmup: float = 0.15) -> float:
    """Linear warm-up to ``peak`` over the first 15% of steps, then linear decay to zero."""
    up = max(1, int(total * warmup))
    if step < up:
        return peak * (step + 1) / up
    return peak * max(0.0, (total - step) / max(1, total - up))


def sgd(model, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """Nesterov SGD over ``model.net``; weight decay on weights only (not biases or norms)."""
    decay, no_decay = [], []
    for p in model.net.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=momentum,
        nesterov=True,
    )


def on_device(world: World, device: str | torch.device | None) -> World:
    """``world`` training on ``device`` (``--device``: auto, cpu, cuda or cuda:N).

    One process trains where it is told (``None``: the CPU). Under ``torchrun``
    the process group sets the device (a GPU per process with NCCL, else the
    CPU): ``None`` and ``auto`` take it, and any other choice must name it.
    """
    if world.size == 1:
        return (
            world if device is None else dataclasses.replace(world, device=resolve_device(device))
        )
    if device is None or str(device) == "auto" or resolve_device(device) == world.device:
        return world
    raise UserError(
        f"--device {device}: under torchrun this process trains on {world.device} (NCCL "
        "gives each process its GPU; to train on CPUs hide the GPUs with CUDA_VISIBLE_DEVICES=)"
    )


def sync_batch_norm(model, world: World) -> None:
    """With several processes, batch norm over the global batch (:func:`global_batch_norm`;
    a batch norm holding its activation, as timm's ``BatchNormAct2d``, keeps it)."""
    if world.size == 1:
        return
    global_batch_norm(model, world.bn_group)


def seed_per_process(seed: int, world: World) -> None:
    """Seed the global generator (dropout masks) apart in each process of several: the
    model is built from the same seed everywhere, but masks repeated across processes
    would drop the same units for each process's i-th image."""
    if world.size > 1:
        torch.manual_seed(seed * 1000 + world.rank)


def training_precision(device: torch.device, amp: bool):
    """The context of the training forward passes: bfloat16 autocast on CUDA with ``amp``
    (float32 weights and gradients, no loss scaling needed); on the CPU float32, and
    ``amp`` says so with a warning, as in every other verb."""
    if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp trains in bfloat16, which this GPU does not support: drop --amp")
    return autocast(device, amp)


class Rows(NamedTuple):
    """The rows this process holds of a global batch of ``size`` images (their positions)."""

    index: torch.Tensor
    size: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of ``t``, a tensor over the whole global batch."""
        return t[self.index]


def global_batches(train_set, cfg, epoch: int, gen, world: World, workers: int = 0):
    """This process's part of each global batch of an epoch: ``(x, y, rows, undecodable)``.

    The shuffle comes from ``gen``, the same in every process. An in-memory set is
    augmented a global batch at a time (:func:`augment`, from ``gen``) and each
    process keeps its rows; from an image folder each process decodes only its rows,
    augmented per image (:meth:`~advinterp.data.ImageFolderSet.augmented`), and
    ``rows`` leaves out the images that could not be decoded.
    """
    n = len(train_set)
    order = torch.randperm(n, generator=gen)
    starts = range(0, n, cfg.batch_size)
    if isinstance(train_set, TensorImageSet):
        for start in starts:
            idx = order[start : start + cfg.batch_size]
            x = augment(train_set.images[idx].float().div_(255), cfg.shift, cfg.flip, gen)
            shard = world.shard(len(idx))
            rows = Rows(torch.arange(shard.start, shard.stop), shard.size)
            yield rows.take(x), rows.take(train_set.labels[idx]), rows, 0
        return
    mine = []
    for start in starts:
        idx = order[start : start + cfg.batch_size]
        shard = world.shard(len(idx))
        mine.append((shard, shard.take(idx)))
    images = train_set.augmented(cfg.seed, epoch, cfg.flip)
    loader = decoded_batches(
        images, [wanted.tolist() for _, wanted in mine], workers, world.device.type == "cuda"
    )
    for (shard, wanted), (x, y, idx, bad) in zip(mine, loader, strict=True):
        decoded = torch.isin(wanted, idx).nonzero().flatten()
        yield x, y, Rows(shard.start + decoded, shard.size), bad


def cross_entropy_step(net, label_smoothing: float):
    """The ``step`` of :func:`run_epoch` for standard training; ``net`` is the model or its
    DDP wrapper."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(x, y, gen, rows):
        logits = net(x)
        return loss_fn(logits, y), logits

    return step


def run_epoch(
    model,
    opt,
    train_set,
    cfg,
    epoch: int,
    step,
    desc: str,
    progress: bool = True,
    world: World | None = None,
    *,
    workers: int = 0,
    precision=None,
):
    """One epoch of ``cfg.epochs``: seeded shuffle, augmentation, one-cycle learning rate.

    ``step(x, y, gen, rows) -> (loss, logits)`` computes the loss (a batch mean)
    of this process's rows ``x, y`` of the global batch; ``rows`` (a :class:`Rows`)
    says which rows they are (all of them in one process), for per-image random
    draws made for the whole batch from the shared generator ``gen``. This loop
    does the backward pass (into the parameters only) and the update; ``step``
    runs inside ``precision`` (e.g. autocast). With several processes (``world``),
    the run matches one process (module docstring). Returns the mean loss, the
    train top-1 in % and the seconds spent (over the global batches).
    """
    world = world or World()
    precision = precision if precision is not None else autocast(world.device, False)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    params = [p for p in model.net.parameters() if p.requires_grad]
    streamed = not isinstance(train_set, TensorImageSet)
    model.train()
    seen = correct = skipped = 0
    loss_sum = 0.0
    bar = tqdm(
        global_batches(train_set, cfg, epoch, gen, world, workers),
        total=steps_per_epoch,
        desc=desc,
        disable=not progress,
        leave=False,
    )
    for i, (x, y, rows, bad) in enumerate(bar):
        skipped += bad
        # Every process takes the step or none does (DDP's backward is collective).
        none_left = world.sum([float(len(y) == 0)])[0] if streamed else 0
        if none_left:
            continue
        for group in opt.param_groups:
            group["lr"] = one_cycle(epoch * steps_per_epoch + i, total, cfg.lr)
        x = x.to(world.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(world.device, non_blocking=True)
        with precision:
            loss, logits = step(x, y, gen, rows)
        opt.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: weighting each loss by its share of
        # the batch (×1 when it splits evenly) makes the update the global batch's.
        weight = world.size * len(y) / rows.size
        (loss * weight if weight != 1 else loss).backward(inputs=params)
        opt.step()
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
    loss_sum, correct, seen, skipped = world.sum([loss_sum, correct, seen, skipped])
    if skipped and world.is_main:
        warnings.warn(f"skipped {skipped:.0f} image(s) that could not be decoded", stacklevel=2)
    if not seen:
        raise UserError(f"no image of {train_set.name} could be decoded: check the folder")
    return loss_sum / seen, 100 * correct / seen, time.perf_counter() - t0


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    device: str | torch.device | None = None,
    workers: int | None = None,
    amp: bool = False,
) -> dict:
    """Train ``cfg.arch`` on ``cfg.data``; write ``out/model.safetensors`` + ``.json`` each epoch.

    ``device``: ``auto``, ``cpu``, ``cuda[:N]`` (default: the CPU, or under
    ``torchrun`` the process group's device, see :func:`on_device`); ``workers``: processes
    decoding an image folder (default :func:`~advinterp.device.default_workers`);
    ``amp``: bfloat16 autocast on CUDA. Started by ``torchrun``, it trains in all
    the processes (module docstring). Returns the final config (with per-epoch
    history and held-out accuracy).

    Example::

        train(TrainConfig(arch="resnet18", weights="r18.pth", data="imagefolder:/data/train",
                          eval_data="imagefolder:/data/val", lr=0.01), "runs/r18")
    """
    cfg.check()
    workers = default_workers() if workers is None else workers
    with joined() as world:
        world = on_device(world, device)
        return _train(cfg, Path(out), resume, progress and world.is_main, world, workers, amp)


def _train(cfg, out: Path, resume: bool, progress: bool, world: World, workers: int, amp: bool):
    precision = training_precision(world.device, amp)
    torch.manual_seed(cfg.seed)
    model = initial_model(cfg)
    arch = (getattr(model, "config", None) or {}).get("arch", cfg.arch)
    train_set = open_dataset(cfg.data, "train", cfg.data_root, limit=cfg.limit, model=model)
    world.check_batches(len(train_set), cfg.batch_size)
    test_set = eval_set(cfg, model) if world.is_main else None
    sync_batch_norm(model, world)
    seed_per_process(cfg.seed, world)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    history, start_epoch, elapsed = [], 0, 0.0
    if resume:
        start_epoch, history, elapsed = restore_training(out, cfg, model, opt)
    model.to(world.device)
    for state in opt.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].to(world.device)
    step = cross_entropy_step(world.wrap(model), cfg.label_smoothing)  # DDP over processes
    for epoch in range(start_epoch, cfg.epochs):
        loss, top1, seconds = run_epoch(
            model,
            opt,
            train_set,
            cfg,
            epoch,
            step,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            progress=progress,
            world=world,
            workers=workers,
            precision=precision,
        )
        elapsed += seconds
        if world.is_main:
            test = {"top1": None, "top5": None}
            if test_set is not None:
                with precision:
                    test = accuracy(
                        model, test_set, batch_size=eval_batch_size(test_set, cfg), workers=workers
                    )
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss,
                    "train_top1": top1,
                    "test_top1": test["top1"],
                    "test_top5": test.get("top5"),
                    "seconds": elapsed,
                }
            )
            if progress:
                held_out = "" if test_set is None else f", test top-1 {test['top1']:.2f}%"
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, train top-1 "
                    f"{top1:.2f}%{held_out}, {elapsed:.0f}s"
                )
            save_training(out, cfg, model, opt, history, elapsed, arch=arch)
        world.barrier()  # the others read model.json at the end
    return read_json(out / "model.json")


def save_training(
    out: Path,
    cfg,
    model,
    opt,
    history: list,
    elapsed: float,
    *,
    arch: str | None = None,
    name: str | None = None,
    **extra,
) -> None:
    """Write the training state, then the checkpoint; ``cfg`` is any settings dataclass.

    ``arch`` (what :func:`~advinterp.models.load_model` rebuilds) and ``name``
    default to ``cfg.arch``; ``extra`` goes into ``model.json``.
    """
    config = model_config(
        model,
        arch or cfg.arch,
        name=name,
        dataset=cfg.data,
        train=asdict(cfg),
        history=history,
        test_top1=history[-1]["test_top1"],
        train_seconds=elapsed,
        **extra,
    )
    state = {
        f"momentum.{i}": opt.state[p]["momentum_buffer"]
        for i, p in enumerate(model.net.parameters())
        if "momentum_buffer" in opt.state[p]
    }
    save_tensors(out / "train_state.safetensors", state)
    write_json(
        out / "train_state.json",
        {"epoch": len(history), "history": history, "elapsed": elapsed, "train": asdict(cfg)},
    )
    # The model files last: a checkpoint is complete once model.json names its epoch.
    save_checkpoint(out / "model", model, config)


def restore_training(out: Path, cfg, model, opt) -> tuple[int, list, float]:
    """Load the last epoch :func:`save_training` wrote into ``out`` (model and momentum);
    returns ``(epochs done, history, seconds)``, or a fresh start when ``out`` has none."""
    if not (out / "train_state.json").is_file():
        return 0, [], 0.0
    state = read_json(out / "train_state.json")
    config = read_json(out / "model.json")
    if state.get("train") != asdict(cfg):
        raise UserError(
            f"{out} was trained with other settings; resume with the same options or pick a new --out"
        )
    if config.get("history") != state["history"]:
        raise UserError(f"{out} holds a half-written checkpoint; start again without --resume")
    load_state(model, out / "model.safetensors")
    buffers = read_state_dict(out / "train_state.safetensors")
    for i, p in enumerate(model.net.parameters()):
        if f"momentum.{i}" in buffers:
            opt.state[p]["momentum_buffer"] = buffers[f"momentum.{i}"]
    return state["epoch"], state["history"], state["elapsed"]
