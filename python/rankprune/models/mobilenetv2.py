"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs: stride-1 stem and first stages.

Inverted residual blocks: 1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual add when shapes
match. ReLU6 modules are separate per use so that feature-map criteria can tap them.
"""
import torch
from torch import nn


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [_conv_bn(in_ch, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, out_ch, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion, out channels, repeats, first stride) per stage; strides 1/2 reduced for 32x32 inputs.
CIFAR_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, settings=CIFAR_SETTINGS, last_channels: int = 1280):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        in_ch = max(1, round(32 * width))
        layers = [_conv_bn(3, in_ch, 3)]
        for expand, c, repeats, stride in settings:
            out_ch = max(1, round(c * width))
            for i in range(repeats):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expand))
                in_ch = out_ch
        last = max(1, round(last_channels * max(1.0, width)))
        layers.append(_conv_bn(in_ch, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (about 2.2 M parameters at width 1)."""
    return MobileNetV2(num_classes, width)
