"""``advinterp evaluate`` on real photos with efficientnet_lite0's ImageNet weights, against a
brute-force count over the same files decoded and resized here."""

import json

import pytest
import torch

from tests.imagenet.conftest import CAT_CLASSES, PHOTOS, folder_files, run_cli


def test_evaluate_matches_a_brute_force_count(
    imagenet_dir, imagenet_wnids, reference, tmp_path, capsys
):
    rc, out, err = run_cli(
        capsys,
        "evaluate", "--model", "efficientnet_lite0", "--data", f"imagefolder:{imagenet_dir}",
        "--batch-size", "6", "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    # The corrupt file is skipped with a warning that counts it, and the run goes on.
    assert "skipped 1 image" in err, err

    good = reference["good"]
    assert len(good) == 15  # 16 files, one undecodable
    logits = torch.stack([reference["logits"][i] for i in good])
    labels = torch.tensor([reference["labels"][i] for i in good])
    ranked = logits.topk(5, dim=1).indices
    top1 = 100 * int((ranked[:, 0] == labels).sum()) / len(labels)
    top5 = 100 * int((ranked == labels[:, None]).any(1).sum()) / len(labels)

    (row,) = json.loads((tmp_path / "table2.json").read_text()).values()
    assert row["n"] == 15
    assert row["clean_top1"] == pytest.approx(top1) and row["clean_top5"] == pytest.approx(top5)
    assert f"{top1:.2f}" in out and f"{top5:.2f}" in out
    # The real weights read real photos: most true classes are in the top 5, and FGSM at
    # ε = 4/255 (untargeted, true labels) does not help.
    assert top5 >= 60
    assert row["fgsm_top1"] <= row["clean_top1"] and row["fgsm_top5"] <= row["clean_top5"]

    # Chelsea, the tabby (class 281), is called a cat in every variant.
    assert imagenet_wnids.index(PHOTOS["chelsea"]) == 281
    files = folder_files(imagenet_dir)
    chelsea = [i for i in good if files[i].name.startswith("chelsea")]
    assert len(chelsea) == 3
    for i in chelsea:
        assert int(reference["logits"][i].argmax()) in CAT_CLASSES, files[i].name
