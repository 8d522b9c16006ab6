"""models/hf.py on the real MiniLM: pooling and layer selection against transformers' BertModel called directly."""

from __future__ import annotations

import pytest
import torch

from qdistill.errors import ModelError
from qdistill.models.build import build_model
from qdistill.models.hf import layer_indices, load_hf
from qdistill.recipe import ModelSpec

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(minilm):
    """BertModel straight from transformers (with its pooler), as the independent reference."""
    return transformers.AutoModel.from_pretrained(minilm, local_files_only=True, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokens(minilm):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    return dict(tokenizer(["a cat sat on the mat", "quantized students learn from their teachers fast"],
                          padding="max_length", max_length=16, return_tensors="pt"))


def test_mean_pooling_matches_masked_average_of_bert(minilm, reference, tokens):
    model = load_hf(minilm)
    with torch.no_grad():
        got = model(**tokens)
        hidden = reference(**tokens).last_hidden_state
    mask = tokens["attention_mask"]
    expected = torch.stack([hidden[row, mask[row].bool()].mean(dim=0) for row in range(len(mask))])
    assert got.shape == (2, 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.encoder.pooler is None  # mean pooling: BERT's pooler is not built


def test_padding_does_not_change_the_embedding(minilm, tokens):
    model = load_hf(minilm)
    length = int(tokens["attention_mask"][0].sum())
    short = {key: value[:1, :length] for key, value in tokens.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**short), model(**{k: v[:1] for k, v in tokens.items()}), atol=1e-5, rtol=1e-5)


def test_cls_classifier_reads_the_first_token(minilm, reference, tokens):
    model = load_hf(minilm, task="sequence_classification", pooling="cls", num_labels=3)
    with torch.no_grad():
        got = model(**tokens)
        first = reference(**tokens).last_hidden_state[:, 0]
    assert got.shape == (2, 3) and model.output_kind == "logits"
    torch.testing.assert_close(got, first @ model.head.weight.T + model.head.bias, atol=1e-5, rtol=1e-5)


def test_shallow_student_keeps_evenly_spaced_teacher_layers(minilm, reference):
    student = load_hf(minilm, num_layers=3)
    layers = student.encoder.encoder.layer
    assert len(layers) == 3 and student.encoder.config.num_hidden_layers == 3
    for kept, original in zip(layers, [0, 2, 5], strict=True):
        for (name, value), (_, expected) in zip(kept.state_dict().items(),
                                                reference.encoder.layer[original].state_dict().items(), strict=True):
            assert torch.equal(value, expected), name
    assert layer_indices(6, 3) == [0, 2, 5]


def test_all_layers_kept_is_the_teacher(minilm, tokens):
    teacher, same = load_hf(minilm), load_hf(minilm, num_layers=6)
    with torch.no_grad():
        torch.testing.assert_close(teacher(**tokens), same(**tokens))


def test_recipe_model_section_builds_the_model(minilm):
    model = build_model(ModelSpec(hf=minilm, task="sequence_classification", num_layers=2), {"num_classes": 4})
    assert model.head.out_features == 4 and len(model.encoder.encoder.layer) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_layers": 7}, "model.num_layers: 7 is out of range; the model has 6 layers (allowed: 1..6)"),
    ({"task": "sequence_classification"}, "needs at least 2 classes"),
    ({"pooling": "max"}, "model.pooling: 'max' is not supported; allowed: mean, cls"),
])
def test_bad_arguments_are_one_line_errors(minilm, kwargs, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf(minilm, **kwargs)


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_hf(str(tmp_path))
