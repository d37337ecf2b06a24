"""Data-parallel adversarial training (torchrun, DDP on gloo) against one process.

Two checks of the same contract, each able to fail:

- float64, in two processes of our own (``torch.multiprocessing`` on gloo): the
  shared epoch loop, the consistency step, DDP and the global batch norm on a
  synthetic set whose last batch splits unevenly. In float64 the two ways of
  summing agree to ~1e-12, so the tolerance is 1e-9; per-process batch norm
  (what DDP gives without :class:`GlobalBatchNorm`) misses it by 10⁸×.
- float32, end to end: ``torchrun --nproc-per-node 2 -m advinterp advtrain`` on
  197 Fashion-MNIST images against ``advtrain`` in this process (see
  :func:`test_torchrun_matches_one_process` for its tolerance).
"""

import pytest
import torch
import torch.distributed as dist

from advinterp.advtrain import AdvTrainConfig, FeatureTap, advtrain, sharded_step
from advinterp.distributed import World, global_batch_norm, joined
from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict
from advinterp.models import create_model
from advinterp.train import TrainConfig, run_epoch, sgd, train

from .ddp import BATCH, on_two_processes, one_process, relative_change, synthetic_set, torchrun


def test_shards_cover_the_batch_in_order():
    for n, size in ((10, 3), (64, 2), (5, 2), (7, 7)):
        shards = [World(rank=r, size=size).shard(n) for r in range(size)]
        rows = torch.cat([s.take(torch.arange(n)) for s in shards])
        assert torch.equal(rows, torch.arange(n))
        assert max(s.stop - s.start for s in shards) - min(s.stop - s.start for s in shards) <= 1
    assert World().shard(5) == (0, 5, 5)


def test_bad_setups_are_one_line_errors(monkeypatch):
    two = World(rank=0, size=2)
    with pytest.raises(UserError, match="--batch-size 63 does not split evenly over 2 processes"):
        two.check_batches(197, 63)
    with pytest.raises(UserError, match="last batch of each epoch \\(1 of 129"):
        two.check_batches(129, 64)
    two.check_batches(197, 64)  # 64, 64, 64 and 5 = 3 + 2
    World().check_batches(197, 63)  # one process: anything goes
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        with joined():
            pass
    monkeypatch.delenv("WORLD_SIZE")
    with joined() as world:  # no torchrun: one process, no group
        assert world == World() and not dist.is_initialized()


# -- float64: the maths of the sharded step ------------------------------------------------------


def _train_float64(world: World, sync_bn: bool = True) -> dict:
    """One epoch of the consistency step in float64, as ``advtrain`` runs it."""
    torch.manual_seed(0)
    model = create_model("resnet").double()
    if world.size > 1 and sync_bn:
        global_batch_norm(model, world.bn_group)
    model.to(memory_format=torch.channels_last)
    tap = FeatureTap(model, "penultimate")
    cfg = AdvTrainConfig(init="-", epochs=1, batch_size=BATCH, lr=0.05)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    step = sharded_step(world.wrap(model), tap, cfg)  # advtrain's own

    def step64(x, y, gen, shard):
        return step(x.double(), y, gen, shard)

    loss, top1, _ = run_epoch(model, opt, synthetic_set(), cfg, 0, step64, "", False, world)
    tap.close()
    return {"state": model.net.state_dict(), "loss": loss, "top1": top1}


def _float64_runs(world: World) -> dict:
    return {"global": _train_float64(world), "local": _train_float64(world, False)}


def test_sharded_float64_step_matches_one_process(tmp_path):
    ranks = on_two_processes(_float64_runs, tmp_path)
    one = one_process(_train_float64)
    torch.manual_seed(0)
    init = create_model("resnet").double().net.state_dict()
    params = [k for k in init if "running" not in k and "num_batches" not in k]
    stats = [k for k in init if "running" in k]
    for k in init:  # the processes hold one model
        assert torch.equal(ranks[0]["global"]["state"][k], ranks[1]["global"]["state"][k])
    ddp = ranks[0]["global"]
    assert relative_change(ddp["state"], one["state"], init, params) < 1e-9
    assert relative_change(ddp["state"], one["state"], init, stats) < 1e-9
    assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-9) and ddp["top1"] == one["top1"]
    # The test can fail: batch norm over each process's rows only is another training.
    assert relative_change(ranks[0]["local"]["state"], one["state"], init, params) > 1e-3


# -- float32, end to end through torchrun --------------------------------------------------------


def test_torchrun_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2`` against one process, same global batch (64), 4 steps.

    Tolerance: ‖w_ddp − w_one‖ ≤ 0.05·‖w_one − w_init‖ over the parameters
    (0.0075 measured), 0.01 over batch norm's running statistics. The maths is
    the same (the float64 test pins it to 1e-9); what differs is float32
    summation order (halves of the batch, gradients summed in two parts), and
    two things amplify that. FGSM takes the sign of the input gradient, so
    where a gradient is near zero, rounding flips the sign and moves the pixel
    by 2ε; and batch-norm bias gradients are sums that nearly cancel (float32
    and float64 gradients of the untrained model differ by 1.3%). Hence a
    briefly trained starting point and ε ∈ [0.1, 1]/255: from a random init
    with ε ∈ [4, 16]/255, two float32 runs of one process that differ only in
    the weights' memory layout already differ by 0.19. A real mistake is far
    above 0.05: per-process batch norm gives 0.22, another seed 0.83 (checked).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = TrainConfig(epochs=1, limit=1024, batch_size=64, eval_limit=100)
        train(start, tmp_path / "init", progress=False)
    finally:
        torch.set_num_threads(threads)
    init = tmp_path / "init" / "model.safetensors"
    settings = dict(limit=197, batch_size=64, epochs=1, eval_limit=100)
    eps = dict(eps_min=0.1, eps_max=1.0)  # 0–255 units, as on the command line
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in {**settings, **eps}.items()]
    proc = torchrun(
        "-m", "advinterp", "advtrain", f"--init={init}", f"--out={tmp_path / 'ddp'}", *argv
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model written to") == 1, proc.stdout  # process 0 speaks alone
    assert proc.stdout.count("epoch 1/1: loss") == 1, proc.stdout

    torch.set_num_threads(1)
    try:
        for name, seed in (("one", 0), ("seed1", 1)):
            cfg = AdvTrainConfig(
                init=str(init), seed=seed, **settings, **{k: v / 255 for k, v in eps.items()}
            )
            advtrain(cfg, tmp_path / name, progress=False)
    finally:
        torch.set_num_threads(threads)
    w0 = read_state_dict(init)
    ddp, one, seed1 = (
        read_state_dict(tmp_path / n / "model.safetensors") for n in ("ddp", "one", "seed1")
    )
    params = [k for k in w0 if "running" not in k and "num_batches" not in k]
    stats = [k for k in w0 if "running" in k]
    assert relative_change(ddp, one, w0, params) < 0.05
    assert relative_change(ddp, one, w0, stats) < 0.01
    for k in w0:
        if "num_batches" in k:
            assert torch.equal(ddp[k], one[k])  # 4 steps × 2 forward passes
    h_ddp, h_one = (read_json(tmp_path / n / "model.json")["history"][0] for n in ("ddp", "one"))
    assert h_ddp["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-3)
    assert abs(h_ddp["train_top1"] - h_one["train_top1"]) <= 100 / 197 + 1e-9  # one image
    # The test can fail: another seed (data order, augmentation, ε) is far outside it.
    assert relative_change(seed1, one, w0, params) > 0.3
