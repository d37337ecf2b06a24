"""Processes started by ``torchrun``: ranks, rows of a batch, objects between them, global batch norm.

``torchrun --nproc-per-node N -m advinterp VERB …`` starts N copies of the
command and tells each its place through ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`joined` reads them and joins the
group: gloo on CPUs, NCCL with one GPU per process (``cuda:LOCAL_RANK``) when
CUDA is available. Without those variables the run is one process, as always.
The verbs that take torchrun: ``advtrain`` (below), ``attack`` (each process
attacks its share of the chunks), and the analysis passes ``evaluate``, ``topk``,
``semantics`` and ``dissect`` (each process reads its share of the batches and the
statistics are merged: :mod:`advinterp.tally`); process 0 writes and prints.
:meth:`World.all_gather` and :meth:`World.broadcast` move small picklable
objects (statistics' state dicts) between the processes.

The data-parallel contract that makes N processes train like one:

- every process draws the same global batch (same seeded shuffle, augmentation
  and per-image random numbers) and keeps its rows (:meth:`World.shard`);
- each process's loss is a batch mean over its rows, weighted by its share of
  the batch (×1 when the batch splits evenly); DistributedDataParallel averages
  the gradients, so the update is the one-process update of the global batch;
- batch norm in training mode normalises with the statistics of the global
  batch (:class:`GlobalBatchNorm`), so activations, running statistics and
  gradients are those of one process, up to float rounding. torch's own
  ``SyncBatchNorm`` does this on GPUs only (in torch 2.14 it refuses CPU
  tensors), hence this small version that runs on gloo too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from advinterp.errors import UserError

__all__ = [
    "World",
    "Shard",
    "joined",
    "launched",
    "current_world",
    "is_main_process",
    "GlobalBatchNorm",
    "global_batch_norm",
]

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class Shard(NamedTuple):
    """This process's rows ``start:stop`` of a global batch of ``size`` images."""

    start: int
    stop: int
    size: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.start : self.stop]


@dataclass(frozen=True)
class World:
    """The processes of a run and this one's place; ``World()`` is a run of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the group batch-norm statistics travel in (kept apart from the gradients' group)
    bn_group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int) -> Shard:
        """Rows of a global batch of ``n``: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return Shard(start, start + base + (self.rank < extra), n)

    def check_batches(self, n_images: int, batch_size: int) -> None:
        """Every batch of an epoch must give each process at least one image."""
        if self.size == 1:
            return
        if batch_size % self.size:
            raise UserError(
                f"--batch-size {batch_size} does not split evenly over {self.size} processes: "
                f"use a multiple of {self.size} (it is the global batch)"
            )
        last = n_images % batch_size
        if 0 < last < self.size:
            raise UserError(
                f"the last batch of each epoch ({last} of {n_images} images) is smaller than the "
                f"{self.size} processes: change --limit or --batch-size"
            )

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (float64), the same on every one."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, obj: object) -> list:
        """``obj`` of every process, in rank order, on every process. ``obj`` is pickled:
        keep it small, its tensors on the CPU (a GPU tensor would land on the sender's GPU)."""
        if self.size == 1:
            return [obj]
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: object) -> object:
        """Process 0's ``obj`` on every process (the others' are ignored); pickled, as
        :meth:`all_gather`."""
        if self.size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` for the training forward passes: DDP over the processes, else itself."""
        if self.size == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device.type == "cuda" else None
        )


def launched() -> bool:
    """Whether ``torchrun`` (or a launcher like it) started this process."""
    return any(v in os.environ for v in TORCHRUN_VARS)


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """The :class:`World` of this run, joining ``torchrun``'s group for the duration.

    A group the caller already set up (``init_process_group``) is used and left
    open; one joined here is left on exit.
    """
    if dist.is_available() and dist.is_initialized():
        yield _world()
        return
    if not launched():
        yield World()
        return
    missing = [v for v in (*TORCHRUN_VARS, "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not set: start several processes with "
            "torchrun --nproc-per-node N -m advinterp …, or unset WORLD_SIZE/RANK/LOCAL_RANK"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
            "visible): start at most one process per GPU, or hide them (CUDA_VISIBLE_DEVICES=) "
            "to train on CPUs"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the other processes: {first}") from e
    try:
        yield _world()
    finally:
        dist.destroy_process_group()


def current_world() -> World:
    """The :class:`World` of the process group already joined (:func:`joined`, or the
    caller's ``init_process_group``), else one process. Creates no group (no batch-norm
    group either), so any process may call it on its own."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank)
        if dist.get_backend() == "nccl"
        else torch.device("cpu"),
    )


def _world() -> World:
    cuda = dist.get_backend() == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = dist.get_world_size()
    return World(
        rank=dist.get_rank(),
        size=size,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        bn_group=dist.new_group() if size > 1 else None,
    )


# -- batch norm over the global batch ----------------------------------------------------------


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduced gradient: the gradient of a sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch (all processes).

    Each process's count, mean and centred sum of squares per channel go into its
    row of a ``processes × (2C + 1)`` table, zeros elsewhere; one differentiable
    all-reduce gathers the table, and Chan et al.'s pairwise update combines the
    rows (as stable as one pass over the whole batch). Outside training, or alone,
    it is ordinary batch norm; the state-dict keys are batch norm's. Modules the
    replaced batch norm held (timm's ``BatchNormAct2d`` holds its dropout and
    activation) are kept and applied after the normalisation, in their order.
    """

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or self.group is None or dist.get_world_size(self.group) == 1:
            out = super().forward(x)
        else:
            out = self._global(x)
        for after in self.children():  # e.g. the dropout and activation of BatchNormAct2d
            out = after(out)
        return out

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        mean = x.mean(dims)
        mine = torch.cat(
            [x.new_full((1,), x.numel() // c), mean, (x - mean.view(shape)).square().sum(dims)]
        )
        table = torch.stack([mine if r == rank else torch.zeros_like(mine) for r in range(world)])
        table = _SumOverProcesses.apply(table, self.group)
        counts, means, m2s = table[:, :1], table[:, 1 : c + 1], table[:, c + 1 :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(m2.detach() / max(float(n) - 1, 1), m)
        scale = torch.rsqrt(m2 / n + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = (x - mean.view(shape)) * scale.view(shape)
        return out + self.bias.view(shape) if self.affine else out


def global_batch_norm(module: nn.Module, group) -> nn.Module:
    """``module`` with every batch norm replaced by :class:`GlobalBatchNorm` over ``group``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: parameters are shared and
    buffers kept, so optimisers, state dicts and layer names are unchanged. Call
    it before registering hooks on batch-norm layers.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        new = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            group=group,
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        for name, child in module.named_children():
            new.add_module(name, child)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = global_batch_norm(child, group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def is_main_process() -> bool:
    """Whether this process prints a command's summary: rank 0 of torchrun's, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0
