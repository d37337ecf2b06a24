"""``advinterp attack`` on the photo folder: opt (eq. 4, least-likely targets) and PGD at
ε = 4/255, their shards read directly and checked against images decoded here."""

import json

import torch

from tests.imagenet.conftest import CORRUPT, folder_files, read_set


def test_opt_reaches_least_likely_targets_and_skips_the_corrupt_file(
    opt_run, imagenet_dir, reference, lite0
):
    out, proc = opt_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # The undecodable file is skipped with a warning that counts it.
    assert "skipped 1 image" in proc.stderr, proc.stderr[-2000:]
    assert f"written to {out}" in proc.stdout
    # The summary counts the images attacked, not the files found.
    assert "over 15 images" in proc.stdout, proc.stdout

    meta = json.loads((out / "attack.json").read_text())
    assert meta["method"] == "opt" and meta["targeted"] is True
    s = read_set(out)
    files = folder_files(imagenet_dir)
    corrupt = files.index(imagenet_dir / CORRUPT)
    # Every decodable image is in the set once, the corrupt one is not.
    assert sorted(s["indices"].tolist()) == reference["good"]
    assert corrupt not in s["indices"].tolist()
    assert s["images"].shape == (15, 3, 224, 224) and s["images"].dtype == torch.float32
    assert 0 <= float(s["images"].min()) and float(s["images"].max()) <= 1

    idx = s["indices"].tolist()
    assert s["labels"].tolist() == [reference["labels"][i] for i in idx]
    clean = torch.stack([reference["logits"][i] for i in idx])
    assert torch.equal(s["clean_preds"], clean.argmax(1))
    # y* is the least likely class of the clean prediction.
    assert torch.equal(s["targets"], clean.argmin(1))
    # The stored predictions are the model's on the stored images, and most reach y*.
    with torch.inference_mode():
        preds = lite0(s["images"]).argmax(1)
    assert torch.equal(preds, s["preds"])
    success = float((preds == s["targets"]).float().mean())
    assert success >= 0.8, success
    assert abs(meta["stats"]["success_rate"] - success) < 1e-6
    # The real images moved, by the distances the set records.
    real = torch.stack([reference["images"][i] for i in idx])
    l2 = (s["images"] - real).flatten(1).norm(dim=1)
    assert bool((l2 > 0).all())
    assert torch.allclose(l2, s["l2"], atol=1e-3)


def test_pgd_stays_inside_the_eps_ball(pgd_set, reference):
    meta = json.loads((pgd_set / "attack.json").read_text())
    assert meta["method"] == "pgd" and abs(meta["eps"] - 4 / 255) < 1e-9
    s = read_set(pgd_set)
    idx = s["indices"].tolist()
    assert sorted(idx) == reference["good"]
    assert bool((s["targets"] == -1).all())  # untargeted
    real = torch.stack([reference["images"][i] for i in idx])
    delta = (s["images"] - real).abs().flatten(1).amax(1)
    assert float(delta.max()) <= 4 / 255 + 1e-5, float(delta.max()) * 255
    assert float(delta.min()) > 1 / 255  # every image was pushed
    assert 0 <= float(s["images"].min()) and float(s["images"].max()) <= 1
    assert float(s["linf"].max()) <= 4 / 255 + 1e-6
