"""A classifier that owns its normalisation, so callers feed [0, 1] pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """Wraps a network ``net`` with the input normalisation it was trained with.

    Attacks, clipping and ε-balls all live in pixel space [0, 1]; this module
    subtracts ``mean`` and divides by ``std`` (per channel) before ``net``.
    Layer names seen by hooks are those of ``net``, prefixed by ``net.``;
    :func:`advinterp.models.layer_names` strips that prefix.

    Example::

        model = Classifier(torchvision.models.resnet18(), mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225), input_size=224, num_classes=1000)
        logits = model(torch.rand(2, 3, 224, 224))
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        num_classes: int,
        in_chans: int | None = None,
        resize_to: int | None = None,
        classes: Sequence[str] | None = None,
        wnids: Sequence[str] | None = None,
    ):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        self.net = net
        self.in_chans = in_chans if in_chans is not None else len(mean)
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        # Some bodies need a bigger map than the data has (VGG-16's five poolings
        # on 28×28); the resize happens inside, so pixel space stays the data's.
        self.resize_to = resize_to
        self.classes = list(classes) if classes is not None else None
        self.wnids = list(wnids) if wnids is not None else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The one place a batch meets the model's device: callers keep data where it is.
        x = x.to(self.mean.device, non_blocking=True)
        x = (x - self.mean) / self.std
        if self.resize_to is not None and x.shape[-1] != self.resize_to:
            x = nn.functional.interpolate(
                x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False
            )
        return self.net(x)
