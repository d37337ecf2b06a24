"""``advinterp train`` and ``advinterp advtrain`` on an ImageNet-layout folder: a pretrained
ImageNet model fine-tuned on real 224² photos (one of them undecodable), its checkpoint loaded
back and evaluated; and the mistakes a user can make, each refused in one line."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from advinterp.io import read_json, read_state_dict
from advinterp.models import load_model
from advinterp.train import TrainConfig, train
from tests.ddp import torchrun
from tests.imagenet.conftest import run_cli


def _refused(rc, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("advinterp: error:"), err
    assert fragment in lines[0], (fragment, lines[0])


def _changed(before: dict, after: dict) -> float:
    """Largest change of a parameter (batch norm's running statistics left out)."""
    return max(
        float((after[k].float() - before[k].float()).abs().max())
        for k in before
        if "running" not in k and "num_batches" not in k
    )


def test_train_fine_tunes_lite0_on_a_folder(imagenet_dir, lite0, tmp_path, capsys):
    """Two steps of 8 over the folder's 16 files, the corrupt one skipped; --amp on the CPU
    runs in float32 with a note, as in the analysis verbs."""
    folder = f"imagefolder:{imagenet_dir}"
    out = tmp_path / "lite0-ft"
    rc, stdout, err = run_cli(
        capsys,
        "train", "--arch", "efficientnet_lite0", "--data", folder, "--eval-data", folder,
        "--eval-limit", "5", "--epochs", "1", "--batch-size", "8", "--lr", "0.001",
        "--workers", "0", "--device", "cpu", "--amp", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert "skipped 1 image" in err and "--amp has no effect on the CPU" in err, err
    assert "model written to" in stdout and "test top-1" in stdout, stdout

    model = load_model(str(out / "model.safetensors"))
    config = model.config
    assert config["arch"] == "efficientnet_lite0" and config["dataset"] == folder
    assert model.num_classes == 1000 and model.wnids[281] == "n02123045"
    assert config["train"]["weights"] is None  # the shipped ImageNet weights
    change = _changed(lite0.net.state_dict(), model.net.state_dict())
    assert 0 < change < 0.1  # fine-tuned: moved, not thrown away
    (epoch,) = config["history"]
    assert epoch["test_top1"] is not None

    # The checkpoint evaluates like any other, and the held-out accuracy it recorded is
    # the one `evaluate` measures on the same five images.
    rc, stdout, err = run_cli(
        capsys, "evaluate", "--model", out / "model.safetensors", "--data", folder,
        "--limit", "5", "--workers", "0", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "eval" / "table2.json").read_text()).values()
    assert row["n"] == 5 and row["clean_top1"] == pytest.approx(epoch["test_top1"])


def test_advtrain_from_a_name_and_a_weights_file(imagenet_dir, tmp_path, capsys):
    """The paper's -Adv recipe: ``--init NAME --weights FILE`` (a torchvision resnet18 saved to
    a .pth), fine-tuned on the folder, written as ``resnet18-Adv`` and loaded back."""
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    folder = f"imagefolder:{imagenet_dir}"
    out = tmp_path / "r18-adv"
    rc, stdout, err = run_cli(
        capsys,
        "advtrain", "--init", "resnet18", "--weights", weights, "--data", folder,
        "--limit", "4", "--batch-size", "4", "--epochs", "1", "--lr", "0.01",
        "--workers", "0", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert "resnet18-Adv: train top-1" in stdout and "(no --eval-data)" in stdout, stdout

    model = load_model(str(out / "model.safetensors"))
    assert model.config["name"] == "resnet18-Adv" and model.config["arch"] == "resnet18"
    assert model.config["train"]["init"] == "resnet18"
    assert model.config["train"]["weights"] == str(weights)
    assert 0 < _changed(read_state_dict(weights), model.net.state_dict())
    assert isinstance(model.net, torchvision.models.ResNet) and model.input_size == 224

    rc, stdout, err = run_cli(
        capsys, "evaluate", "--model", out / "model.safetensors", "--data", folder,
        "--limit", "3", "--workers", "0",
    )  # fmt: skip
    assert rc == 0, err
    assert "resnet18-Adv" in stdout


@pytest.fixture
def flat_dir(tmp_path):
    """Photos straight in the folder, no class folders."""
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / f"{i}.jpg")
    return root


@pytest.fixture
def non_wnid_folder(tmp_path):
    root = tmp_path / "named"
    (root / "cats").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(root / "cats" / "a.jpg")
    return root


def test_bad_input_is_one_line(imagenet_dir, flat_dir, non_wnid_folder, tmp_path, capsys):
    lite0 = ["--arch", "efficientnet_lite0"]
    cases = [
        (["train", *lite0, "--data", f"imagefolder:{tmp_path / 'nope'}"], "does not exist"),
        (["train", *lite0, "--data", f"imagefolder:{flat_dir}"], "holds no class folders"),
        (["train", *lite0, "--data", f"imagefolder:{non_wnid_folder}"], "not a class of"),
        (["train", "--data", f"imagefolder:{imagenet_dir}"], "'resnet' is the compact"),
        (["train", *lite0, "--data", "imagenet"], "imagefolder:PATH"),
        (
            [
                "train",
                *lite0,
                "--data",
                f"imagefolder:{imagenet_dir}",
                "--eval-data",
                f"imagefolder:{tmp_path / 'val'}",
            ],
            "does not exist",
        ),  # fmt: skip
        (
            ["advtrain", "--init", "efficientnet_lite0", "--data", f"imagefolder:{flat_dir}"],
            "holds no class folders",
        ),
        (
            ["advtrain", "--init", "efficientnet_lite0", "--data", "fashion-mnist"],
            "choose a matching --data",
        ),
        (
            ["advtrain", "--init", "efficientnet_lite0", "--device", "cuda:7"],
            "--device cuda:7",
        ),
    ]
    for argv, fragment in cases:
        rc, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out")
        _refused(rc, err, fragment)
        assert not (tmp_path / "out" / "model.json").exists()


def test_torchrun_trains_like_one_process(imagenet_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m advinterp train`` on the folder, each process decoding
    its half of every global batch of 8 in a DataLoader worker, against ``train`` in this
    process: two steps from a random resnet18, the corrupt file skipped in both.

    The maths is pinned to 1e-9 in float64 by ``tests/test_train_ddp.py``; here the runs
    differ by float32 summation order, which from random weights is amplified in the
    gradients of the first layers (sums that nearly cancel): one process with 1 thread
    against 2 already differs by 0.15 of the training's own change in the parameters
    (measured). The forward quantities stay tight: the loss to 5e-5 and batch norm's running
    statistics to 0.005 (both measured for 1 against 2 threads, and for torchrun). Another
    seed (other shuffle and crops) moves the parameters by 1.1, the statistics by 0.28 and
    the loss by 1.5e-2, far outside the tolerances.
    """
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    settings = dict(
        arch="resnet18", weights=str(weights), data=f"imagefolder:{imagenet_dir}",
        epochs=1, batch_size=8, lr=0.02,
    )  # fmt: skip
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc = torchrun(
        "-m",
        "advinterp",
        "train",
        *argv,
        "--workers=1",
        f"--out={tmp_path / 'ddp'}",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model written to") == 1, proc.stdout  # process 0 speaks alone
    assert proc.stderr.count("skipped 1 image") == 1, proc.stderr

    for name, seed in (("one", 0), ("seed1", 1)):
        with pytest.warns(UserWarning, match="skipped 1 image"):
            train(TrainConfig(**settings, seed=seed), tmp_path / name, progress=False, workers=0)
    w0 = read_state_dict(weights)
    ddp, one, seed1 = (
        read_state_dict(tmp_path / n / "model.safetensors") for n in ("ddp", "one", "seed1")
    )
    params = [k for k in w0 if "running" not in k and "num_batches" not in k]
    stats = [k for k in w0 if "running" in k]

    def relative_change(a, b, keys):
        flat = [torch.cat([d[k].double().flatten() for k in keys]) for d in (a, b, w0)]
        return float((flat[0] - flat[1]).norm() / (flat[1] - flat[2]).norm())

    assert relative_change(ddp, one, stats) < 0.03
    assert relative_change(ddp, one, params) < 0.4
    assert relative_change(seed1, one, stats) > 0.1 and relative_change(seed1, one, params) > 0.8
    for k in w0:
        if "num_batches" in k:
            assert torch.equal(ddp[k], one[k])
    loss = {
        n: read_json(tmp_path / n / "model.json")["history"][0]["train_loss"]
        for n in ("ddp", "one", "seed1")
    }
    assert loss["ddp"] == pytest.approx(loss["one"], rel=5e-4)
    assert loss["seed1"] != pytest.approx(loss["one"], rel=5e-3)
