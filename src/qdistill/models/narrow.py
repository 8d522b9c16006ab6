"""Starting a narrower student from its teacher: each layer keeps the teacher's most important channels.

``init_from_teacher(student, teacher)`` pairs the layers of the two models by name (Conv2d, Linear,
BatchNorm), in definition order. A layer of the same shape is copied; a narrower one keeps the
output channels (or units) whose teacher filters have the largest L1 norm (Li et al. 2017,
"Pruning filters for efficient ConvNets"), in their original order, and reads the input channels
the previous layer kept (through a flatten, each kept channel's whole ``H x W`` block). That
follows the data only in a chain of layers, so narrowing needs a model whose layers form one
(``mnist_cnn`` -> ``mnist_cnn_small``, ``mlp`` with narrower ``hidden``); in a model with branches
(residual adds, concatenations) only same-shape layers are copied. Layers that cannot be mapped
keep the student's own initialisation and are reported.

Example:
    >>> import torch
    >>> from qdistill.models.convnet import ConvNet
    >>> teacher, student = ConvNet(width=32, hidden=128), ConvNet(width=16, hidden=64)
    >>> done = init_from_teacher(student, teacher)
    >>> sorted(set(done["layers"].values())), done["random"]
    (['narrowed'], [])
    >>> student(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def is_chain(model: nn.Module) -> bool:
    """Whether the model's traced graph is one chain (every node feeds exactly one other), so channels follow layer order.

    Example:
        >>> is_chain(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        True
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any model fx cannot trace is treated as having branches
        return False
    return all(len(node.users) <= 1 for node in graph.nodes) and sum(node.op == "placeholder" for node in graph.nodes) == 1


def channel_importance(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output channel's weights over the kept ``inputs`` (``(out,)``).

    Example:
        >>> channel_importance(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([0, 1])).tolist()
        [3.0, 0.5]
    """
    return weight.index_select(1, inputs).abs().flatten(1).sum(1)


def _top(importance: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest entries' indices, in ascending order (the teacher's channel order)."""
    return importance.topk(count).indices.sort().values


class _Narrowing:
    """State of one ``init_from_teacher`` call: the teacher channels the previous layer kept."""

    def __init__(self, chain: bool) -> None:
        self.chain = chain
        self.kept: torch.Tensor | None = None  # teacher indices of the previous layer's kept outputs
        self.teacher_width: int | None = None  # the previous teacher layer's output width

    def inputs(self, teacher_in: int, student_in: int) -> torch.Tensor | None:
        """Teacher input indices for a student layer with ``student_in`` inputs (None: no mapping)."""
        if student_in == teacher_in:
            return torch.arange(teacher_in)
        if not self.chain or self.kept is None or not self.teacher_width:
            return None
        spatial, remainder = divmod(teacher_in, self.teacher_width)
        if remainder or student_in != len(self.kept) * spatial:
            return None
        # a flatten of (C, H, W) is channel-major: channel c owns inputs c*HW ... c*HW + HW - 1
        return (self.kept[:, None] * spatial + torch.arange(spatial)[None, :]).flatten()

    def layer(self, teacher: nn.Module, student: nn.Module) -> str | None:
        """Copy one layer pair (``"copied"`` / ``"narrowed"``), or None when the shapes do not allow it."""
        if isinstance(teacher, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self._batchnorm(teacher, student)
        if isinstance(teacher, nn.Conv2d) and (teacher.kernel_size != student.kernel_size or teacher.groups != 1
                                               or student.groups != 1 or teacher.stride != student.stride):
            return self._lost()
        weight = teacher.weight.detach().cpu()  # index arithmetic on the CPU, whatever device the teacher is on
        outputs = (torch.arange(weight.shape[0]) if student.weight.shape[0] == weight.shape[0]
                   else None if not self.chain or student.weight.shape[0] > weight.shape[0] else "top")
        inputs = self.inputs(weight.shape[1], student.weight.shape[1])
        if inputs is None or outputs is None:
            return self._lost()
        if isinstance(outputs, str):
            outputs = _top(channel_importance(weight, inputs), student.weight.shape[0])
        with torch.no_grad():
            student.weight.copy_(weight[outputs][:, inputs])
            if student.bias is not None and teacher.bias is not None:
                student.bias.copy_(teacher.bias.detach().cpu()[outputs])
        self.kept, self.teacher_width = outputs, weight.shape[0]
        return "copied" if student.weight.shape == weight.shape else "narrowed"

    def _batchnorm(self, teacher: nn.Module, student: nn.Module) -> str | None:
        channels = (torch.arange(teacher.num_features) if student.num_features == teacher.num_features
                    else self.kept if self.kept is not None and len(self.kept) == student.num_features else None)
        if channels is None:
            return self._lost()
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                source, target = getattr(teacher, name), getattr(student, name)
                if source is not None and target is not None:
                    target.copy_(source.detach().cpu()[channels])
        return "copied" if student.num_features == teacher.num_features else "narrowed"

    def _lost(self) -> None:
        self.kept, self.teacher_width = None, None  # the next layer's inputs are unknown


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Initialise ``student`` from ``teacher`` where shapes allow (see the module docstring); returns what was done.

    ``{"layers": {name: "copied" | "narrowed"}, "random": [names that kept their own initialisation]}``.
    """
    teacher_layers = {name: module for name, module in teacher.named_modules() if isinstance(module, LAYER_TYPES)}
    state = _Narrowing(is_chain(teacher) and is_chain(student))
    layers, random = {}, []
    for name, module in student.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        source = teacher_layers.get(name)
        done = state.layer(source, module) if type(source) is type(module) else state._lost()
        if done is None:
            random.append(name)
        else:
            layers[name] = done
    return {"layers": layers, "random": random}
