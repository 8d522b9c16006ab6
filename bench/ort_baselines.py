"""ONNX Runtime's own quantization of an fp32 ONNX file: the baseline qdistill's int8 files are timed against.

``quantize_static`` as its documentation shows for CNNs: QDQ format, per-channel int8 weights, uint8
activations, MinMax calibration on real images. Shared by the benchmarks (speed_bench, vision_bench;
transformer_bench times ``quantize_dynamic`` the same way).

A file compared with one of these baselines is judged by ``qdistill.export.latency.compare_speed`` on
``COMPARISON_ROUNDS`` paired rounds, beside the baseline's file timed a second time in its own session
(``again``): the A/A control, which shows how far apart two identical files time in the same run.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

COMPARISON_ROUNDS = 9  # paired rounds per latency number: compare_speed's t-test then has 8 degrees of freedom


def again(label: str) -> str:
    """The label of ``label``'s file timed again in a second session (the A/A control).

    Example:
        >>> again("quantize_static")
        'quantize_static_again'
    """
    return f"{label}_again"


class ImageBatches(CalibrationDataReader):
    """Calibration batches of 32 images, fed under the model's input name."""

    def __init__(self, images: torch.Tensor, input_name: str) -> None:
        self.batches = iter([{input_name: images[i:i + 32].numpy()} for i in range(0, len(images), 32)])

    def get_next(self):
        return next(self.batches, None)


def static_quantized(fp32_path: str | Path, out_path: str | Path, images: torch.Tensor, reduce_range: bool = False) -> str:
    """``quantize_static`` of ``fp32_path`` calibrated on ``images``; returns the written path.

    ``reduce_range``: 7-bit weights, ONNX Runtime's advice for x86 CPUs without VNNI."""
    input_name = onnx.load(str(fp32_path)).graph.input[0].name
    quantize_static(str(fp32_path), str(out_path), ImageBatches(images.float(), input_name), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return str(out_path)
