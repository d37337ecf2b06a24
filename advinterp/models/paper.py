"""The paper's architectures for small grey inputs: torchvision bodies, adapted stems.

Only the first convolution (and, for ResNet-18, the stem's max-pool) changes, so
layer names stay torchvision's (``features.28``, ``layer4.1.conv2``…).
"""

from __future__ import annotations

from torch import nn
from torchvision import models


def alexnet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """AlexNet with a 3×3, stride-1 first convolution: 28×28 maps to 2×2 before pooling."""
    net = models.alexnet(num_classes=num_classes)
    net.features[0] = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1)
    return net


def vgg16(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """VGG-16 with a grey first convolution; feed it 32×32 (five poolings leave 1×1)."""
    net = models.vgg16(num_classes=num_classes)
    net.features[0] = nn.Conv2d(in_chans, 64, kernel_size=3, padding=1)
    return net


def resnet18(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """ResNet-18 with a 3×3, stride-1 stem and no max-pool: 28 → 28, 14, 7, 4."""
    net = models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net
