"""Fake quantization for QAT: quantizers, quantized layers, ``prepare`` and BatchNorm folding."""

from qdistill.quant.fake_quant import IntRange, fake_quantize, reference_fake_quantize
from qdistill.quant.fold import fold_batchnorms, fold_into
from qdistill.quant.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, is_quantized
from qdistill.quant.prepare import calibrate, check_overrides, layer_table, prepare, quantizable_layers
from qdistill.quant.quantizer import Quantizer

__all__ = [
    "IntRange", "Quantizer", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear",
    "calibrate", "check_overrides", "fake_quantize", "fold_batchnorms", "fold_into", "is_quantized", "layer_table",
    "prepare", "quantizable_layers", "reference_fake_quantize",
]
