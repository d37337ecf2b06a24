"""Mistakes on the ImageNet path end in one line ``advinterp: error: …`` with exit status 2,
before any work and without a traceback."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.imagenet.conftest import advinterp_script, run_cli


class _Mkdir:
    """Unpickling this object calls ``os.mkdir(path)``: pickled code, harmless but visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


@pytest.fixture(scope="package")
def non_wnid_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("not-wnids")
    for name in ("cats", "dogs"):
        (root / name).mkdir()
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / name / "a.jpg")
    return root


def _assert_refused(rc, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("advinterp: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_imagenet_model_on_the_default_data(capsys, tmp_path):
    """efficientnet_lite0 (1000 classes, RGB 224²) on Fashion-MNIST (10 classes, grey 28²)."""
    for verb in (["evaluate"], ["attack", "--out", tmp_path / "set"]):
        rc, _, err = run_cli(capsys, *verb, "--model", "efficientnet_lite0")
        _assert_refused(rc, err)
        assert not (tmp_path / "set").exists()


def test_folder_not_named_by_wnids(non_wnid_dir, capsys):
    rc, _, err = run_cli(
        capsys, "evaluate", "--model", "efficientnet_lite0", "--data", f"imagefolder:{non_wnid_dir}"
    )
    _assert_refused(rc, err, "cats")


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "convnext_atto"])
def test_named_model_without_weights(name, imagenet_dir, capsys):
    """A torchvision (vgg16, resnet50) or timm (convnext_atto) name needs --weights: random
    weights would give meaningless numbers."""
    rc, _, err = run_cli(
        capsys, "evaluate", "--model", name, "--data", f"imagefolder:{imagenet_dir}"
    )
    _assert_refused(rc, err, "--weights")


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_limit_below_one(limit, imagenet_dir, tmp_path, capsys):
    for verb in (["evaluate"], ["attack", "--out", tmp_path / "set"]):
        rc, _, err = run_cli(
            capsys, *verb, "--model", "efficientnet_lite0",
            "--data", f"imagefolder:{imagenet_dir}", "--limit", limit,
        )  # fmt: skip
        _assert_refused(rc, err, "--limit")


def test_pth_with_pickled_code_is_never_run(imagenet_dir, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "payload": _Mkdir(marker)}
    evil = tmp_path / "resnet18.pth"
    with open(evil, "wb") as f:
        torch.save(state, f, pickle_module=pickle)
    for args in (
        ["layers", "resnet18", "--weights", evil],
        [
            "evaluate",
            "--model",
            "resnet18",
            "--weights",
            evil,
            "--data",
            f"imagefolder:{imagenet_dir}",
        ],
    ):
        rc, _, err = run_cli(capsys, *args)
        _assert_refused(rc, err, str(evil))
        assert not marker.exists(), "the pickled call ran"


def test_unknown_model_name(imagenet_dir, capsys):
    rc, _, err = run_cli(
        capsys, "evaluate", "--model", "resnet_eighteen", "--data", f"imagefolder:{imagenet_dir}"
    )
    _assert_refused(rc, err, "unknown model")


def test_console_script_refuses_in_one_line(imagenet_dir):
    """The installed ``advinterp`` command: an unknown name is status 2 and one stderr line."""
    proc = advinterp_script(
        "attack", "--model", "nosuchnet", "--data", f"imagefolder:{imagenet_dir}", "--out", "x"
    )
    _assert_refused(proc.returncode, proc.stderr, "unknown model")
