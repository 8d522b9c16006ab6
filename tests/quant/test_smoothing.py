"""``quant.smoothing``: SmoothQuant factors against numpy, the float function kept, outliers tamed, exact export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qdistill import models
from qdistill.errors import ModelError
from qdistill.export import export_onnx
from qdistill.export.packed import load_packed, save_packed
from qdistill.quant import check_overrides, prepare
from qdistill.quant.smoothing import smoothable_layers


class NormThenLinear(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with a few input channels far larger than the rest (as in BERT)."""

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.act, self.down = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        with torch.no_grad():
            self.norm.weight[:3] = torch.tensor([40.0, -25.0, 30.0])  # outlier channels after the LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, width)
        return self.down(self.act(self.up(self.norm(x))))


def _data(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, 32, generator=generator) for _ in range(4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return NormThenLinear().eval()


def test_factors_and_weights_match_numpy():
    model, batches, alpha = _model(), _data(), 0.7
    with torch.no_grad():
        model.norm.weight[5], model.norm.bias[5] = 0.0, 0.0  # a channel calibration sees as all zero keeps s = 1
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "smoothing": alpha, "smoothing_layers": ["up"]},
                      calibration_data=batches)
    with torch.no_grad():
        normed = np.concatenate([model.norm(x).numpy().reshape(-1, 32) for x in batches])
    weight = model.up.weight.detach().numpy().astype(np.float64)
    expected = np.abs(normed).max(axis=0) ** alpha / np.abs(weight).max(axis=0) ** (1 - alpha)
    expected[5] = 1.0
    np.testing.assert_allclose(1.0 / student.up.input_quantizer.input_smoothing.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(student.up.weight.detach().numpy(), weight * expected, rtol=1e-5)
    assert not hasattr(student.down.input_quantizer, "input_smoothing") and list(student.qdistill_smoothed) == ["up"]


def test_the_float_function_is_unchanged():
    model = _model()
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "smoothing": 0.5}, calibration_data=_data())
    x = _data(seed=1)[0]
    for name in ("up", "down"):
        layer, original = student.get_submodule(name), model.get_submodule(name)
        inputs = torch.randn(5, layer.in_features)
        smoothed = inputs * layer.input_quantizer.input_smoothing @ layer.weight.detach().T + layer.bias.detach()
        reference = inputs.double().numpy() @ original.weight.detach().double().numpy().T + original.bias.detach().double().numpy()
        np.testing.assert_allclose(smoothed.numpy(), reference, rtol=1e-4, atol=1e-5)
        assert torch.allclose(layer.as_float()(inputs), original(inputs), atol=1e-5)  # prepare's undo takes s out again
    assert set(student.qdistill_smoothed) == {"up", "down"}
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()


def test_smoothing_cuts_the_error_of_outlier_channels():
    full, batches = _model(), _data()
    model = nn.Sequential(full.norm, full.up).eval()  # the error of the smoothed input alone
    held_out = torch.cat(_data(seed=2))
    with torch.no_grad():
        reference = model(held_out)

    def error(spec: dict) -> float:
        student = prepare(model, {"weight_bits": 8, "act_bits": 8, "init": "minmax", **spec}, calibration_data=batches)
        with torch.no_grad():
            return float((student.eval()(held_out) - reference).pow(2).mean() / reference.pow(2).mean())

    plain, smoothed = error({}), error({"smoothing": 0.5})
    assert smoothed < plain / 4, (plain, smoothed)


def test_export_matches_the_student_and_the_packed_file_restores_it(tmp_path):
    model = models.create("tiny_transformer", attention=["manual"]).eval()
    images = torch.rand(32, 1, 8, 8)
    student = prepare(model, {"weight_bits": 4, "act_bits": 8, "smoothing": 0.8},
                      calibration_data=[images[:16], images[16:]]).eval()
    assert list(student.qdistill_smoothed) == smoothable_layers(student)
    info = export_onnx(student, tmp_path / "s.onnx", images[:1], verify_on=[(images, torch.zeros(32, dtype=torch.long))])
    assert info["max_abs_logit_diff"] == 0.0 and info["flips"] == 0
    graph = onnx.load(tmp_path / "s.onnx").graph
    producers = {output: node for node in graph.node for output in node.output}
    smoothed_reads = [node for node in graph.node if node.op_type == "QuantizeLinear"  # a Mul by 1/s feeds them
                      and node.input[0] in producers and producers[node.input[0]].op_type == "Mul"
                      and any(name.endswith(".input_smoothing") for name in producers[node.input[0]].input)]
    smoothed_inputs = {id(student.get_submodule(name).input_quantizer) for name in student.qdistill_smoothed}
    assert len(smoothed_reads) == len(smoothed_inputs) == 6  # one float 1/s product per smoothed tensor (Q, K, V: one)
    path = save_packed(student, tmp_path / "s.qpack.safetensors")["path"]
    for skeleton in (model, student):  # the float architecture (rebuilt) or the prepared student
        restored = load_packed(path, model=skeleton)
        assert torch.equal(restored(images), student(images))


def test_layers_that_share_an_input_are_smoothed_together():
    model = models.create("tiny_transformer", attention=["manual"]).eval()
    images = torch.rand(32, 1, 8, 8)
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "smoothing": 0.5, "smoothing_layers": ["*.key"]},
                      calibration_data=[images])
    attention, original = student.encoder[0].attention, model.encoder[0].attention
    assert set(student.qdistill_smoothed) == {f"encoder.0.attention.{name}" for name in ("query", "key", "value")}
    seen = []
    hook = original.query.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(images)
    hook.remove()
    normed = seen[0]
    weights = torch.cat([getattr(original, name).weight for name in ("query", "key", "value")]).detach().double().numpy()
    activation = normed.abs().reshape(-1, normed.shape[-1]).amax(0).double().numpy()
    expected = activation**0.5 / np.abs(weights).max(axis=0) ** 0.5  # one factor from the widest of the three columns
    np.testing.assert_allclose(1.0 / attention.query.input_quantizer.input_smoothing.numpy(), expected, rtol=1e-5)
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(getattr(attention, name).weight.detach().numpy(),
                                   getattr(original, name).weight.detach().numpy() * expected, rtol=1e-5)


def test_layers_that_cannot_be_smoothed_are_named():
    model = models.create("tiny_transformer", attention=["manual"])
    spec = {"weight_bits": 8, "act_bits": 8, "smoothing": 0.5}
    with pytest.raises(ModelError, match="pattern 'nothing' matches no quantized Linear layer; layers: project, "):
        check_overrides(model, {**spec, "smoothing_layers": ["nothing"]})
    with pytest.raises(ModelError, match=r"layer 'classifier.2' cannot be smoothed: its input quantizer is shared with "
                                         r"or written by features"):  # the conv before writes its codes directly
        prepare(models.create("mnist_cnn"), {**spec, "smoothing_layers": ["classifier.2"]})
