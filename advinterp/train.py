"""Standard training: SGD with the paper's momentum (0.9) and weight decay (5e-5).

Read top to bottom: data in memory, a seeded shuffle per epoch, batched
augmentation (random shifts and horizontal flips), a one-cycle learning rate,
and after each epoch the test accuracy and an atomic checkpoint, so
``resume=True`` continues a killed run to the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from advinterp.data import batches, open_dataset
from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict, save_tensors, write_json
from advinterp.metrics.accuracy import accuracy
from advinterp.models import create_model, load_state, model_config, save_checkpoint
from advinterp.progress import progress as tqdm


def check_schedule(cfg) -> None:
    """The settings every training loop shares: epochs, batch size and SGD's."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if not (cfg.lr > 0 and 0 <= cfg.momentum < 1 and cfg.weight_decay >= 0):
        raise UserError("need --lr > 0, 0 ≤ --momentum < 1 and --weight-decay ≥ 0")


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

    def check(self) -> None:
        check_schedule(self)
        if not (0 <= self.label_smoothing < 1 and 0 <= self.shift <= 8):
            raise UserError("need 0 ≤ --label-smoothing < 1 and 0 ≤ --shift ≤ 8")
        if self.data != "fashion-mnist":
            raise UserError(
                "training reads fashion-mnist; for ImageNet models load your own weights with --weights"
            )


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
):
    """One epoch of ``cfg.epochs``: seeded shuffle, augmentation, one-cycle learning rate.

    ``step(x, y, gen, shard) -> (loss, logits)`` computes the loss (a batch mean)
    of this process's rows ``x, y`` of the global batch; ``shard`` says which rows
    (all of them in one process), for per-image random draws made for the whole
    batch. This loop does the backward pass (into the parameters only) and the
    update. With several processes (``world``), each draws the same global batch
    and keeps its rows, so the run matches one process. Returns the mean loss,
    the train top-1 in % and the seconds spent (over the global batches).
    """
    world = world or World()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    params = [p for p in model.net.parameters() if p.requires_grad]
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    bar = tqdm(
        batches(train_set, cfg.batch_size, shuffle=True, generator=gen),
        total=steps_per_epoch,
        desc=desc,
        disable=not progress,
        leave=False,
    )
    for i, (x, y, _) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = one_cycle(epoch * steps_per_epoch + i, total, cfg.lr)
        x = augment(x, cfg.shift, cfg.flip, gen).contiguous(memory_format=torch.channels_last)
        shard = world.shard(len(y))
        x, y = shard.take(x).to(world.device), shard.take(y).to(world.device)
        loss, logits = step(x, y, gen, shard)
        opt.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: weighting each loss by its share of
        # the batch (×1 when it splits evenly) makes the update the global batch's.
        weight = world.size * len(y) / shard.size
        (loss * weight if weight != 1 else loss).backward(inputs=params)
        opt.step()
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
    loss_sum, correct, seen = world.sum([loss_sum, correct, seen])
    return loss_sum / seen, 100 * correct / seen, time.perf_counter() - t0


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg.arch`` on ``cfg.data``; write ``out/model.safetensors`` + ``.json`` each epoch.

    Returns the final config (with per-epoch history and test accuracy).
    """
    cfg.check()
    out = Path(out)
    torch.manual_seed(cfg.seed)
    train_set = open_dataset(cfg.data, "train", cfg.data_root, limit=cfg.limit)
    test_set = open_dataset(cfg.data, "test", cfg.data_root, limit=cfg.eval_limit)
    model = create_model(
        cfg.arch, num_classes=len(train_set.classes), in_chans=train_set.images.shape[1]
    )
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    history, start_epoch, elapsed = [], 0, 0.0
    if resume:
        start_epoch, history, elapsed = _restore(out, cfg, model, opt)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def step(x, y, gen, shard):
        logits = model(x)
        return loss_fn(logits, y), logits

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
        )
        elapsed += seconds
        test = accuracy(model, test_set)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "train_top1": top1,
                "test_top1": test["top1"],
                "test_top5": test["top5"],
                "seconds": elapsed,
            }
        )
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, "
                f"test top-1 {test['top1']:.2f}%, {elapsed:.0f}s"
            )
        _save(out, cfg, model, opt, history, elapsed)
    return read_json(out / "model.json")


def _save(
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

    ``arch``/``name`` default to ``cfg.arch``; ``extra`` goes into ``model.json``.
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


def _restore(out: Path, cfg, model, opt) -> tuple[int, list, float]:
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
