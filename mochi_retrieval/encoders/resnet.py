"""torchvision ResNet encoders (randomly initialised, no weight download).

``ResNetEncoder`` keeps the torchvision model as ``self.backbone`` with its
parameter names (conv1, bn1, layer1..layer4) and ``fc`` replaced by an
``Identity``, so::

    torchvision.models.resnet50().load_state_dict(enc.backbone.state_dict(), strict=False)

loads everything but ``fc.*`` (standard stem and 3 input channels only;
``small_images`` and ``in_channels`` change conv1's shape). That is what a
detection transfer into torchvision's Faster R-CNN ResNet backbone needs.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from mochi_retrieval.encoders.registry import register_encoder

RESNET_DIMS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_BLOCKS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
           "resnet50": (Bottleneck, [3, 4, 6, 3])}


class _WidthResNet(ResNet):
    """torchvision's ResNet with base width ``width`` instead of 64; same parameter names.

    A narrow ResNet-18 (width 16 or 32) makes CPU runs on small images feasible.
    """

    def __init__(self, block: type, layers: list[int], width: int) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, 1000)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


STEMS = ("imagenet", "small", "half")


def _new_conv1(in_channels: int, small_images: bool, width: int = 64) -> nn.Conv2d:
    """A replacement stem convolution, initialised as torchvision does."""
    if small_images:  # CIFAR-style stem (MoCo/SimCLR CIFAR code): 3x3, stride 1
        conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier: (B, C, H, W) -> (B, output_dim).

    Args:
        arch: "resnet18", "resnet34" (output_dim 512) or "resnet50" (2048).
        in_channels: input channels; 1 for grey images (replaces conv1).
        small_images: for 28-64 px inputs: conv1 becomes 3x3 stride 1 and the
            max-pool is removed, as in CIFAR MoCo/SimCLR code (``stem="small"``).
        width: channels of the first stage (torchvision: 64; later stages 2x, 4x,
            8x). Narrower networks (16, 32) are for CPU runs; output_dim scales.
        stem: the first stage's input resolution, as a share of the image side:
            "imagenet" (7x7 stride-2 conv and a stride-2 max-pool: 1/4),
            "small" (3x3 stride-1 conv, no max-pool: 1/1, the same as
            ``small_images=True``), or "half" (3x3 stride-1 conv and the
            max-pool: 1/2; on 28 px images 14x14 maps for 4x the compute of
            "imagenet" at the same width). None: "small" if ``small_images``,
            else "imagenet".
    """

    def __init__(self, arch: str = "resnet50", in_channels: int = 3, small_images: bool = False,
                 width: int = 64, stem: str | None = None) -> None:
        super().__init__()
        if arch not in RESNET_DIMS:
            raise ValueError(f"unknown ResNet arch {arch!r}; choices: {', '.join(RESNET_DIMS)}")
        if stem is not None and stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choices: {', '.join(STEMS)}")
        if small_images and stem not in (None, "small"):
            raise ValueError(f"small_images=True is stem='small'; it contradicts stem={stem!r}")
        stem = stem or ("small" if small_images else "imagenet")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if width == 64:
            backbone = getattr(torchvision.models, arch)(weights=None)
        else:
            backbone = _WidthResNet(*_BLOCKS[arch], width=width)
        if stem != "imagenet" or in_channels != 3:
            backbone.conv1 = _new_conv1(in_channels, stem != "imagenet", width)
        if stem == "small":
            backbone.maxpool = nn.Identity()
        self.output_dim: int = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.arch = arch

    def forward(self, batch: Tensor) -> Tensor:
        """Map images (B, C, H, W) to features (B, output_dim)."""
        return self.backbone(batch)


@register_encoder("resnet18")
def resnet18(**kwargs: Any) -> ResNetEncoder:
    """ResNet-18 encoder, output_dim 512; kwargs go to :class:`ResNetEncoder`."""
    return ResNetEncoder("resnet18", **kwargs)


@register_encoder("resnet34")
def resnet34(**kwargs: Any) -> ResNetEncoder:
    """ResNet-34 encoder, output_dim 512; kwargs go to :class:`ResNetEncoder`."""
    return ResNetEncoder("resnet34", **kwargs)


@register_encoder("resnet50")
def resnet50(**kwargs: Any) -> ResNetEncoder:
    """ResNet-50 encoder, output_dim 2048; kwargs go to :class:`ResNetEncoder`."""
    return ResNetEncoder("resnet50", **kwargs)
