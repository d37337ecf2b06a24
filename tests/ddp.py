"""Two gloo processes of our own for the tests of work split over processes: run a
function on both and get what each returns, to compare with one process's run."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advinterp.data import FASHION_CLASSES, TensorImageSet
from advinterp.distributed import World, joined

from .conftest import one_thread

ROOT = Path(__file__).resolve().parents[1]

#: The synthetic set's images and the batch that splits it unevenly over two processes:
#: batches of 16, 16 and 13 (7 + 6 rows).
N_IMAGES, BATCH = 45, 16


def synthetic_set() -> TensorImageSet:
    """``N_IMAGES`` seeded random Fashion-MNIST-shaped images and labels."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_IMAGES, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=gen)
    names, wnids = zip(*FASHION_CLASSES, strict=True)
    return TensorImageSet(images, labels, list(names), list(wnids))


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` from the repository root, one torch
    thread a process (``env`` added to the environment); its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + list(args),
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _entry(rank: int, world_size: int, rendezvous: str, out: str, worker, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        with joined() as world:  # the group set up above: used, left open
            result = worker(world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_processes(worker, folder: Path, *args) -> list:
    """``worker(world, *args)`` on two spawned processes (gloo, one thread each; ``worker``
    a module-level function), each process's return value in rank order. ``folder`` holds
    the rendezvous file and the results."""
    with one_thread():
        mp.spawn(
            _entry,
            args=(2, str(folder / "rendezvous"), str(folder), worker, args),
            nprocs=2,
            join=True,
        )
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]


def one_process(worker, *args):
    """``worker(World(), *args)`` here, on one thread: the reference run."""
    with one_thread():
        return worker(World(), *args)


def relative_change(a: dict, b: dict, init: dict, keys) -> float:
    """‖a − b‖ / ‖b − init‖ over the tensors ``keys``: error against the training's own change."""

    def flat(d):
        return torch.cat([d[k].double().flatten() for k in keys])

    return float((flat(a) - flat(b)).norm() / (flat(b) - flat(init)).norm())
