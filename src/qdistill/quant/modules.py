"""Quantized layers: float layers whose weights and inputs pass through ``Quantizer``s.

Each class subclasses its float layer, so attributes, ``state_dict`` keys and ``repr`` stay
familiar; ``from_float`` copies a float layer in, ``to_float`` gives back a float layer holding
the fake-quantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from qdistill.errors import ModelError
from qdistill.quant.fake_quant import MIN_SCALE
from qdistill.quant.float_kernels import GELU_BOUND, attach_runtime_values, ort_gelu
from qdistill.quant.quantizer import SMOOTHING_BUFFER, Quantizer
from qdistill.quant.runtime_kernels import (
    QLINEAR_ADD_EXACT,
    QLINEAR_GLOBAL_AVERAGE_POOL_EXACT,
    QLINEAR_MUL_EXACT,
    qlinear_add,
    qlinear_average_pool,
    qlinear_mul,
)


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

    def unsmoothed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with its input quantizer's smoothing factors (``quant.smoothing``) taken out: the float layer's."""
        smoothing = None if self.input_quantizer is None else self.input_quantizer._buffers.get(SMOOTHING_BUFFER)
        return weight if smoothing is None else weight * smoothing

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias on the int32 grid ``s_x * s_w`` that integer runtimes add it on.

        ONNX Runtime adds a conv/linear bias as an integer in units of input step times weight
        step; training with the bias already on that grid (straight-through gradient) makes the
        exported int8 model compute exactly what the student computed.
        """
        bias, input_quantizer = self.bias, self.input_quantizer
        weight_quantizer = self.weight_quantizer
        if (bias is None or input_quantizer is None or not isinstance(weight_quantizer, Quantizer)
                or torch.onnx.is_in_onnx_export() or input_quantizer._observing
                or not input_quantizer.is_initialized() or not weight_quantizer.is_initialized()):  # no host sync
            return bias
        with torch.no_grad():  # the rounding is a constant offset for autograd (straight-through): no graph to record
            step = input_quantizer.scale.clamp_min(MIN_SCALE) * weight_quantizer.scale.clamp_min(MIN_SCALE)
            offset = torch.round(bias / step).mul_(step).sub_(bias)  # step broadcasts to (C_out,)
        return bias + offset

    def computes_on_integers(self) -> bool:
        """True when the forward runs as an integer runtime does: no gradient, both quantizers set.

        Training keeps the float formula (its gradients are the LSQ ones); evaluation, the parity
        gate and the teacher-free forwards take ``integer_forward``, whose values are the int8
        file's up to the final requantization.
        """
        input_quantizer, weight_quantizer = self.input_quantizer, self.weight_quantizer
        return (not torch.is_grad_enabled() and input_quantizer is not None and isinstance(weight_quantizer, Quantizer)
                and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()
                and not input_quantizer._observing and input_quantizer.is_initialized()
                and weight_quantizer.is_initialized())

    def integer_forward(self, x: torch.Tensor, layer_op) -> torch.Tensor:
        """``layer_op`` (a conv or linear without bias) on integer codes, plus the int32 bias, scaled once.

        ONNX Runtime accumulates ``(x_q - z_x) * w_q`` in int32; a requantizing kernel (QLinearConv,
        QGemm with a quantized output) adds the bias in units of ``s_x * s_w`` and requantizes once;
        a float-output kernel converts the sum to float32, scales it and adds the bias (on its grid)
        in float. A float forward on dequantized values rounds every partial sum instead; one code
        in about 10^4 then lands on the other side of a rounding tie, and deep networks amplify it
        (ResNet-50: 30 dB at the logits).
        Here the codes are integer-valued floats, summed exactly: in float32 while every partial
        sum stays below 2^24 (checked on the actual codes), else in float64.
        """
        input_scale = self.input_quantizer.scale.clamp_min(MIN_SCALE)
        weight_scale = self.weight_quantizer.scale.clamp_min(MIN_SCALE)
        channel_shape = (-1,) + (1,) * (self.weight.dim() - 1)
        x_codes = torch.round(self.quantize_input(x) / input_scale)  # q - z, exactly
        w_codes = torch.round(self.quantized_weight() / weight_scale.reshape(channel_shape))
        largest_sum = x_codes.abs().max() * w_codes.abs().flatten(1).sum(dim=1).max()
        exact_dtype = torch.float32 if float(largest_sum) < 2**24 else torch.float64
        accumulated = layer_op(x_codes.to(exact_dtype), w_codes.to(exact_dtype))
        step = input_scale * weight_scale  # (C_out,): the bias grid, as in quantized_bias
        out_shape = (1, -1) + (1,) * (accumulated.dim() - 2) if self.weight.dim() > 2 else (-1,)
        bias_codes = None if self.bias is None else torch.round(self.bias / step.expand_as(self.bias)).reshape(out_shape)
        step = step.expand(self.weight.shape[0]).reshape(out_shape)
        requantizer = self.__dict__.get("requantizer")  # set by quant.sharing.link_requantizers
        if requantizer is None or requantizer._observing or not requantizer.is_initialized():
            # a float-output kernel (QGemm, MatMulIntegerToFloat, ConvInteger + Mul): float32(sum) * step,
            # then the bias on its grid, float32(codes * step), added in float (measured on ONNX Runtime)
            scaled = accumulated.to(x.dtype) * step
            return scaled if bias_codes is None else scaled + bias_codes * step
        if bias_codes is not None:
            accumulated = accumulated + bias_codes.to(exact_dtype)  # QLinearConv/QGemm take an int32 bias
        accumulated = accumulated.to(x.dtype)  # int32 -> float32, as the runtime converts its sum
        # the runtime's requantization: round(sum * (s_x * s_w / s_y)) + z_y, clamped; one rounding
        output_scale = requantizer.scale.clamp_min(MIN_SCALE)
        zero = requantizer.zero_point.to(x.dtype)
        qrange = requantizer.qrange
        codes = (torch.round(accumulated * (step / output_scale)) + zero).clamp_(qrange.qmin, qrange.qmax)
        return (codes - zero) * output_scale

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

    def as_float(self) -> nn.Module:
        """The float layer again (same parameters, no quantizers): ``prepare``'s undo for one layer."""
        float_class = self.__class__.__mro__[2]
        layer = float_class.__new__(float_class)
        layer.__dict__ = {key: value for key, value in self.__dict__.items()}
        layer._modules = {}
        layer._parameters = dict(self._parameters)
        if self.input_quantizer is not None and SMOOTHING_BUFFER in self.input_quantizer._buffers:
            layer.weight = nn.Parameter(self.unsmoothed_weight(self.weight.detach()).clone())
        return layer

    def to_float(self) -> nn.Module:
        """A plain float layer whose weight is this layer's quantized weight."""
        float_class = self.__class__.__mro__[2]
        layer = float_class.__new__(float_class)
        layer.__dict__ = {key: value for key, value in self.__dict__.items()}
        layer._modules = {}
        layer._parameters = dict(self._parameters)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.unsmoothed_weight(self.quantized_weight().detach()).clone())
        return layer


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """``nn.Conv1d`` with per-output-channel weight and per-tensor input fake quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computes_on_integers():
            return self.integer_forward(x, lambda codes, weight: self._conv_forward(codes, weight, None))
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.quantized_bias())


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` (grouped and depthwise too) with fake-quantized weight and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if self.computes_on_integers():
            return self.integer_forward(x, lambda codes, weight: self._conv_forward(codes, weight, None))
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.quantized_bias())


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with per-output-feature weight and per-tensor input fake quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computes_on_integers():
            return self.integer_forward(x, F.linear)
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.quantized_bias())


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


class ActivationQuantizer(Quantizer):
    """Per-tensor activation quantizer that every consumer of one tensor can share.

    ONNX Runtime fuses a producer (conv, add, ...) into an integer kernel only when its output
    feeds exactly one ``QuantizeLinear``. ``prepare`` therefore gives all consumers of a tensor
    (a residual's conv and its add, the q/k/v projections) one shared instance, and within one
    forward pass a repeated call on the same, unmodified tensor returns the first call's result:
    the same values, one autograd node, and one Q/DQ pair in the exported graph.

    Example:
        >>> shared = ActivationQuantizer(bits=8)
        >>> shared.observe(); _ = shared(torch.rand(4, 8)); shared.finish_calibration()
        >>> x = torch.rand(4, 8)
        >>> shared(x) is shared(x)
        True
    """

    _holding: list[ActivationQuantizer] = []  # the instances whose memo is set (``clear_memos`` empties them)

    def __init__(self, bits: int, init: str = "mse", percentile: float = 99.99, learn_scale: bool = True,
                 learn_input_scale: bool = False) -> None:
        super().__init__(bits, signed=False, init=init, percentile=percentile, learn_scale=learn_scale, role="activation",
                         learn_input_scale=learn_input_scale)
        self._memo: tuple | None = None

    def _memo_key(self, x: torch.Tensor) -> tuple:
        # any change of input (in place), state, step size or autograd/tracing mode invalidates the memo
        return (x._version, self._observing, self.initialized._version, self.scale._version,
                torch.is_grad_enabled(), torch.jit.is_tracing(), torch.onnx.is_in_onnx_export())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._memo_key(x)
        if self._memo is not None and self._memo[0] is x and self._memo[1] == key:
            return self._memo[2]
        output = super().forward(x)
        if self._memo is None:
            ActivationQuantizer._holding.append(self)
        self._memo = (x, key, output)
        return output

    def clear_memo(self) -> None:
        """Drop the remembered tensors (``prepare`` does this after every forward of the model)."""
        self._memo = None

    def observe(self) -> None:
        self.clear_memo()
        super().observe()

    def __getstate__(self) -> dict:
        # deepcopy/pickle must not carry tensors of a past forward (non-leaf tensors cannot be copied)
        state = self.__dict__.copy()
        state["_memo"] = None
        return state


def clear_memos(model: nn.Module, *_: object) -> None:
    """Forget every shared quantizer's last tensors (used as a forward hook, hence ``*_``).

    Only the quantizers that remembered something since the last call are visited
    (``ActivationQuantizer._holding``), not every module of ``model``: the hook runs twice per
    forward, and walking a few dozen modules each time was a measurable part of a small model's
    training step. Forgetting another model's memo is harmless: a memo only saves recomputing
    values that would come out the same.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> handle = model.register_forward_hook(clear_memos)      # prepare does this
    """
    holding = ActivationQuantizer._holding
    while holding:
        holding.pop()._memo = None


class InputQuantizedMixin:
    """A float op whose input (and, for pools, nothing else) is fake-quantized.

    Used for ops that run on integers in ONNX Runtime without weights (average pools) and for
    LayerNorm, which stays float but whose quantized input lets the residual Add before it fuse.

    Example:
        >>> pool = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), ActivationQuantizer(8))
        >>> pool(torch.rand(2, 4, 8, 8)).shape, pool.act_bits
        (torch.Size([2, 4, 1, 1]), 8)
    """

    input_quantizer: Quantizer

    @property
    def act_bits(self) -> int:
        return self.input_quantizer.bits

    def input_slots(self) -> list[str]:
        """Attribute names of the quantizer of each positional input."""
        return ["input_quantizer"]

    @classmethod
    def from_float(cls, layer: nn.Module, input_quantizer: Quantizer):
        """A copy of ``layer`` (sharing its parameters) with ``input_quantizer`` on its input."""
        quantized = cls.__new__(cls)
        quantized.__dict__ = dict(layer.__dict__)
        quantized._parameters = dict(layer._parameters)
        quantized._buffers = dict(layer._buffers)
        quantized._modules = dict(layer._modules)
        quantized.input_quantizer = input_quantizer
        return quantized


def quantize_output(op: nn.Module, result: torch.Tensor) -> torch.Tensor:
    """``result`` through the op's ``output_quantizer`` when ``prepare`` gave it one (its result feeds float ops).

    ONNX Runtime's integer kernels for adds, products, concatenations and pools write integers, so
    they need the scale of the tensor they produce; when no quantized consumer provides one, the op
    quantizes its own result.

    Example:
        >>> add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> quantize_output(add, torch.ones(2)) is not None
        True
    """
    quantizer = op._modules.get("output_quantizer")
    return result if quantizer is None else quantizer(result)


class QuantAvgPool2d(InputQuantizedMixin, nn.AvgPool2d):
    """``nn.AvgPool2d`` on a fake-quantized input (ONNX Runtime: ``QLinearAveragePool``).

    An evaluation forward whose result ends in one quantizer computes as ONNX Runtime's kernel does
    (``qlinear_average_pool``); training keeps the float mean and its gradient.

    Example:
        >>> QuantAvgPool2d.from_float(nn.AvgPool2d(2), ActivationQuantizer(8))(torch.rand(1, 3, 4, 4)).shape
        torch.Size([1, 3, 2, 2])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = self.input_quantizer(x)
        requantizer = None if self.divisor_override else evaluation_requantizer(self, [self.input_quantizer])
        if requantizer is not None and max(self.act_bits, requantizer.bits) <= 8 and _kernel_matches(x, self):
            return qlinear_average_pool(x, self, self.input_quantizer, requantizer)
        return quantize_output(self, super().forward(x))


