"""VGG-16 with BatchNorm for 32x32 inputs (the CIFAR variant used by HRank: 13 convs, 512-512-classes head)."""
import torch
from torch import nn

VGG16_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, channels=VGG16_CHANNELS):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        layers = []
        in_ch = 3
        for c in channels:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = max(1, round(c * width))
            layers += [nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            in_ch = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = max(1, round(512 * width))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg16(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-16-BN for CIFAR (about 15 M parameters, 314 M multiply-adds at width 1)."""
    return VGG(num_classes, width)
