"""TensorBoard scalars of a training run (``train.tensorboard: true``) and the per-layer step sizes.

TensorBoard is an optional extra (``pip install 'qdistill[tensorboard]'``); it is imported only
when a run asks for it. Each epoch writes, at step = epoch number:

    loss/total, loss/kd, loss/task, loss/feature:<layer>   the epoch's mean loss parts (history's loss keys)
    accuracy/validation                                    history's val_accuracy
    learning_rate                                          history's lr (the rate of the epoch's first step)
    step_size/<layer>/weight, step_size/<layer>/act        mean quantizer step size of each quantized layer

Example:
    >>> scalar_tags({"epoch": 1, "loss": 0.5, "kd_loss": 0.25, "val_accuracy": 0.9, "lr": 0.1, "seconds": 2.0})
    {'loss/total': 0.5, 'loss/kd': 0.25, 'accuracy/validation': 0.9, 'learning_rate': 0.1}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.errors import QdistillError
from qdistill.quant import is_quantized, layer_table
from qdistill.quant.modules import input_slots

EXTRA = "qdistill[tensorboard]"
TAGS = {"loss": "loss/total", "kd_loss": "loss/kd", "task_loss": "loss/task",
        "val_accuracy": "accuracy/validation", "lr": "learning_rate"}


def _summary(values: list[torch.Tensor]) -> dict[str, float] | None:
    if not values:
        return None
    flat = torch.cat([value.detach().float().reshape(-1).cpu() for value in values])
    return {"min": float(flat.min()), "mean": float(flat.mean()), "max": float(flat.max())}


def step_sizes(model: nn.Module) -> dict[str, dict[str, dict[str, float] | None]]:
    """``{layer: {weight_step, act_step}}``: min, mean and max step size of each quantized layer's quantizers.

    ``weight_step`` summarises the per-channel weight steps; ``act_step`` the input quantizer(s)
    (an add or concat has one per input). None where the layer has no such quantizer.

    Example:
        >>> from qdistill.quant import prepare
        >>> from qdistill.recipe import QuantSpec
        >>> student = prepare(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), QuantSpec(),
        ...                   calibration_data=[(torch.randn(8, 4),)])
        >>> steps = step_sizes(student)
        >>> sorted(steps), sorted(steps["0"]["weight_step"])
        (['0', '2'], ['max', 'mean', 'min'])
    """
    layers = layer_table(model)
    steps = {}
    for name, module in model.named_modules():
        if name in layers:
            weight = [module.weight_quantizer] if is_quantized(module) else []
            act = [getattr(module, slot) for slot in input_slots(module) if slot is not None]
            steps[name] = {"weight_step": _summary(_scales(weight)), "act_step": _summary(_scales(act))}
    return steps


def _scales(quantizers: list[nn.Module]) -> list[torch.Tensor]:
    return [quantizer.scale for quantizer in quantizers if isinstance(getattr(quantizer, "scale", None), torch.Tensor)]


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tag and value of each numeric entry of one history record (epoch and seconds left out)."""
    scalars = {}
    for key, value in record.items():
        tag = TAGS.get(key) or (f"loss/{key.removesuffix('_loss')}" if key.startswith("feature:") else None)
        if tag is not None and isinstance(value, (int, float)):
            scalars[tag] = float(value)
    return scalars


def step_size_tags(model: nn.Module) -> dict[str, float]:
    """``step_size/<layer>/weight`` and ``.../act``: the mean step sizes of ``step_sizes``."""
    scalars = {}
    for layer, row in step_sizes(model).items():
        for kind in ("weight", "act"):
            if row[f"{kind}_step"] is not None:
                scalars[f"step_size/{layer}/{kind}"] = row[f"{kind}_step"]["mean"]
    return scalars


def require_tensorboard() -> None:
    """Raise a one-line ``QdistillError`` naming the extra when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (optional extra)
    except ImportError:
        raise QdistillError(f"train.tensorboard needs the tensorboard package, which is not installed; "
                            f"install it with: pip install '{EXTRA}'") from None


class TensorBoardLog:
    """Writes one run's scalars under ``directory`` (TensorBoard event files), one step per epoch.

    Example:
        >>> log = TensorBoardLog("out/tb")                                     # doctest: +SKIP
        >>> log.epoch({"epoch": 1, "loss": 0.5}, student); log.close()         # doctest: +SKIP
    """

    def __init__(self, directory: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # optional extra

        self.writer = SummaryWriter(log_dir=str(directory))

    def epoch(self, record: dict[str, Any], model: nn.Module | None) -> None:
        """Write the record's scalars and the model's step sizes at step ``record["epoch"]``."""
        scalars = scalar_tags(record)
        if model is not None:
            scalars.update(step_size_tags(model))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