class QuantAdaptiveAvgPool2d(InputQuantizedMixin, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` on a fake-quantized input (``QLinearGlobalAveragePool`` at size 1,
    ``QLinearAveragePool`` at output sizes that divide the input).

    An evaluation forward whose result ends in one quantizer (``output_quantizer``, or the one
    ``link_requantizers`` found) computes as ONNX Runtime's kernel does (``qlinear_average_pool``, which
    runs ``qlinear_global_average_pool`` at size 1); training keeps the float mean and its gradient.

    Example:
        >>> QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), ActivationQuantizer(4)).act_bits
        4
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = self.input_quantizer(x)
        requantizer = evaluation_requantizer(self, [self.input_quantizer])
        window = None if requantizer is None else _adaptive_window(x, self.output_size)
        if window is not None and max(self.act_bits, requantizer.bits) <= 8 and _kernel_matches(x, window):
            return qlinear_average_pool(x, window, self.input_quantizer, requantizer)  # the runtime's kernel
        return quantize_output(self, super().forward(x))


def _adaptive_window(x: torch.Tensor, output_size) -> nn.AvgPool2d | None:
    """The ``AveragePool`` the exporter writes for an adaptive pool to ``output_size`` on ``x``: a kernel
    and stride of input / output size where that divides (the whole image at size 1); else None."""
    wanted = [size if size is not None else x.shape[-2 + axis] for axis, size in enumerate(_pair(output_size))]
    if any(x.shape[-2 + axis] % size for axis, size in enumerate(wanted)):
        return None
    kernel = tuple(x.shape[-2 + axis] // size for axis, size in enumerate(wanted))
    return nn.AvgPool2d(kernel, stride=kernel)


def _kernel_matches(x: torch.Tensor, pool: nn.AvgPool2d) -> bool:
    """Whether this CPU runs the integer kernel the student reproduces: the plain C++ ``QLinearAveragePool``
    everywhere, MLAS's global kernel (a window over the whole unpadded image) on x86 only."""
    whole_image = tuple(x.shape[-2:]) == _pair(pool.kernel_size) and _pair(pool.padding) == (0, 0)
    return QLINEAR_GLOBAL_AVERAGE_POOL_EXACT or not whole_image


class QuantLayerNorm(InputQuantizedMixin, nn.LayerNorm):
    """``nn.LayerNorm`` computed in float on a fake-quantized input.

    The statistics stay float (they are per sample); quantizing the input means the residual
    stream it reads is one integer tensor, shared with the next residual Add.

    Example:
        >>> norm = QuantLayerNorm.from_float(nn.LayerNorm(16), ActivationQuantizer(8))
        >>> norm(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class QuantInputOf(InputQuantizedMixin, nn.Module):
    """Any module (``inner``) run on a fake-quantized input; its own forward is unchanged.

    Used for LayerNorm subclasses with their own forward (torchvision's ``LayerNorm2d`` permutes
    around ``F.layer_norm``): the residual stream they read becomes one integer tensor.

    Example:
        >>> norm = QuantInputOf(nn.GroupNorm(2, 4), ActivationQuantizer(8))
        >>> norm(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """

    def __init__(self, inner: nn.Module, input_quantizer: Quantizer) -> None:
        super().__init__()
        self.inner = inner
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.input_quantizer(x))


class RuntimeGelu(nn.Module):
    """Float GELU (erf form) whose result, while the student evaluates, carries ONNX Runtime's exact values.

    A transformer's feed-forward GELU stays float (``attention.GELU_NOTE``); the quantizer of the
    Linear after it reads its result. PyTorch's erf and MLAS's differ by a few ulps in a third of
    the values, enough to flip a code next to a rounding tie, and a 4-bit student amplifies each
    flip. Training (and export, which writes PyTorch's erf formula) use ``F.gelu``; without a
    gradient the result is marked (``float_kernels.attach_runtime_values``) so that a quantizer
    reading it takes ``float_kernels.ort_gelu`` where its codes could differ.

    Example:
        >>> x = torch.randn(4, 8)
        >>> with torch.no_grad():
        ...     y = RuntimeGelu()(x)
        >>> torch.equal(y, F.gelu(x)), hasattr(y, "_qdistill_runtime")
        (True, True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(x)
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or torch.onnx.is_in_onnx_export()
                or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return y
        return attach_runtime_values(y, lambda mask: ort_gelu(x[mask]), (x.abs() + 1.0) * GELU_BOUND)


class QuantElementwise(QuantInputOf):
    """An elementwise activation (SiLU, sigmoid, hardswish, GELU, ...) on a fake-quantized input.

    With at most 256 input codes, the function is a table: the export writes it as an integer
    ``Gather`` from a 256-entry table computed by this very module, so ONNX Runtime gives the
    student's values exactly, and the layer before it ends in a quantizer (fused ``QLinearConv``).

    Example:
        >>> act = QuantElementwise(nn.SiLU(), ActivationQuantizer(8))
        >>> act.input_quantizer.observe(); _ = act(torch.randn(64)); act.input_quantizer.finish_calibration()
        >>> x = torch.randn(5)
        >>> torch.equal(act(x), nn.functional.silu(act.input_quantizer(x)))
        True
    """

    def lookup_table(self) -> torch.Tensor:
        """The output for each input code, indexed by the code modulo 256 (a signed code -1 is entry 255)."""
        quantizer = self.input_quantizer
        codes = torch.arange(quantizer.qrange.qmin, quantizer.qrange.qmax + 1, dtype=torch.float32)
        scale = quantizer.scale.detach().float().clamp_min(MIN_SCALE).reshape(())
        zero_point = quantizer.zero_point.detach().float().reshape(())
        device = scale.device
        with torch.no_grad():
            values = self.inner(quantizer((codes.to(device) - zero_point) * scale))
        table = torch.zeros(256, dtype=torch.float32)
        table[codes.long() % 256] = values.float().cpu()
        return table


def evaluation_requantizer(op: nn.Module, input_quantizers: list[Quantizer]) -> Quantizer | None:
    """The quantizer that ``op``'s exported integer kernel writes with, when ``op``'s forward should
    compute as that kernel does; else None.

    That is an evaluation forward (no gradient, not exporting or tracing) with the op's result ending in
    one quantizer (its ``output_quantizer``, or the ``requantizer`` that ``link_requantizers`` found) and
    every quantizer involved calibrated. Training keeps the float formula and its gradients.

    Example:
        >>> add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> evaluation_requantizer(add, [add.input0_quantizer, add.input1_quantizer]) is None   # not linked
        True
    """
    if torch.is_grad_enabled() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return None
    requantizer = op._modules.get("output_quantizer") or op.__dict__.get("requantizer")
    if requantizer is None or any(q._observing or not q.is_initialized() for q in (*input_quantizers, requantizer)):
        return None
    return requantizer


class _TwoInputOp(nn.Module):
    """An op on two fake-quantized tensors (``QuantAdd``, ``QuantMul``, ``QuantMatMul``): its quantizers and bits."""

    combines = "combines"  # the verb of the one-line error

    def __init__(self, input_quantizers: list[Quantizer]) -> None:
        super().__init__()
        if len(input_quantizers) != 2:
            raise ModelError(f"input_quantizers: {len(input_quantizers)} given; allowed: exactly 2 "
                             f"({type(self).__name__} {self.combines} two tensors)")
        self.input0_quantizer, self.input1_quantizer = input_quantizers

    @property
    def act_bits(self) -> int:
        return max(self.input0_quantizer.bits, self.input1_quantizer.bits)

    def input_slots(self) -> list[str]:
        """Attribute names of the quantizer of each positional input."""
        return ["input0_quantizer", "input1_quantizer"]

    def integer_requantizer(self, a: torch.Tensor, b: torch.Tensor) -> Quantizer | None:
        """The quantizer the exported integer kernel (``QLinearAdd``, ``QLinearMul``) writes with, when this
        forward should compute as that kernel does.

        That is an ``evaluation_requantizer``, reached directly or through a ReLU that the runtime drops
        (zero point at the grid's minimum). The caller checks that this CPU's ONNX Runtime runs the
        kernel it reproduces.
        """
        requantizer = evaluation_requantizer(self, [self.input0_quantizer, self.input1_quantizer])
        if requantizer is None:
            return None
        if self.__dict__.get("requantizer_after_relu") and "output_quantizer" not in self._modules:
            if requantizer.qrange.qmin != 0 or not requantizer.zero_is_zero():  # the runtime keeps the ReLU: a float op
                return None
        return requantizer


class QuantAdd(_TwoInputOp):
    """``a + b`` of two fake-quantized tensors: a residual addition (ONNX Runtime: ``QLinearAdd``).

    ``prepare`` puts one where a model's forward adds two tensors (``out + identity``).

    Example:
        >>> add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> add(torch.rand(2, 4), torch.rand(2, 4)).shape
        torch.Size([2, 4])
    """

    combines = "adds"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.input0_quantizer(a), self.input1_quantizer(b)
        requantizer = self.integer_requantizer(a, b) if QLINEAR_ADD_EXACT and a.shape == b.shape else None
        if requantizer is not None:  # evaluation: the runtime's QLinearAdd, code for code
            return qlinear_add(a, b, self.input0_quantizer, self.input1_quantizer, requantizer)
        return quantize_output(self, a + b)


class QuantCat(nn.Module):
    """``torch.cat`` of fake-quantized tensors along ``dim`` (ONNX Runtime: ``QLinearConcat``).

    Example:
        >>> cat = QuantCat([ActivationQuantizer(8), ActivationQuantizer(8)], dim=1)
        >>> cat(torch.rand(2, 3), torch.rand(2, 5)).shape
        torch.Size([2, 8])
    """

    def __init__(self, input_quantizers: list[Quantizer], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.count = len(input_quantizers)
        for index, quantizer in enumerate(input_quantizers):
            setattr(self, f"input{index}_quantizer", quantizer)

    def extra_repr(self) -> str:
        return f"inputs={self.count}, dim={self.dim}"

    @property
    def act_bits(self) -> int:
        return max(getattr(self, slot).bits for slot in self.input_slots())

    def input_slots(self) -> list[str]:
        """Attribute names of the quantizer of each positional input."""
        return [f"input{index}_quantizer" for index in range(self.count)]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [getattr(self, slot)(t) for slot, t in zip(self.input_slots(), tensors, strict=True)]
        return quantize_output(self, torch.cat(inputs, dim=self.dim))


class QuantMul(_TwoInputOp):
    """``a * b`` of two fake-quantized tensors (a squeeze-excite gate; ONNX Runtime: ``QLinearMul``).

    Example:
        >>> mul = QuantMul([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> mul(torch.rand(2, 4, 3, 3), torch.rand(2, 4, 1, 1)).shape
        torch.Size([2, 4, 3, 3])
    """

    combines = "multiplies"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.input0_quantizer(a), self.input1_quantizer(b)
        requantizer = self.integer_requantizer(a, b) if QLINEAR_MUL_EXACT and _bits_at_most_8(self) else None
        if requantizer is not None:  # evaluation: the runtime's QLinearMul, code for code
            return qlinear_mul(a, b, self.input0_quantizer, self.input1_quantizer, requantizer)
        return quantize_output(self, a * b)


def _bits_at_most_8(op: _TwoInputOp) -> bool:
    return op.act_bits <= 8  # wider codes have no QLinearMul (and their product leaves float32's exact integers)


class QuantMatMul(_TwoInputOp):
    """``a @ b`` of two fake-quantized activations: attention scores and their use on values
    (ONNX Runtime: ``QLinearMatMul``, or ``MatMulIntegerToFloat`` when the result stays float, as
    before a softmax).

    Example:
        >>> matmul = QuantMatMul([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> matmul(torch.rand(2, 3, 5, 4), torch.rand(2, 3, 4, 5)).shape
        torch.Size([2, 3, 5, 5])
    """

    combines = "multiplies"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input0_quantizer(a), self.input1_quantizer(b))


ELEMENTWISE_ACTIVATIONS = (nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.Mish, nn.ELU,
                           nn.CELU, nn.SELU, nn.Softplus, nn.LeakyReLU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
# timm's own activation modules (timm.layers.activations*), by class name: elementwise, no parameters
TIMM_ELEMENTWISE = {"Swish", "SiLU", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "Mish", "GELU",
                    "GELUTanh", "QuickGELU", "HardSwishMe", "HardSigmoidMe", "HardMishMe", "SwishMe", "MishMe"}
# Hugging Face transformers' activation modules (transformers.activations), by class name: elementwise, no parameters
HF_ELEMENTWISE = {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                  "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "MishActivation", "AccurateGELUActivation"}


def is_elementwise_activation(module: nn.Module) -> bool:
    """An activation that maps each value on its own, without parameters (ReLU and ReLU6 excluded:
    the export runs them as integer clamps already).

    Example:
        >>> is_elementwise_activation(nn.SiLU()), is_elementwise_activation(nn.ReLU()), is_elementwise_activation(nn.PReLU())
        (True, False, False)
    """
    if isinstance(module, ELEMENTWISE_ACTIVATIONS):
        return True
    kind = type(module)
    named = ((kind.__module__.startswith("timm.layers.activations") and kind.__name__ in TIMM_ELEMENTWISE)
             or (kind.__module__.startswith("transformers.activations") and kind.__name__ in HF_ELEMENTWISE))
    return named and not any(True for _ in module.parameters())


INPUT_QUANTIZED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.AvgPool2d: QuantAvgPool2d,
    nn.AdaptiveAvgPool2d: QuantAdaptiveAvgPool2d,
    nn.LayerNorm: QuantLayerNorm,
}
QUANTIZED_OPS = (QuantAdd, QuantMul, QuantMatMul, QuantCat, QuantAvgPool2d, QuantAdaptiveAvgPool2d)


def input_slots(module: nn.Module) -> list[str | None]:
    """Per positional input of ``module``, the attribute holding its quantizer (None: not quantized).

    Example:
        >>> input_slots(QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)]))
        ['input0_quantizer', 'input1_quantizer']
    """
    if isinstance(module, QuantLayerMixin):
        return ["input_quantizer" if module.input_quantizer is not None else None]
    if isinstance(module, (InputQuantizedMixin, QuantAdd, QuantMul, QuantMatMul, QuantCat)):
        return module.input_slots()
    return []
