"""Where in an image a unit looks: discrepancy maps and upsampled activation maps.

The discrepancy map of Zhou et al. 2015 ("Object detectors emerge in deep scene
CNNs", §3.1), used by the paper for Fig. 2: occlude the image with a small
patch at every position of a grid, measure how much the unit's response drops,
and give each pixel the mean drop of the patches covering it. Every occluded
copy of a batch of images goes through the network in a few large forward
passes, and the forward stops at the recorded layer, so a 28×28 image costs
169 copies of a partial pass rather than 169 separate calls.

The cheap alternative is the unit's own feature map, upsampled bilinearly to
the image size (as Network Dissection does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advinterp.device import model_device
from advinterp.errors import UserError
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder, check_reduction, reduce_map

__all__ = [
    "SALIENCY",
    "occlusion_starts",
    "occlusion_masks",
    "default_patch",
    "layer_maps",
    "unit_responses",
    "discrepancy_maps",
    "activation_maps",
    "saliency_maps",
]

SALIENCY = ("discrepancy", "activation")


def layer_maps(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a name of ``model.net``) for images ``x``, without running
    the layers after it. ``N×C×h×w`` (or whatever the layer returns), detached."""
    with Recorder(model, layer, reduce=None, stop=True) as rec:
        (out,) = rec(x).values()
    return out


def unit_responses(
    model: nn.Module, layer: str, x: torch.Tensor, units: torch.Tensor, reduce: str = "max"
) -> torch.Tensor:
    """Response of unit ``units[i]`` of ``layer`` to image ``x[i]``: the spatial max (or mean)
    of its channel, as :class:`advinterp.record.Recorder` computes it."""
    check_reduction(reduce)
    out = layer_maps(model, layer, x)
    own = out[torch.arange(len(x), device=out.device), units.to(out.device)]
    return reduce_map(own[:, None], reduce)[:, 0]


def _units_per_image(units, n: int, device: torch.device) -> torch.Tensor:
    """``units`` as one int64 unit index per image of ``n``: as given, or one for all."""
    units = torch.as_tensor(units, dtype=torch.int64).flatten().to(device)
    return units.expand(n) if units.numel() == 1 else units


