"""Built-in tiny architectures for recipes, tests and benchmarks: ResNet, MobileNetV2, a transformer, an MLP.

Each is a scaled-down version of a family people quantize, with the layers that make it hard:
BatchNorm, residual additions, depthwise convolutions, ReLU6, attention, LayerNorm, embeddings.
They are registered as built-in models (``tiny_resnet``, ``tiny_mobilenetv2``,
``tiny_transformer``, ``tiny_mlp``) and take the arguments every built-in takes
(``in_channels``, ``num_classes``, ``image_size``) plus their own width/depth.

Example:
    >>> from qdistill import models
    >>> teacher = models.create("tiny_resnet", in_channels=1, num_classes=10, image_size=8)
    >>> student = models.create("tiny_resnet", in_channels=1, num_classes=10, image_size=8, width=8)
    >>> student(torch.rand(2, 1, 8, 8)).shape     # in a recipe: student: {name: tiny_resnet, kwargs: {width: 8}}
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ModelError
from qdistill.models.registry import register

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            activation: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ activation): the unit BatchNorm folding turns into one conv.

    Example:
        >>> [type(layer).__name__ for layer in conv_bn(16, 16, groups=16, activation=nn.ReLU6)]   # depthwise
        ['Conv2d', 'BatchNorm2d', 'ReLU6']
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's two-conv block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Example:
        >>> BasicBlock(8, 16, stride=2)(torch.rand(2, 8, 8, 8)).shape     # 1x1 strided shortcut
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:  # 1x1 projection so the shapes add up
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem + three stages of BasicBlocks (widths w, 2w, 4w; strides 1, 2, 2) + global pool + linear head.

    Example:
        >>> TinyResNet(width=8, blocks=(1, 2, 1))(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        widths, strides = (width, 2 * width, 4 * width), (1, 2, 2)
        channels = width
        for index, (stage_width, stride, count) in enumerate(zip(widths, strides, blocks, strict=True), start=1):
            stage = [BasicBlock(channels if i == 0 else stage_width, stage_width, stride if i == 0 else 1)
                     for i in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            channels = stage_width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection (+ input).

    Example:
        >>> InvertedResidual(16, 16, stride=1, expand=4).use_residual
        True
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(in_channels, hidden, kernel=1, activation=nn.ReLU6))
        layers += [conv_bn(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),  # depthwise
                   conv_bn(hidden, out_channels, kernel=1, activation=None)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNetV2(nn.Module):
    """Stem, three stages of inverted residuals (widths w, 1.5w, 2w), a 1x1 head conv, pool, classifier.

    Example:
        >>> TinyMobileNetV2(width=8)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, expand: int = 4,
                 blocks: tuple[int, int, int] = (1, 2, 2), dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width, activation=nn.ReLU6)
        widths, strides, expands = (width, width * 3 // 2, width * 2), (1, 2, 2), (1, expand, expand)
        channels = width
        for index, (stage_width, stride, factor, count) in enumerate(zip(widths, strides, expands, blocks, strict=True), start=1):
            stage = [InvertedResidual(channels if i == 0 else stage_width, stage_width, stride if i == 0 else 1, factor)
                     for i in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            channels = stage_width
        self.head = conv_bn(channels, 4 * width, kernel=1, activation=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.pool(self.head(x)))


class SelfAttention(nn.Module):
    """Hand-written multi-head self-attention: q/k/v/output ``nn.Linear`` layers, float softmax.

    Example:
        >>> SelfAttention(16, heads=2)(torch.randn(2, 8, 16)).shape
        torch.Size([2, 8, 16])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E)
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)  # (B, H, L, L)
        return self.output((weights @ v).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with GELU.

    Example:
        >>> EncoderLayer(16, heads=2, attention="manual")(torch.randn(2, 8, 16)).shape
        torch.Size([2, 8, 16])
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, attention: str = "mha", dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.uses_mha = attention == "mha"
        self.attention = (nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self.uses_mha
                          else SelfAttention(dim, heads))
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E)
        y = self.norm1(x)
        attended = self.attention(y, y, y, need_weights=False)[0] if self.uses_mha else self.attention(y)
        x = x + attended
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Image rows as tokens: linear projection + learned position embedding, encoder layers, mean pool, head.

    An image ``(B, C, H, W)`` becomes ``H`` tokens of ``C * W`` features (digits: 8 tokens of 8).
    ``attention`` names each layer's attention: ``"mha"`` (nn.MultiheadAttention) or ``"manual"``.

    Example:
        >>> TinyTransformer(dim=16, heads=2, attention=("mha", "mha", "manual"))(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, dim: int = 32,
                 heads: int = 4, attention: tuple[str, ...] = ("mha", "manual"), mlp_ratio: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.project = nn.Linear(in_channels * image_size, dim)
        self.position = nn.Embedding(image_size, dim)
        self.register_buffer("positions", torch.arange(image_size), persistent=False)
        self.encoder = nn.Sequential(*[EncoderLayer(dim, heads, mlp_ratio, kind, dropout) for kind in attention])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        tokens = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W)
        x = self.project(tokens) + self.position(self.positions)  # (B, H, dim)
        x = self.norm(self.encoder(x))
        return self.head(x.mean(dim=1))


class TinyMLP(nn.Module):
    """Flatten, Linear-BatchNorm-activation blocks, linear head (BatchNorm1d folds into the Linear).

    Example:
        >>> TinyMLP(64, 10, hidden=(32,), activation="hardswish")(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (64, 32),
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ModelError(f"activation: {activation!r} is not allowed; allowed: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.BatchNorm1d(size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, num_classes)
        return self.net(x)


@register("tiny_resnet")
def tiny_resnet(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, **kwargs: Any) -> nn.Module:
    """ResNet with BasicBlocks (BatchNorm, residual additions, a strided 1x1 shortcut); ``width``, ``blocks``.

    Example:
        >>> from qdistill import models
        >>> models.create("tiny_resnet", in_channels=1, num_classes=10, image_size=8, width=8).fc.in_features
        32
    """
    return TinyResNet(in_channels, num_classes, **kwargs)


@register("tiny_mobilenetv2")
def tiny_mobilenetv2(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, **kwargs: Any) -> nn.Module:
    """MobileNetV2 (inverted residuals, depthwise convolutions, ReLU6); ``width``, ``expand``, ``blocks``.

    Example:
        >>> from qdistill import models
        >>> models.create("tiny_mobilenetv2", in_channels=1, num_classes=10, image_size=8, expand=2).layer2[0].use_residual
        False
    """
    return TinyMobileNetV2(in_channels, num_classes, **kwargs)


@register("tiny_transformer")
def tiny_transformer(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, **kwargs: Any) -> nn.Module:
    """Transformer encoder classifier over image rows; ``dim``, ``heads``, ``attention``, ``mlp_ratio``.

    Example:
        >>> from qdistill import models
        >>> len(models.create("tiny_transformer", in_channels=1, num_classes=10, image_size=8, attention=["manual"]).encoder)
        1
    """
    if "attention" in kwargs:
        kwargs["attention"] = tuple(kwargs["attention"])  # a YAML list
    return TinyTransformer(in_channels, num_classes, image_size, **kwargs)


@register("tiny_mlp")
def tiny_mlp(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, **kwargs: Any) -> nn.Module:
    """MLP with BatchNorm1d; ``hidden``, ``activation`` (relu, relu6, gelu, silu, hardswish).

    Example:
        >>> from qdistill import models
        >>> models.create("tiny_mlp", in_channels=1, num_classes=10, image_size=8, activation="gelu").net[3]
        GELU(approximate='none')
    """
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return TinyMLP(in_channels * image_size * image_size, num_classes, **kwargs)


TINY_MODELS = ("tiny_resnet", "tiny_mobilenetv2", "tiny_transformer", "tiny_mlp")
