"""Export of a student with a float input beside int64 token ids: named ONNX inputs with dynamic batch and sequence
axes, int64 kept, the parity gate, per-layer diagnosis, latency, and the packed file's rebuild. References: the
PyTorch student called by hand, and the ONNX file as ONNX itself describes it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from qdistill import quant, runtime
from qdistill.data import make_loader
from qdistill.errors import ExportError
from qdistill.export import export_all, rebuild_info, save_packed
from qdistill.export.feeds import input_spec
from qdistill.export.latency import make_session, measure_latency
from qdistill.export.onnx import diagnose_layers, export_float_onnx, export_onnx, onnx_predict
from qdistill.recipe import ModelSpec, QuantSpec, TrainSpec
from qdistill.runs.student import distill
from qdistill.train import Supervised, fit
from support import MaskedTokenNet, TokenFeatureNet, token_feature_data

QUANT = {"weight_bits": 8, "act_bits": 8}


def _named(x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"features": x, "input_ids": ids}


@pytest.fixture(scope="module")
def trained():
    """A teacher trained on dict batches and its W8A8 student from ``distill``, with validation loaders."""
    torch.manual_seed(0)
    (x, ids, y), (vx, vids, vy) = token_feature_data(512, seed=0), token_feature_data(128, seed=1)
    teacher = TokenFeatureNet()
    fit(Supervised(teacher), make_loader(_named(x, ids), y, 32, seed=0, shuffle=True),
        TrainSpec(epochs=20, lr=5e-3, schedule="constant"), phase="teacher", show_progress=False)
    val = make_loader(_named(vx, vids), vy, 64, seed=0, shuffle=False)
    result = distill(teacher.eval(), make_loader(_named(x, ids), y, 32, seed=0, shuffle=True), val,
                     {"quant": QUANT, "train": {"epochs": 1}}, show_progress=False)
    return result.student.eval(), val, (vx, vids, vy)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    student, val, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(student, path, next(iter(val)), verify_on=val)


def _dims(value: onnx.ValueInfoProto) -> list:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def test_dict_example_gives_named_inputs_with_batch_and_sequence_axes(exported):
    graph = onnx.load(exported["path"]).graph
    inputs = {value.name: value for value in graph.input}
    assert list(inputs) == ["features", "input_ids"]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert inputs["features"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inputs["input_ids"]) == ["batch", "sequence"]
    assert _dims(inputs["features"]) == ["batch", 6]
    assert [value.name for value in graph.output] == ["logits"]


def test_parity_gate_passes_with_integer_kernels(exported):
    assert exported["parity_checked"] and exported["samples"] == 128
    assert exported["flips"] == 0 and exported["logit_sqnr_db"] >= exported["logit_sqnr_gate_db"]
    assert exported["accuracy"] == exported["student_accuracy"]
    assert exported["integer_ops"] == {"embed": "Gather (embedding lookup, no arithmetic)", "proj": "QGemm", "head": "QGemm"}
    assert exported["integer_ops_other"] == {"cat": "QLinearConcat"}


def test_other_batch_sizes_and_sequence_lengths_match_the_student(trained, exported):
    student, _, _ = trained
    session = make_session(exported["path"])
    generator = torch.Generator().manual_seed(7)
    for rows, length in ((1, 3), (5, 17), (33, 64)):
        x, ids = torch.randn(rows, 6, generator=generator), torch.randint(0, 12, (rows, length), generator=generator)
        with torch.no_grad():
            expected = student(x, ids).numpy()
        got = session.run(None, {"features": x.numpy(), "input_ids": ids.numpy()})[0]
        assert got.shape == (rows, 3)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    logits, labels = onnx_predict(session, [({"features": x, "input_ids": ids}, torch.zeros(rows, dtype=torch.long))])
    np.testing.assert_array_equal(logits, got)
    with pytest.raises(ExportError, match=r"the ONNX model's input 'input_ids' is not among the batch's inputs \(features"):
        onnx_predict(session, [{"features": x}])


def test_diagnosis_compares_each_layer_by_input_name(trained, exported):
    student, val, _ = trained
    layers = diagnose_layers(exported["path"], student, val)
    assert [layer["name"] for layer in layers] == ["embed", "proj", "cat", "head"]  # layers and ops, in graph order
    assert all(layer["sqnr_db"] > 60 for layer in layers)


def test_embedding_rows_are_gathered_as_int8_then_dequantized_bit_for_bit(trained, exported):
    """The lookup reads the int8 table, not a table dequantized on every run; its rows equal ONNX Runtime's
    DequantizeLinear of the whole table (the reference: the form before the rewrite) and the student's own rows."""
    student, _, _ = trained
    model = onnx.load(exported["path"])
    tables = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    lookup = next(node for node in model.graph.node if node.name == "embed")
    assert lookup.op_type == "Gather" and tables[lookup.input[0]].dtype == np.int8
    assert not any(node.op_type == "DequantizeLinear" and node.input[0] == lookup.input[0] for node in model.graph.node)
    table, scale = tables[lookup.input[0]], tables["embed.weight_scale_rows"].reshape(-1)  # per row
    dequantize = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["table", "scale"], ["rows"], axis=0)], "reference", [],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(scale, "scale")]),
        opset_imports=[helper.make_opsetid("", 13)])
    dequantize.ir_version = 8
    reference = make_session(dequantize.SerializeToString()).run(None, {})[0]
    rows = next(node for node in model.graph.node if node.name == "embed.rows_dequantize").output[0]
    model.graph.output.append(helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None))
    ids = torch.randint(0, len(table), (4, 9), generator=torch.Generator().manual_seed(3))
    got = make_session(model.SerializeToString()).run([rows], {"features": np.zeros((4, 6), np.float32),
                                                               "input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(got, reference[ids.numpy()])
    with torch.no_grad():
        np.testing.assert_array_equal(got, student.embed(ids).numpy())


def test_tuple_inputs_export_as_input_0_and_input_1(trained, tmp_path):
    student, _, (vx, vids, vy) = trained
    batches = [((vx[i:i + 32], vids[i:i + 32]), vy[i:i + 32]) for i in range(0, 128, 32)]
    info = export_onnx(student, tmp_path / "tuple.onnx", batches[0], verify_on=batches)
    assert info["flips"] == 0 and info["logit_sqnr_db"] >= info["logit_sqnr_gate_db"]
    graph = onnx.load(info["path"]).graph
    assert [value.name for value in graph.input] == ["input_0", "input_1"]
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(graph.input[1]) == ["batch", "sequence"]


def test_float_export_and_latency_feed_inputs_by_name(trained, tmp_path):
    student, val, (vx, vids, _) = trained
    section = export_all(student, next(iter(val)), val, onnx_path=tmp_path / "model.onnx", latency_budget_s=0.01)["onnx"]
    for key in ("latency_us_per_sample", "fp32_latency_us_per_sample", "torch_fp32_latency_us_per_sample"):
        assert set(section[key]) == {"batch1", "batch64"} and all(value > 0 for value in section[key].values())
    assert section["latency_method"]["samples"] == "distinct"
    assert section["parity_checked"] and section["flips"] == 0
    fp32 = export_float_onnx(TokenFeatureNet(), tmp_path / "fp32.onnx", next(iter(val)))
    session = make_session(fp32["path"])
    assert [(value.name, value.type) for value in session.get_inputs()] == [("features", "tensor(float)"),
                                                                             ("input_ids", "tensor(int64)")]
    latency = measure_latency({"int8": section["path"]}, student, _named(vx[:4], vids[:4]), batches=(1, 8), budget_s=0.01)
    assert latency["method"]["samples"] == "4 distinct, cycled to fill batch 8"
    assert set(latency["1"]) == {"int8", "torch_fp32"}


def test_packed_file_rebuilds_the_same_graph_with_named_inputs(trained, exported, tmp_path):
    student, val, (vx, vids, _) = trained
    example = _named(vx[:1], vids[:1])
    spec = input_spec(example)
    assert spec == {"form": "dict", "names": ["features", "input_ids"], "shapes": [[1, 6], [1, 10]],
                    "dtypes": ["float32", "int64"]}
    rebuild = rebuild_info(ModelSpec(factory="support:token_feature_net"), {}, QuantSpec(**QUANT), (1, 6), 13, inputs=spec)
    packed = save_packed(student, tmp_path / "student.qpack.safetensors", rebuild)["path"]
    session, reference = runtime.load(packed), make_session(exported["path"])
    feed = {"features": vx.numpy(), "input_ids": vids[:, :7].numpy()}
    np.testing.assert_array_equal(session.run(None, feed)[0], reference.run(None, feed)[0])
    info = runtime.serve_bench(packed, compare=exported["path"], batches=(1, 4), loads=1, budget_s=0.01)
    assert info["outputs_equal"] is True and set(info["latency_us_per_sample"]) == {"batch1", "batch4"}


class _IgnoresTokenTypes(MaskedTokenNet):
    """A Hugging Face style forward whose ``token_type_ids`` are accepted and never read."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return super().forward(input_ids, attention_mask)


def _hf_batch(rows: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, length // 2:] = (torch.rand(rows, length - length // 2, generator=generator) > 0.5).long()
    return {"input_ids": torch.randint(0, 12, (rows, length), generator=generator), "attention_mask": mask,
            "token_type_ids": torch.zeros(rows, length, dtype=torch.long), "labels": torch.randint(0, 3, (rows,), generator=generator)}


def test_hugging_face_batches_export_the_mask_and_drop_unread_inputs(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    batches = [_hf_batch(16, 10, generator) for _ in range(4)]
    model = _IgnoresTokenTypes().eval()
    student = quant.prepare(model, QUANT, calibration_data=batches)
    info = export_onnx(student, tmp_path / "model.onnx", batches[0], verify_on=batches)
    assert info["flips"] == 0 and info["logit_sqnr_db"] >= info["logit_sqnr_gate_db"]
    session = make_session(info["path"])
    assert [(value.name, value.type, value.shape) for value in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", ["batch", "sequence"]), ("attention_mask", "tensor(int64)", ["batch", "sequence"])]
    longer = _hf_batch(3, 25, generator)
    with torch.no_grad():
        expected = student.eval()(longer["input_ids"], longer["attention_mask"]).numpy()
        unmasked = model(longer["input_ids"]).numpy()  # the student is specialised to batches with a mask
    got = onnx_predict(session, [longer])[0]  # token_type_ids and labels are left out of the feed
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(expected - unmasked).max() > 1e-2  # the mask changes the result, so the check above sees it