def default_patch(size: int) -> tuple[int, int]:
    """Patch side and stride for a ``size``-pixel image: 5 and 2 on 28×28, about a sixth of
    the side and half a patch on larger images (Zhou et al. used 11/3 on 227×227,
    ~5,600 copies an image; a sixth keeps it at ~170)."""
    patch = max(1, round(size / 5.6))
    return patch, max(1, patch // 2)


def occlusion_starts(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) edges of the patches along one side: every ``stride`` pixels, plus a last
    patch flush with the border so that every pixel is covered."""
    if not 1 <= patch <= size or stride < 1:
        raise UserError(f"occlusion patch {patch} / stride {stride} do not fit a {size}-pixel side")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_masks(height: int, width: int, patch: int, stride: int) -> torch.Tensor:
    """``P×H×W`` float masks, 1 inside patch ``P`` of the grid, 0 elsewhere."""
    rows = occlusion_starts(height, patch, stride)
    cols = occlusion_starts(width, patch, stride)
    masks = torch.zeros(len(rows) * len(cols), height, width)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            masks[i * len(cols) + j, top : top + patch, left : left + patch] = 1.0
    return masks


def _fill_value(
    model: nn.Module, fill: float | Sequence[float] | None, channels: int
) -> torch.Tensor:
    # Grey for the model: its normalisation mean, which it sees as 0.
    if fill is None:
        mean = getattr(model, "mean", None)
        value = mean.flatten().float().cpu() if torch.is_tensor(mean) else torch.zeros(1)
    else:
        value = torch.as_tensor(fill, dtype=torch.float32).flatten()
    if value.numel() == 1:
        value = value.expand(channels)
    if value.numel() != channels:
        raise UserError(f"occlusion fill needs 1 or {channels} values, got {value.numel()}")
    return value.view(1, channels, 1, 1)


def discrepancy_maps(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    units: torch.Tensor | Sequence[int] | int,
    patch: int | None = None,
    stride: int | None = None,
    fill: float | Sequence[float] | None = None,
    reduce: str = "max",
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Discrepancy maps (Zhou et al. 2015) of unit ``units[i]`` on image ``images[i]``.

    Each image is occluded by a ``patch``×``patch`` square of value ``fill``
    (default: the model's normalisation mean, "grey") at every grid position
    (``stride`` apart, the last flush with the border); the map's pixel value is
    the mean over the patches covering it of ``response(image) −
    response(occluded)``. Positive where hiding the pixel weakens the unit.
    Occluded copies of all images go through the network ``batch_size`` at a
    time (default: about 0.5 MB of input), and only up to ``layer``.

    Args:
        images: ``N×C×H×W`` in [0, 1].
        units: one unit index per image, or one for all.
        patch, stride: default :func:`default_patch` (5 and 2 on 28×28).

    Returns ``N×H×W`` float maps (unnormalised: the response scale), on the model's
    device, where the occluded copies are made.

    Example::

        maps = discrepancy_maps(model, "layer3.0.conv2", x[:8], units=17)
    """
    n, channels, height, width = images.shape
    images = images.to(model_device(model, images.device))
    units = _units_per_image(units, n, images.device)
    if patch is None:
        patch, auto_stride = default_patch(min(height, width))
        stride = stride or auto_stride
    stride = stride or max(1, patch // 2)
    masks = occlusion_masks(height, width, patch, stride).to(images.device)  # P×H×W
    count = masks.sum(0)
    value = _fill_value(model, fill, channels).to(images.device, images.dtype)
    if batch_size is None:
        # Small forwards keep the activations in cache: ~170 copies of a 28×28 grey image
        # ran 1.8× faster per copy than 2,700 on a CPU core.
        batch_size = max(16, 2**17 // (channels * height * width))
    model.eval()
    drops = torch.empty(n, len(masks), device=images.device)
    with torch.inference_mode():
        base = unit_responses(model, layer, images, units, reduce)
        copies = torch.arange(n * len(masks), device=images.device)
        for chunk in tqdm(
            copies.split(batch_size),
            desc="discrepancy maps",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            img, pos = chunk // len(masks), chunk % len(masks)
            m = masks[pos][:, None]  # B×1×H×W
            occluded = images[img] * (1 - m) + value * m
            # Under autocast the responses are bf16: the maps are summed in float32.
            drops.view(-1)[chunk] = (
                base[img] - unit_responses(model, layer, occluded, units[img], reduce)
            ).to(drops.dtype)
    return torch.einsum("np,phw->nhw", drops, masks) / count


def activation_maps(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    units: torch.Tensor | Sequence[int] | int,
    batch_size: int = 512,
) -> torch.Tensor:
    """The feature map of unit ``units[i]`` on ``images[i]``, upsampled bilinearly to the
    image size: ``N×H×W`` in the unit's response scale."""
    n, _, height, width = images.shape
    units = _units_per_image(units, n, images.device)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size]
            maps = layer_maps(model, layer, x)
            if maps.dim() != 4:
                raise UserError(
                    f"layer {layer} has no spatial map to upsample; use discrepancy maps"
                )
            u = units[start : start + batch_size].to(maps.device)
            own = maps[torch.arange(len(x), device=maps.device), u][:, None]
            out.append(
                F.interpolate(own, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            )
    return torch.cat(out) if out else torch.empty(0, height, width)


def saliency_maps(
    kind: str, model: nn.Module, layer: str, images: torch.Tensor, units, **kwargs
) -> torch.Tensor:
    """``discrepancy`` or ``activation`` maps by name (see the two functions)."""
    if kind == "discrepancy":
        return discrepancy_maps(model, layer, images, units, **kwargs)
    if kind == "activation":
        return activation_maps(model, layer, images, units)
    raise UserError(f"unknown saliency {kind!r}: use one of {', '.join(SALIENCY)}")
