"""Quantizing a transformers BertModel: its attention matmuls, GELU, Linears and residual adds are reached."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from qdistill.quant.attention import ExplicitSelfAttention, explicit_hf_attention  # noqa: E402
from qdistill.quant.modules import RuntimeGelu  # noqa: E402
from qdistill.quant.prepare import layer_table, prepare  # noqa: E402


class MeanEncoder(nn.Module):
    """The shape of models/hf.py's HFEncoder (task embedding, mean pooling), on a small random BertModel."""

    def __init__(self, attn_implementation: str = "eager", pooler: bool = False) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32)
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        self.bert = transformers.BertModel(config, add_pooling_layer=pooler)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _batch(rows=3, length=7):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 4:] = 0  # padding, so the additive mask matters
    return {"input_ids": ids, "attention_mask": mask}


def test_explicit_attention_computes_what_transformers_computes():
    model = MeanEncoder().eval()
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch)
        kept = explicit_hf_attention(model)
        assert set(kept) == {"bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"}
        assert all("softmax stay float" in reason for reason in kept.values())
        assert isinstance(model.bert.encoder.layer[0].attention.self, ExplicitSelfAttention)
        assert torch.allclose(model(**batch), expected, atol=1e-5)


def test_prepare_quantizes_linears_and_attention_matmuls():
    model = MeanEncoder().eval()
    student = prepare(model, {"weight_bits": 8, "act_bits": 8}, calibration_data=[_batch()])
    table = layer_table(student)
    for block in range(2):
        prefix = f"bert.encoder.layer.{block}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.self.scores.matmul", "attention.self.weighted.matmul",
                     "attention.output.dense", "intermediate.dense", "output.dense"):
            assert table[prefix + name]["act_bits"] == 8, prefix + name
        # the residual stream (adds, LayerNorms and their inputs) stays float, with its reason listed
        for name in ("attention.output", "attention.output.LayerNorm", "output", "output.LayerNorm"):
            assert "residual stream" in student.qdistill_unquantized[prefix + name], prefix + name
        assert prefix + "attention.output.add" not in table and prefix + "output.LayerNorm" not in table
        assert type(student.get_submodule(prefix + "output.LayerNorm")) is nn.LayerNorm
        # GELU stays float (a table lookup is slower than ORT's float Gelu), with its reason; it evaluates as
        # ONNX Runtime's Gelu where the next quantizer's codes depend on it (quant.float_kernels)
        assert "GELU" in student.qdistill_unquantized[prefix + "intermediate.intermediate_act_fn"]
        assert type(student.get_submodule(prefix + "intermediate.intermediate_act_fn")) is RuntimeGelu
        # query, key and value read one tensor: one input quantizer (one QuantizeLinear in the export)
        attention = student.get_submodule(prefix + "attention.self")
        assert attention.query.input_quantizer is attention.key.input_quantizer is attention.value.input_quantizer
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(student(**_batch()), model(**_batch()))
    assert cosine.min() > 0.99


def test_fused_attention_stays_float_with_a_reason():
    model = MeanEncoder(attn_implementation="sdpa").eval()
    student = prepare(model, {"weight_bits": 8, "act_bits": 8}, calibration_data=[_batch()])
    reason = student.qdistill_unquantized["bert.encoder.layer.0.attention.self"]
    assert "attn_implementation='eager'" in reason
    assert "bert.encoder.layer.0.attention.self.scores.matmul" not in layer_table(student)
