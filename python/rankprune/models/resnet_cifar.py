"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of basic blocks, 16/32/64 channels.

The downsampling shortcut is a 1x1 convolution + BatchNorm (option B) rather than the paper's zero-padded
identity (option A): a padded identity has no weights, so its channels could not follow the residual
branch when channels are pruned. Every ReLU is its own module, so that feature-map criteria can tap the map
after the ReLU that follows each convolution.
"""
from typing import List

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``width`` scales every channel count (rounded, at least 1)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers: List[nn.Module] = []
        in_ch = widths[0]
        for stage, ch in enumerate(widths):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters, 41 MFLOPs multiply-adds at width 1)."""
    return CifarResNet(3, num_classes, width)


def resnet56(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86 M parameters, 127 M multiply-adds at width 1)."""
    return CifarResNet(9, num_classes, width)
