"""The analysis verbs on two ``torchrun`` processes (gloo) against one: the same files.

Top-k stores, counts and the dissection's thresholds and IoU counts are exact
statistics, so the tables match byte for byte; and a pass killed on one process is
resumed on two.
"""

import json
from pathlib import Path

import pytest
import torch

from advinterp.analysis import model_semantics
from advinterp.analysis.dissection import dissect_model
from advinterp.cli import main
from advinterp.data.broden import open_probe
from advinterp.io import read_state_dict
from advinterp.metrics.wordnet import similarity_matrix

from ..ddp import torchrun

SEMANTICS = ["--layers", "conv1", "layer2.0.conv2", "--batch-size", "32", "--chunk", "64"]
TOPK = ["--layer", "layer2.0.conv2", "--count", "3", "--patch", "7", "--stride", "7"]
TOPK += ["--batch-size", "32", "--chunk", "64"]
EVALUATE = ["--limit", "120", "--eps", "4", "8", "--batch-size", "20", "--chunk", "40"]
DISSECT = ["--probe-size", "120", "--adversarial", "--batch-size", "20", "--chunk", "40"]


class Killed(Exception):
    pass


def _verbs(ckpt: str, adv: str, out: Path) -> list[list[str]]:
    pair = ["--model", ckpt, "--adversarial", adv]
    return [
        ["semantics", *pair, *SEMANTICS, "--out", str(out / "semantics")],
        ["topk", *pair, *TOPK, "--out", str(out / "topk")],
        ["evaluate", "--model", ckpt, *EVALUATE, "--out", str(out / "evaluate")],
        ["dissect", "--model", ckpt, *DISSECT, "--out", str(out / "dissect")],
    ]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert not any(n.endswith(".partial") for n in names)
    for name in names:
        if name.endswith(".png"):  # drawn from the numbers compared here
            continue
        if (a / name).is_dir():
            _same_files(a / name, b / name)
            continue
        if name in ("table1.json", "attack.json"):  # name the folder they were written to
            x, y = (json.loads((d / name).read_text().replace(str(d), "OUT")) for d in (a, b))
            assert x == y, name
            continue
        if name.endswith(".safetensors"):
            x, y = read_state_dict(a / name), read_state_dict(b / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_verbs_under_torchrun_write_the_one_process_files(
    model, pairs, small_run, adv_dir, tmp_path
):
    ckpt = str(small_run / "model.safetensors")
    for argv in _verbs(ckpt, str(adv_dir), tmp_path / "one"):
        assert main(argv) == 0
    # A semantics pass killed on one process after two of its five chunks ...
    forwards = 0

    def kill(module, inputs):
        nonlocal forwards
        forwards += 1
        if forwards == 1 + 2 * (2 + 2) + 1:  # the unit count, two chunks of 2 + 2 batches
            raise Killed

    handle = model.net.register_forward_pre_hook(kill)
    try:
        with pytest.raises(Killed):
            model_semantics(
                model,
                pairs,
                similarity_matrix(model.wnids),
                layers=["conv1", "layer2.0.conv2"],
                batch_size=32,
                chunk=64,
                partial=tmp_path / "two" / "semantics" / "semantics.0.partial",
            )
    finally:
        handle.remove()
    # A dissection killed on one process after two of the real side's three chunks ...
    probe = open_probe("fashion-broden", model, size=120)
    forwards = 0

    def kill_dissect(module, inputs):
        nonlocal forwards
        forwards += len(inputs[0]) == 20  # a batch of the pass (not a look at the shapes)
        if forwards == 2 * 2 + 1:  # after two chunks of two batches
            raise Killed

    handle = model.net.register_forward_pre_hook(kill_dissect)
    try:
        with pytest.raises(Killed):
            dissect_model(
                model,
                probe,
                adversarial=tmp_path / "two" / "dissect" / "adversarial-set",
                batch_size=20,
                chunk=40,
                partials=tmp_path / "two" / "dissect",
                progress=False,
            )
    finally:
        handle.remove()
    # ... are resumed on two processes, which also run topk and evaluate.
    argvs = _verbs(ckpt, str(adv_dir), tmp_path / "two")
    proc = torchrun("-m", "tests.analysis.run_verbs", json.dumps(argvs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after 128 of 300 images" in proc.stderr, proc.stderr[-3000:]
    assert "dissect real: resuming after 80 of 120 images" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("written to") == 4, proc.stdout  # process 0 speaks alone
    for verb in ("semantics", "topk", "evaluate", "dissect"):
        _same_files(tmp_path / "one" / verb, tmp_path / "two" / verb)
    gallery = json.loads((tmp_path / "two" / "topk" / "gallery.json").read_text())
    assert len(gallery["units"]) == 3 and gallery["saliency_patch"] == 7
