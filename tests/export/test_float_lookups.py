"""Issue 15/11: elementwise lookups run as ONNX Runtime float ops only where those give the table exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qdistill.export import qdq_graph
from qdistill.export.latency import make_session
from qdistill.export.onnx import export_onnx
from qdistill.quant import prepare


class Activations(nn.Module):
    """Convs separated by hardswish, SiLU and a squeeze-excite style hardsigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.hswish, self.silu, self.hsig = nn.Hardswish(), nn.SiLU(), nn.Hardsigmoid()
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.silu(self.b(self.hswish(self.a(x))))
        return self.head(torch.flatten(self.c(self.hsig(x)), 1))


def _outputs(path, inputs: np.ndarray, level: str) -> np.ndarray:
    session = make_session(path, threads=1, level=level)
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_float_lookups_are_bit_equal_to_the_gather_tables(digits, tmp_path, monkeypatch, bits):
    bundle, train, val = digits
    torch.manual_seed(0)
    student = prepare(Activations(), {"weight_bits": bits, "act_bits": bits, "init": "minmax", "calibration_batches": 2},
                      calibration_data=train)
    info = export_onnx(student, tmp_path / "float.onnx", bundle.train_x[:1], verify_on=val)
    lookups = {name: kernel for name, kernel in info["integer_ops_other"].items() if name in ("hswish", "silu", "hsig")}
    assert len(lookups) == 3 and any("exact float" in kernel for kernel in lookups.values()), lookups
    # reference: the same student with every lookup a Gather from the table the student computed
    monkeypatch.setattr(qdq_graph, "FLOAT_LOOKUP_FORMS", ())
    reference = export_onnx(student, tmp_path / "gather.onnx", bundle.train_x[:1])
    assert {reference["integer_ops_other"][name] for name in lookups} == {"Gather"}
    inputs = bundle.val_x.numpy()
    for level in ("basic", "extended", "all"):
        np.testing.assert_array_equal(_outputs(tmp_path / "float.onnx", inputs, level),
                                      _outputs(tmp_path / "gather.onnx", inputs, level))


def test_the_hardswish_form_raises_the_opset_to_14_only_when_used(digits, tmp_path, monkeypatch):
    bundle, train, _ = digits
    torch.manual_seed(0)
    student = prepare(Activations(), {"weight_bits": 8, "act_bits": 8, "init": "minmax", "calibration_batches": 2},
                      calibration_data=train)
    info = export_onnx(student, tmp_path / "hardswish.onnx", bundle.train_x[:1])
    assert info["integer_ops_other"]["hswish"] == "QuantizeLinear (exact float HardSwish)", info["integer_ops_other"]
    model = onnx.load(str(tmp_path / "hardswish.onnx"))
    assert [opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")] == [14]
    assert (info["opset"], info["file_opset"]) == (13, 14)  # the report says what the file holds
    assert sum(node.op_type == "HardSwish" for node in model.graph.node) == 1
    monkeypatch.setattr(qdq_graph, "FLOAT_LOOKUP_FORMS", tuple(form for form in qdq_graph.FLOAT_LOOKUP_FORMS if form[0] != "HardSwish"))
    assert export_onnx(student, tmp_path / "two_nodes.onnx", bundle.train_x[:1])["file_opset"] == 13
    model = onnx.load(str(tmp_path / "two_nodes.onnx"))
    assert [opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")] == [13]
    inputs = bundle.val_x.numpy()
    for level in ("basic", "all"):
        np.testing.assert_array_equal(_outputs(tmp_path / "hardswish.onnx", inputs, level),
                                      _outputs(tmp_path / "two_nodes.onnx", inputs, level))
