"""The seed's architectures: ``mnist_cnn`` (the method's worked example, conv32-pool-conv64-pool-fc128-fc10),
``mnist_cnn_small`` (the half-width student) and ``mlp``.

Example:
    >>> import torch
    >>> from qdistill import models
    >>> models.create("mnist_cnn", in_channels=1, num_classes=10, image_size=28)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qdistill.models.registry import register


class ConvNet(nn.Module):
    """conv-pool-conv-pool-fc-fc classifier, the seed's MNIST CNN at ``width=32``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        pooled = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * pooled * pooled, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks, then a linear head."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, ...] = (256, 128),
                 dropout: float = 0.1, **_: Any) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, ...) -> (B, num_classes)
        return self.net(x)


@register("mnist_cnn")
def mnist_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, **kwargs: Any) -> nn.Module:
    """The method's MNIST CNN: conv32-pool-conv64-pool-fc128-fc10."""
    return ConvNet(in_channels, num_classes, image_size, width=32, hidden=128, **kwargs)


@register("mnist_cnn_small")
def mnist_cnn_small(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, **kwargs: Any) -> nn.Module:
    """Half-width student: conv16-pool-conv32-pool-fc64-fc10."""
    return ConvNet(in_channels, num_classes, image_size, width=16, hidden=64, **kwargs)


@register("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, **kwargs: Any) -> nn.Module:
    """Two hidden layers (256, 128) on the flattened input."""
    return MLP(in_channels * image_size * image_size, num_classes, **kwargs)


def hint_layer(name: str, kwargs: dict[str, Any] | None = None) -> str | None:
    """The layer a built-in model offers for feature hints (``distill.features: auto``), or None for other models.

    ``mnist_cnn`` and ``mnist_cnn_small``: ``features``, the output of the last conv block (before the
    classifier; a 1x1 conv adapter maps the half-width student's channels to the teacher's). ``mlp``: the
    last hidden layer's activation.

    Example:
        >>> hint_layer("mnist_cnn_small"), hint_layer("mlp"), hint_layer("mlp", {"hidden": [64]}), hint_layer("resnet18")
        ('features', 'net.5', 'net.2', None)
    """
    if name in ("mnist_cnn", "mnist_cnn_small"):
        return "features"
    if name == "mlp":
        hidden = (kwargs or {}).get("hidden", (256, 128))
        return f"net.{3 * len(hidden) - 1}" if hidden else None  # Flatten, then (Linear, ReLU, Dropout) per layer
    return None
