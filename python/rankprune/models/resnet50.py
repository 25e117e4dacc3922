"""ResNet-50 (He et al. 2016) in its ImageNet shape (224x224 inputs, bottleneck blocks), randomly
initialised: used to time scoring at realistic sizes, not for accuracy."""
import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, channels: int, stride: int = 1):
        super().__init__()
        out_ch = channels * self.expansion
        self.conv1 = nn.Conv2d(in_ch, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(channels, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        stem = max(1, round(64 * width))
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        stages = []
        for i, (channels, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
            channels = max(1, round(channels * width))
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(in_ch, channels, 2 if i > 0 and j == 0 else 1))
                in_ch = channels * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet50(num_classes: int = 1000, width: float = 1.0) -> ResNet50:
    """ResNet-50, ImageNet shape (25.6 M parameters, 4.1 G multiply-adds at 224x224, 1000 classes)."""
    return ResNet50(num_classes, width)
