"""Two gloo processes of our own for the tests of work split over processes: run a
function on both and get what each returns, to compare with one process's run."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advinterp.distributed import World, joined

from .conftest import one_thread


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
