import pytest
import torch
import torch.nn.functional as F

from advinterp.analysis.saliency import (
    activation_maps,
    discrepancy_maps,
    occlusion_masks,
    occlusion_starts,
)
from advinterp.errors import UserError
from advinterp.models import create_model

from .conftest import layer_responses


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(3, 1, 28, 28)


def test_occlusion_grid_covers_every_pixel():
    assert occlusion_starts(28, 5, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23]
    assert occlusion_starts(28, 4, 4) == [0, 4, 8, 12, 16, 20, 24]
    masks = occlusion_masks(28, 28, 5, 2)
    assert masks.shape == (169, 28, 28) and bool((masks.sum(0) >= 1).all())
    assert bool((masks.sum((1, 2)) == 25).all())
    with pytest.raises(UserError, match="do not fit"):
        occlusion_starts(28, 30, 2)


def test_discrepancy_map_equals_a_per_patch_loop(model, images):
    """Brute force: occlude one patch at a time, run the whole model, and average each
    pixel's response drops over the patches that cover it."""
    layer, unit, patch, stride, fill = "layer2.0.conv2", 7, 5, 3, 0.25
    x = images[:1]
    base = layer_responses(model, layer, x)[0, unit]
    total, count = torch.zeros(28, 28), torch.zeros(28, 28)
    for top in occlusion_starts(28, patch, stride):
        for left in occlusion_starts(28, patch, stride):
            occluded = x.clone()
            occluded[..., top : top + patch, left : left + patch] = fill
            drop = base - layer_responses(model, layer, occluded)[0, unit]
            total[top : top + patch, left : left + patch] += drop
            count[top : top + patch, left : left + patch] += 1
    want = total / count
    got = discrepancy_maps(
        model, layer, x, unit, patch=patch, stride=stride, fill=fill, batch_size=37
    )
    assert got.shape == (1, 28, 28)
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    assert float(want.abs().max()) > 0  # the unit does react to occlusion


def test_discrepancy_maps_batch_per_image_units_and_default_grey(model, images):
    units = torch.tensor([0, 5, 9])
    together = discrepancy_maps(model, "layer1.0.conv1", images, units)
    for i in range(3):
        alone = discrepancy_maps(model, "layer1.0.conv1", images[i : i + 1], int(units[i]))
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
    # Default fill: the model's normalisation mean; occluding with it changes nothing
    # on an image that already is that grey.
    grey = model.mean.view(1, 1, 1, 1).expand(1, 1, 28, 28).clone()
    assert float(discrepancy_maps(model, "conv1", grey, 3).abs().max()) < 1e-5


def test_activation_map_is_the_upsampled_unit_map(model, images):
    module = dict(model.net.named_modules())["layer2.0.conv2"]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.inference_mode():
        model(images)
    handle.remove()
    want = F.interpolate(seen[0][:, 4:5], size=(28, 28), mode="bilinear", align_corners=False)
    got = activation_maps(model, "layer2.0.conv2", images, 4)
    torch.testing.assert_close(got, want[:, 0])


def test_unknown_layer_is_a_user_error(images):
    with pytest.raises(UserError, match="unknown layer 'layer9'"):
        discrepancy_maps(create_model("resnet"), "layer9", images, 0)
