"""The default model: a compact ResNet for 28×28 grey images.

Built from torchvision's own ``BasicBlock`` with torchvision's layer names
(``conv1``, ``bn1``, ``layer1``…``layer3``, ``fc``), so hooks and users speak
the same names as for ResNet-18. Maps are 28×28 → 14×14 → 7×7: the last block
keeps 7×7 maps, enough space for dissection masks.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or in_ch != out_ch:
        down = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
        )
    layers = [BasicBlock(in_ch, out_ch, stride=stride, downsample=down)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CompactResNet(nn.Module):
    """ResNet with three stages of ``BasicBlock`` for small inputs.

    Args:
        widths: channels of the stem/stage 1, stage 2 and stage 3.
        blocks: residual blocks per stage.
        in_chans: input channels (1 for Fashion-MNIST).
        num_classes: output classes.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: tuple[int, int, int] = (1, 1, 1),
        in_chans: int = 1,
        num_classes: int = 10,
    ):
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_chans, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(w1, w1, blocks[0], stride=1)
        self.layer2 = _stage(w1, w2, blocks[1], stride=2)
        self.layer3 = _stage(w2, w3, blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
