"""Helpers shared by the benchmarks: interleaved timing, the machine's description, results.json.

Timings on a shared machine drift with the neighbours' load; running A and B
alternately in one process, with the order rotated each round, and comparing
medians cancels most of it.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from advinterp.io import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results.json"


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (0: torch's default); returns the number in force."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def pick_device(name: str | None) -> torch.device:
    """``name``, or CUDA when there is one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    tasks: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Run every task once per round, in order on even rounds and reversed on odd ones.

    Reversing (A B C, C B A, …) cancels a linear drift in the machine's speed
    and what one task leaves in the caches for the next. Returns ``(times, last)``:
    the seconds of each run by task, and each task's last return value.
    """
    names = list(tasks)
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, object] = {}
    for r in range(rounds):
        this_round = {}
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0 = time.perf_counter()
            last[name] = tasks[name]()
            sync(device)
            this_round[name] = time.perf_counter() - t0
            times[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return times, last


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: torch.device) -> dict:
    """What the numbers were measured on: device, versions, threads, date."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_processes(module: str, n: int, args: list[str], out: Path) -> object:
    """Start ``module`` on ``n`` processes (``torchrun --standalone``, one torch thread each)
    in worker mode (``--worker=out``, after ``args``) and return what process 0 wrote to
    ``out/timing.json`` under ``"seconds"``."""
    import json
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            module,
            *args,
            f"--worker={out}",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    return json.loads((out / "timing.json").read_text())["seconds"]


def save_results(key: str, value: dict, path: Path = RESULTS) -> Path:
    """Set ``results.json[key] = value``, keeping the other benches' keys; atomic write."""
    data = read_json(path) if path.exists() else {}
    data[key] = value
    write_json(path, data)
    return path


def noise_pairs(data):
    """``data`` paired with a stand-in adversarial set (seeded noise, 90% "fooled" to random
    targets): what a pass over real and adversarial images costs, without an attack."""
    from advinterp.analysis import PairedSets
    from advinterp.attacks.advset import AdversarialSet

    n = len(data)
    gen = torch.Generator().manual_seed(0)
    x = data.images.float() / 255
    noisy = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp_(0, 1)
    targets = torch.randint(0, 10, (n,), generator=gen)
    preds = torch.where(torch.rand(n, generator=gen) < 0.9, targets, data.labels)
    adversarial = AdversarialSet.from_tensors(
        {
            "images": noisy,
            "labels": data.labels,
            "targets": targets,
            "preds": preds,
            "clean_preds": data.labels,
            "indices": torch.arange(n),
        },
        {"method": "noise", "stats": {"success_rate": 0.9, "mean_l2": 0.0}},
    )
    return PairedSets(real=data, adversarial=adversarial)
