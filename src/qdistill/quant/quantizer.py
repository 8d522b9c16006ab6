"""``Quantizer``: a module built from small parts (grid, range init, LSQ step) for one tensor.

A quantizer has three phases: *observing* (calibration: it records statistics and passes values
through), *initialised* (it fake-quantizes with its scale and zero point), and, inside an ONNX
export, it writes QuantizeLinear/DequantizeLinear nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from qdistill.errors import RecipeError
from qdistill.quant.fake_quant import MIN_SCALE, IntRange, fake_quantize, lsq_grad_factor
from qdistill.quant.float_kernels import refine_near_ties, scale_channels
from qdistill.quant.ranges import activation_params, weight_scale

SMOOTHING_BUFFER = "input_smoothing"  # an input quantizer's 1/s per channel, multiplied in first (quant/smoothing.py)
SAMPLE_SIZE = 1 << 16  # activation values kept for MSE/percentile calibration
ROLES = ("weight", "activation")


class Quantizer(nn.Module):
    """Fake quantizer for weights (symmetric, per channel or per tensor) or activations (asymmetric, per tensor).

    ``role`` (``"weight"`` or ``"activation"``; by default ``"weight"`` when ``channels`` is given)
    decides ``N`` in LSQ's gradient scale ``g = 1 / sqrt(N * qmax)``, the number of elements one
    step size applies to:

    - weights: every element the step size quantizes, i.e. the whole tensor per tensor and one
      output channel's elements per channel (the LSQ paper's ``N_W``);
    - activations: the elements of *one sample* (``x.numel() / x.shape[0]``, the first dimension
      being the batch), the paper's ``N_F`` (features of the layer). The step-size gradient is a
      sum over the batch of per-element terms whose loss is a batch mean, so it already is a
      per-sample average; counting the batch in ``N`` as well would shrink the step's updates by
      ``sqrt(batch size)`` and make them depend on the batch size.

    Example:
        >>> weight_q = Quantizer(bits=4, signed=True, channels=16)        # per-channel weights
        >>> act_q = Quantizer(bits=4, signed=False)                       # per-tensor activations
        >>> act_q.observe(); _ = act_q(torch.rand(8, 16)); act_q.finish_calibration()
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        channels: int | None = None,
        init: str = "mse",
        percentile: float = 99.99,
        learn_scale: bool = True,
        role: str | None = None,
        learn_input_scale: bool = False,
    ) -> None:
        super().__init__()
        self.qrange = IntRange(bits, signed)
        self.role = role or ("weight" if channels is not None else "activation")
        if self.role not in ROLES:
            raise RecipeError(f"role: {role!r} is not allowed; allowed: {', '.join(map(repr, ROLES))}")
        self.axis = 0 if channels is not None else None
        self.init_method = init
        self.learn_input_scale = learn_input_scale
        self.percentile = percentile
        shape = (channels,) if channels is not None else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self._observing = False
        self._low: torch.Tensor | None = None
        self._high: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._initialized_seen: tuple[torch.Tensor, int, bool] | None = None
        self._zero_seen: tuple[torch.Tensor, int, bool] | None = None

    @property
    def bits(self) -> int:
        return self.qrange.bits

    def extra_repr(self) -> str:
        kind = "per_channel" if self.axis is not None else "per_tensor"
        return f"bits={self.bits}, signed={self.qrange.signed}, {kind}, {self.role}, init={self.init_method}"

    def observe(self) -> None:
        """Start calibration: record statistics and pass values through unchanged."""
        self._observing = True
        self._low = self._high = None
        self._samples = []

    def init_from_weight(self, weight: torch.Tensor) -> None:
        """Set the step size(s) from a weight tensor (symmetric, zero point 0)."""
        with torch.no_grad():
            scale = weight_scale(weight, self.qrange, self.init_method, self.axis is not None, self.percentile)
            self.scale.copy_(scale.to(self.scale))
            self.zero_point.zero_()
            self.initialized.fill_(True)
        self.is_initialized(), self.zero_is_zero()  # refresh the cached values (see _read_cached)

    def finish_calibration(self) -> None:
        """End calibration: set scale and zero point from what was observed."""
        self._observing = False
        if self._low is None:
            return  # never reached during calibration; left uninitialised and reported by prepare
        sample = torch.cat(self._samples)
        with torch.no_grad():
            scale, zero_point = activation_params(
                sample, self._low, self._high, self.qrange, self.init_method, self.percentile
            )
            self.scale.copy_(scale.to(self.scale))
            self.zero_point.copy_(zero_point)
            self.initialized.fill_(True)
        self._samples = []
        self.is_initialized(), self.zero_is_zero()  # refresh the cached values (see _read_cached)

    def _record(self, x: torch.Tensor) -> None:
        values = x.detach().float().reshape(-1)
        low, high = values.min(), values.max()
        self._low = low if self._low is None else torch.minimum(self._low, low)
        self._high = high if self._high is None else torch.maximum(self._high, high)
        if values.numel() > SAMPLE_SIZE // 4:
            generator = torch.Generator(device=values.device).manual_seed(len(self._samples))
            index = torch.randint(values.numel(), (SAMPLE_SIZE // 4,), generator=generator, device=values.device)
            values = values[index]
        self._samples.append(values.cpu())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.is_initialized(), self.zero_is_zero()  # refresh the cached values (see _read_cached)

    def elements_per_step(self, x: torch.Tensor) -> int:
        """LSQ's ``N`` for ``x``: the elements one step size applies to (one sample's, for activations).

        Example:
            >>> Quantizer(4, signed=True, channels=8).elements_per_step(torch.zeros(8, 3, 3, 3))
            27
            >>> Quantizer(4, signed=False).elements_per_step(torch.zeros(32, 16, 5, 5))   # one sample
            400
        """
        per_step = x.numel() // self.scale.numel()
        if self.role == "activation" and x.dim() > 0 and x.shape[0] > 0:
            per_step //= x.shape[0]
        return per_step

    def is_initialized(self) -> bool:
        """``bool(self.initialized)``, read from the tensor only after it changed (``_read_cached``):
        a training step reads only the version counter.

        Example:
            >>> quantizer = Quantizer(bits=8, signed=False)
            >>> quantizer.is_initialized()
            False
            >>> quantizer.initialized.fill_(True); quantizer.is_initialized()
            tensor(True)
            True
        """
        return self._read_cached("_initialized_seen", self.initialized, bool)

    def zero_is_zero(self) -> bool:
        """Whether every zero point is 0 (read from the tensor only after it changed, like ``is_initialized``).

        Example:
            >>> Quantizer(bits=8, signed=False).zero_is_zero()
            True
        """
        return self._read_cached("_zero_seen", self.zero_point, lambda zero: not bool(zero.any()))

    def _read_cached(self, slot: str, tensor: torch.Tensor, read) -> bool:
        """``read(tensor)``, recomputed only when ``tensor`` was replaced or changed in place.

        Reading a tensor's value is a host synchronisation on a GPU, and these tensors change a
        handful of times per run (calibration, ``load_state_dict``, ``fill_``), each of which bumps
        the version counter or replaces the tensor (``.to(device)``).
        """
        seen = getattr(self, slot, None)  # None: pickled before the cache existed
        if torch.compiler.is_compiling() and seen is not None and seen[0] is tensor:
            # torch.compile cannot read a version counter, and reading the value breaks the graph at
            # every layer: the traced code uses the value last read eagerly (``finish_calibration``,
            # ``init_from_weight`` and ``load_state_dict`` read it) and is guarded on it
            return seen[2]
        if tensor.is_inference():
            return read(tensor)  # inference tensors have no version counter
        if seen is None or seen[0] is not tensor or seen[1] != tensor._version:
            seen = (tensor, tensor._version, read(tensor))
            setattr(self, slot, seen)
        return seen[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smoothing = self._buffers.get(SMOOTHING_BUFFER)  # quant.smoothing: 1/s per input channel
        if smoothing is not None:
            x = scale_channels(x, smoothing)  # exported as a float Mul before the QuantizeLinear
        if self._observing:
            self._record(x)
            return x
        if not self.is_initialized():
            return x
        if self.axis is None and hasattr(x, "_qdistill_runtime"):  # a float op's runtime values near ties (float_kernels)
            x = refine_near_ties(x, self.scale.clamp_min(MIN_SCALE))
        grad_factor = lsq_grad_factor(self.elements_per_step(x), self.qrange)
        return fake_quantize(x, self._trained_scale(x), self.zero_point, self.qrange, self.axis, grad_factor,
                             zero_is_zero=self.zero_is_zero())

    def _trained_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The step size, detached for an activation that carries no gradient (the model's input data).

        Learning that step needs the gradient with respect to the data: a full extra input-gradient
        pass through the first layer, which no other parameter needs (about 15% of a QAT step of
        the demo CNN). The data's range is fixed, so its calibrated step is kept unless
        ``learn_input_scale`` asks otherwise (recipe ``quant.learn_input_scale``).
        """
        if self.role == "activation" and not self.learn_input_scale and not x.requires_grad:
            return self.scale.detach()
        return self.scale


def quantizer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter that belongs to a ``Quantizer`` (its step size), found by type.

    The one rule for telling quantizer state from network weights: parameter counting, the
    optimiser's step-size groups and the non-finite check all use it.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> model.add_module("q", Quantizer(bits=8, signed=False))
        >>> list(quantizer_parameters(model))
        ['q.scale']
    """
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for name, parameter in module.named_parameters(recurse=False):
                found[f"{module_name}.{name}" if module_name else name] = parameter
    return found
