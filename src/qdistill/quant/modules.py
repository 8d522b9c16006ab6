"""Quantized layers: float layers whose weights and inputs pass through ``Quantizer``s.

Each class subclasses its float layer, so attributes, ``state_dict`` keys and ``repr`` stay
familiar; ``from_float`` copies a float layer in, ``to_float`` gives back a float layer holding
the fake-quantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.quant.quantizer import Quantizer


class QuantLayerMixin:
    """Shared parts of every quantized layer: its two quantizers and the float round trip."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer | None

    def attach_quantizers(self, weight_quantizer: Quantizer, input_quantizer: Quantizer | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer computes with it (on the integer grid times the scale)."""
        return self.weight_quantizer(self.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer: Quantizer, input_quantizer: Quantizer | None):
        """A quantized copy of ``layer`` (same weights, same device and dtype)."""
        quantized = cls.__new__(cls)
        quantized.__dict__ = {key: value for key, value in layer.__dict__.items()}
        quantized._parameters = dict(layer._parameters)
        quantized._buffers = dict(layer._buffers)
        quantized._modules = dict(layer._modules)
        weight = layer.weight
        quantized.attach_quantizers(weight_quantizer.to(weight.device), input_quantizer and input_quantizer.to(weight.device))
        return quantized

    def to_float(self) -> nn.Module:
        """A plain float layer whose weight is this layer's quantized weight."""
        float_class = self.__class__.__mro__[2]
        layer = float_class.__new__(float_class)
        layer.__dict__ = {key: value for key, value in self.__dict__.items()}
        layer._modules = {}
        layer._parameters = dict(self._parameters)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.quantized_weight().detach().clone())
        return layer


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """``nn.Conv1d`` with per-output-channel weight and per-tensor input fake quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` (grouped and depthwise too) with fake-quantized weight and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with per-output-feature weight and per-tensor input fake quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(QuantLayerMixin, nn.Embedding):
    """``nn.Embedding`` with per-row weight quantization (its input is indices, never quantized)."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            indices, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )


QUANTIZED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}


def is_quantized(module: nn.Module) -> bool:
    """True for the layers ``prepare`` puts in place."""
    return isinstance(module, QuantLayerMixin)
