"""ConcatNet: a small CIFAR-size network built from the three usual kinds of channel concatenation, so that
pruning and decomposition are exercised on them (channels of a ``torch.cat`` input sit at an offset in the
concatenated tensor):

- a DenseNet-style block (Huang et al. 2017): each layer's output is appended to its input, so the stem's
  channels and each layer's channels sit at growing offsets of the block output;
- an Inception-style block (Szegedy et al. 2015): parallel 1x1, 1x1->3x3 and pool->1x1 branches
  concatenated;
- a CSP-style block (Wang et al. 2020, as in YOLOv5's C3): two 1x1 convolutions split the input into a
  part that passes through and a part processed by a residual bottleneck; the two are concatenated and
  fused by a 1x1 convolution. The split is written as two convolutions, not ``chunk``, so that each half
  can lose a different number of channels.

Every convolution is followed by a BatchNorm and its own ReLU module (feature-map criteria tap after it).
32x32 inputs: the dense block runs at 32x32, the inception block at 16x16, the CSP block at 8x8.
"""
from typing import List

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DenseBlock(nn.Module):
    """``x = cat([x, layer(x)])`` for each 3x3 layer: ``in_channels + layers * growth`` channels out."""

    def __init__(self, in_channels: int, growth: int, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(_conv_bn_relu(in_channels + i * growth, growth, 3) for i in range(layers))
        self.out_channels = in_channels + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class InceptionBlock(nn.Module):
    """Three parallel branches (1x1; 1x1 -> 3x3; 3x3 max-pool -> 1x1), concatenated: ``3 * branch`` channels."""

    def __init__(self, in_channels: int, branch: int):
        super().__init__()
        self.branch1 = _conv_bn_relu(in_channels, branch)
        self.branch3 = nn.Sequential(_conv_bn_relu(in_channels, branch // 2 or 1), _conv_bn_relu(branch // 2 or 1, branch, 3))
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.branch_pool = _conv_bn_relu(in_channels, branch)
        self.out_channels = 3 * branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(self.pool(x))], 1)


class CSPBlock(nn.Module):
    """``fuse(cat([bottleneck(split_a(x)), split_b(x)]))``; the bottleneck is ``h + conv3x3(conv1x1(h))``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        hidden = max(1, out_channels // 2)
        self.split_a = _conv_bn_relu(in_channels, hidden)
        self.split_b = _conv_bn_relu(in_channels, hidden)
        self.bottleneck = nn.Sequential(_conv_bn_relu(hidden, hidden), _conv_bn_relu(hidden, hidden, 3))
        self.fuse = _conv_bn_relu(2 * hidden, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.split_a(x)
        return self.fuse(torch.cat([a + self.bottleneck(a), self.split_b(x)], 1))


class ConcatNet(nn.Module):
    """stem -> dense block -> 1x1 transition, pool -> inception block, pool -> CSP block -> pool -> fc.

    ``width`` scales every channel count (base 16 channels; rounded, at least 1).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        c = max(1, round(16 * width))
        self.stem = _conv_bn_relu(3, 2 * c, 3)
        self.dense = DenseBlock(2 * c, c, layers=2)
        self.transition = _conv_bn_relu(self.dense.out_channels, 2 * c)
        self.inception = InceptionBlock(2 * c, c)
        self.csp = CSPBlock(self.inception.out_channels, 4 * c)
        self.downsample = nn.AvgPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.csp.out_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(self.transition(self.dense(self.stem(x))))
        x = self.csp(self.downsample(self.inception(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def concatnet(num_classes: int = 10, width: float = 1.0) -> ConcatNet:
    """ConcatNet for 32x32 inputs (dense, inception and CSP concatenations; see the module doc)."""
    return ConcatNet(num_classes, width)


__all__: List[str] = ["ConcatNet", "DenseBlock", "InceptionBlock", "CSPBlock", "concatnet"]
