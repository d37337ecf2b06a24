"""The ImageNet path on a GPU: the same numbers as on the CPU, and ε-balls kept under autocast."""

import json

import pytest
import torch

from tests.imagenet.conftest import read_set, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _table2(capsys, imagenet_dir, out, *extra):
    rc, _, err = run_cli(
        capsys,
        "evaluate", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}",
        "--batch-size", "8", "--out", out, *extra,
    )  # fmt: skip
    assert rc == 0, err
    (row,) = json.loads((out / "table2.json").read_text()).values()
    return row


def test_evaluate_on_cuda_matches_the_cpu(imagenet_dir, tmp_path, capsys):
    cpu = _table2(capsys, imagenet_dir, tmp_path / "cpu", "--device", "cpu")
    gpu = _table2(capsys, imagenet_dir, tmp_path / "gpu", "--device", "cuda")
    amp = _table2(capsys, imagenet_dir, tmp_path / "amp", "--device", "cuda", "--amp")
    assert gpu["n"] == cpu["n"] == amp["n"] == 15
    one_image = 100 / 15 + 1e-6
    for key in ("clean_top1", "clean_top5"):
        assert abs(gpu[key] - cpu[key]) <= one_image
        assert abs(amp[key] - cpu[key]) <= one_image


def test_pgd_on_cuda_with_amp_stays_in_the_ball(imagenet_dir, reference, tmp_path, capsys):
    out = tmp_path / "pgd"
    rc, _, err = run_cli(
        capsys,
        "attack", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}",
        "--method", "pgd", "--eps", "4", "--steps", "3", "--device", "cuda", "--amp",
        "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    s = read_set(out)
    assert s["images"].dtype == torch.float32 and s["images"].device.type == "cpu"
    real = torch.stack([reference["images"][i] for i in s["indices"].tolist()])
    assert float((s["images"] - real).abs().max()) <= 4 / 255 + 1e-5
