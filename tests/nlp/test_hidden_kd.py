"""kd/hidden.py against references computed here from transformers' own outputs (hidden_states, and
Q/K/V recomputed from the layer input with the layer's own Linear weights)."""

from __future__ import annotations

import math

import pytest
import torch

from qdistill.errors import ModelError
from qdistill.kd.distiller import Distiller
from qdistill.kd.hidden import AttentionRelationKD, HiddenStateKD
from qdistill.kd.losses import EmbeddingKDLoss
from qdistill.models.hf import load_hf

from .conftest import tiny_bert_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    teacher = load_hf(tiny_bert_folder(tmp_path_factory.mktemp("teacher"), seed=0))
    student = load_hf(tiny_bert_folder(tmp_path_factory.mktemp("student"), seed=1, layers=1))
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return teacher, student, {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _hidden(model, inputs):
    """transformers' hidden_states: index i + 1 is the output of layer i."""
    with torch.no_grad():
        return model.encoder(**inputs, output_hidden_states=True).hidden_states


def test_hidden_state_loss_is_masked_mse_of_transformers_hidden_states(pair):
    teacher, student, inputs = pair
    kd = HiddenStateKD(teacher, student, [(1, 0), (0, 0)], weight=2.0)
    with torch.no_grad():
        teacher(**inputs), student(**inputs)
        losses = kd(inputs)
    teacher_states, student_states = _hidden(teacher, inputs), _hidden(student, inputs)
    real = inputs["attention_mask"].bool()
    for (t, s), name in (((1, 0), "hidden:1->0"), ((0, 0), "hidden:0->0")):
        expected = ((student_states[s + 1] - teacher_states[t + 1])[real] ** 2).mean()
        assert float(losses[name]) == pytest.approx(2.0 * float(expected), rel=1e-5)


def _relation_reference(model, inputs, heads):
    """MiniLM v2 relations of the last layer, recomputed from its input with its query/key/value weights."""
    layer_input = _hidden(model, inputs)[-2]
    attention = model.encoder.encoder.layer[-1].attention.self
    result = []
    for linear in (attention.query, attention.key, attention.value):
        with torch.no_grad():
            states = linear(layer_input)
        b, t, w = states.shape
        split = states.reshape(b, t, heads, w // heads).permute(0, 2, 1, 3)
        scores = split @ split.transpose(-1, -2) / math.sqrt(w // heads)
        scores = scores + (1 - inputs["attention_mask"][:, None, None, :].float()) * -1e9
        result.append(torch.softmax(scores, -1))
    return result


def test_attention_relation_loss_matches_kl_of_recomputed_relations(pair):
    teacher, student, inputs = pair
    kd = AttentionRelationKD(teacher, student, weight=0.5)
    with torch.no_grad():
        teacher(**inputs), student(**inputs)
        loss = float(kd(inputs)["attention_relation"])
    real = inputs["attention_mask"].bool()
    expected = 0.0
    for p, q in zip(_relation_reference(teacher, inputs, 2), _relation_reference(student, inputs, 2), strict=True):
        kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean(1)  # (B, T) over heads
        expected += float(kl[real].mean())
    assert loss == pytest.approx(0.5 * expected, rel=1e-4)
    assert loss > 0


def test_hidden_kd_trains_a_narrower_student_through_its_projection(pair, tmp_path):
    teacher, _, inputs = pair
    narrow = load_hf(tiny_bert_folder(tmp_path / "narrow", hidden=16, layers=1, seed=2)).train()
    kd = HiddenStateKD(teacher, narrow, [(1, 0)])
    optimizer = torch.optim.Adam([*narrow.parameters(), *kd.parameters()], lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        with torch.no_grad():
            teacher(**inputs)
        narrow(**inputs)
        loss = kd(inputs)["hidden:1->0"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert kd.projections[0].weight.grad is not None and losses[-1] < 0.5 * losses[0], losses


def test_distiller_adds_inner_losses_to_the_total(pair):
    teacher, student, inputs = pair
    kd = HiddenStateKD(teacher, student, [(1, 0)])
    distiller = Distiller(teacher, student, EmbeddingKDLoss(cosine_weight=1.0), extra_losses=[kd])
    with torch.no_grad():
        parts = distiller(inputs)
    assert float(parts.total) == pytest.approx(float(parts.kd) + float(parts.features["hidden:1->0"]), rel=1e-6)
    assert float(parts.features["hidden:1->0"]) > 0
    distiller.remove_hooks()
    for tap in kd._taps[0]:  # the hooks are gone from both models
        assert tap.handle.id not in tap.handle.hooks_dict_ref()


def test_bad_layer_is_one_line_error(pair):
    teacher, student, _ = pair
    with pytest.raises(ModelError, match=r"distill.hidden_layers: student layer 3 does not exist; the student has 1"):
        HiddenStateKD(teacher, student, [(0, 3)])
