"""Data-parallel standard training (DDP on gloo, two processes) against one process.

In float64, two processes of our own (``torch.multiprocessing`` on gloo) run the
epoch loop of ``train`` (:func:`run_epoch` with :func:`cross_entropy_step`) on

- Fashion-MNIST-shaped images in memory, whose last batch splits unevenly over
  the processes (augmented a global batch at a time, rows kept);
- an image folder in ImageNet's layout with one undecodable file, each process
  decoding only its rows, augmented per image (RandomResizedCrop, flips) from
  the image's own seed, for two epochs;

and one process runs the same, decoding the folder in a DataLoader worker. The summation order is all that
differs, so in float64 the runs agree to ~1e-12 (tolerance 1e-9); batch norm
over each process's rows alone (what DDP gives without ``GlobalBatchNorm``)
misses by far more, so the test can fail.
"""

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from advinterp.data import ImageFolderSet
from advinterp.distributed import GlobalBatchNorm, World, global_batch_norm
from advinterp.errors import UserError
from advinterp.models import create_model
from advinterp.train import (
    TrainConfig,
    cross_entropy_step,
    on_device,
    run_epoch,
    sgd,
)

from .ddp import BATCH, on_two_processes, one_process, relative_change, synthetic_set

WNIDS = ["n01440764", "n02123045", "n02124075"]
FOLDER_BATCH = 8  # 22 files: batches of 8, 8 and 6, the corrupt file among them


def _write_folder(root: Path) -> None:
    """Seven smooth colour images of varied sizes per class, and one file that is no image."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(7):
            h, w = 36 + 4 * i, 64 - 3 * i
            ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(60, 200, 3)
            noise = rng.normal(0, 20, (h, w, 3))
            pixels = np.clip(40 * c + ramp + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{i}.png")
    (root / WNIDS[1] / "3b.jpg").write_bytes(b"not a jpeg")


def _folder_model():
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=3, in_chans=3)
    model.classes, model.wnids = list(WNIDS), list(WNIDS)
    return model


def _train_float64(world: World, data, model, batch: int, epochs: int, workers: int, sync_bn=True):
    """``epochs`` epochs of ``train``'s step in float64, as ``train`` runs them."""
    model = model.double()
    if world.size > 1 and sync_bn:
        global_batch_norm(model, world.bn_group)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=0.05)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    step = cross_entropy_step(world.wrap(model), cfg.label_smoothing)  # train's own

    def step64(x, y, gen, rows):
        return step(x.double(), y, gen, rows)

    history = []
    for epoch in range(epochs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the undecodable file, counted below
            loss, top1, _ = run_epoch(
                model, opt, data, cfg, epoch, step64, "", False, world, workers=workers
            )
        history.append((loss, top1))
    return {"state": model.net.state_dict(), "history": history}


def _runs(world: World, folder: Path, workers: int, local_bn: bool) -> dict:
    torch.manual_seed(0)
    runs = {"memory": _train_float64(world, synthetic_set(), create_model("resnet"), BATCH, 1, 0)}
    images = ImageFolderSet(folder, WNIDS, input_size=28)
    runs["folder"] = _train_float64(world, images, _folder_model(), FOLDER_BATCH, 2, workers)
    if local_bn:
        torch.manual_seed(0)
        runs["local"] = _train_float64(
            world, synthetic_set(), create_model("resnet"), BATCH, 1, 0, sync_bn=False
        )
    return runs


def _two_process_runs(world: World, folder: Path) -> dict:
    # Decoding in-process here (a DataLoader worker of a process started by multiprocessing's
    # spawn is spawned too, seconds per epoch); the one-process run decodes in a worker, so
    # the crops must not depend on where they are made.
    return _runs(world, folder, workers=0, local_bn=True)


def test_two_processes_train_like_one(tmp_path):
    folder = tmp_path / "train"
    _write_folder(folder)
    assert len(ImageFolderSet(folder, WNIDS)) == 22
    ranks = on_two_processes(_two_process_runs, tmp_path, folder)
    one = one_process(_runs, folder, 1, False)
    torch.manual_seed(0)
    inits = {
        "memory": create_model("resnet").double().net.state_dict(),
        "folder": _folder_model().double().net.state_dict(),
    }
    for name, init in inits.items():
        params = [k for k in init if "running" not in k and "num_batches" not in k]
        stats = [k for k in init if "running" in k]
        for k in init:  # the processes hold one model
            assert torch.equal(ranks[0][name]["state"][k], ranks[1][name]["state"][k]), (name, k)
        ddp = ranks[0][name]
        assert relative_change(ddp["state"], one[name]["state"], init, params) < 1e-9, name
        assert relative_change(ddp["state"], one[name]["state"], init, stats) < 1e-9, name
        for (loss_ddp, top1_ddp), (loss_one, top1_one) in zip(
            ddp["history"], one[name]["history"], strict=True
        ):
            assert loss_ddp == pytest.approx(loss_one, rel=1e-9) and top1_ddp == top1_one
    # The test can fail: batch norm over each process's rows only is another training.
    init = inits["memory"]
    params = [k for k in init if "running" not in k and "num_batches" not in k]
    assert relative_change(ranks[0]["local"]["state"], one["memory"]["state"], init, params) > 1e-3


def test_what_several_processes_cannot_do_is_one_line():
    from timm.layers import BatchNormAct2d

    two = World(rank=0, size=2)
    # timm's batch norm holding its ReLU keeps it when made global.
    fused = BatchNormAct2d(16)
    fused.running_mean.uniform_(-1, 1)
    x = torch.randn(4, 16, 5, 5)
    made = global_batch_norm(nn.Sequential(copy.deepcopy(fused)), group=None)[0]
    assert isinstance(made, GlobalBatchNorm) and isinstance(made.act, nn.ReLU)
    for mode in (True, False):
        fused.train(mode), made.train(mode)
        torch.testing.assert_close(made(x), fused(x))
    assert (made.eval()(x) >= 0).all() and (x < 0).any()
    on_gpu = World(rank=1, size=2, local_rank=1, device=torch.device("cuda", 1))  # NCCL's
    with pytest.raises(
        UserError, match="--device cpu: under torchrun this process trains on cuda:1"
    ):
        on_device(on_gpu, "cpu")
    assert on_device(on_gpu, "auto") is on_gpu and on_device(on_gpu, None) is on_gpu
    assert on_device(two, "cpu") is two
    assert on_device(World(), None) == World()
